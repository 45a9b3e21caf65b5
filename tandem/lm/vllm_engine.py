"""One vLLM engine and the thread that feeds it (continuous batching).

``Engine(model_dir, options)`` starts vLLM's ``LLMEngine``; a loop thread adds
requests as they arrive from any thread and steps the engine, so requests
from many concurrent program runs (and later hops of a multi-hop program)
join the running batch instead of waiting for it to finish.

Start-up is watched: vLLM's own start waits forever when a worker process
dies after it reported ready, so the engine starts in a helper thread while
this one polls the processes the start created. An engine process
(``engine_process``) that ends before the engine is up, or a start that
takes longer than ``start_timeout`` seconds, ends the start: the new
processes are killed and ``EngineStartError`` names what happened.

``reuse``: an idle engine of the same architecture whose processes this one
takes over, loading ``model_dir``'s weights in place (vLLM's
``reload_weights``) instead of starting new processes.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import psutil

from tandem.lm import reaper
from tandem.lm.protocol import Completion, LMError

log = logging.getLogger(__name__)

#: Seconds an engine may take to start before it counts as hung (``TANDEM_ENGINE_START_TIMEOUT``).
DEFAULT_START_TIMEOUT = 1200.0


def start_timeout_setting() -> float:
    """``TANDEM_ENGINE_START_TIMEOUT`` in seconds, or the default; a bad value is a one-line error."""
    raw = os.environ.get("TANDEM_ENGINE_START_TIMEOUT")
    if raw is None or raw.strip() == "":
        return DEFAULT_START_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"TANDEM_ENGINE_START_TIMEOUT: expected a positive number of seconds, got {raw!r}")
    return value


def engine_process(proc: psutil.Process) -> bool:
    """Whether ``proc`` is one of vLLM's engine processes (engine core, workers): a process of this
    interpreter that multiprocessing started (forked, with our command line, or spawned) or that
    vLLM titled (``VLLM::Worker``). The tools and helper scripts vLLM runs with ``subprocess``
    (which end normally during a start) are not, nor is multiprocessing's resource tracker, which
    serves the whole process."""
    try:
        if os.path.realpath(proc.exe()) != os.path.realpath(sys.executable):
            return False
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    if any("resource_tracker" in a for a in cmdline):
        return False
    title = os.environ.get("VLLM_PROCESS_NAME_PREFIX", "VLLM") + "::"
    return (cmdline == psutil.Process().cmdline() or any("multiprocessing" in a for a in cmdline)
            or bool(cmdline and cmdline[0].startswith(title)))


class EngineClosed(LMError):
    """The request reached an engine that was closed or handed on before it started;
    ``VLLM`` sends it again to the engine that now serves its weights."""


class EngineStartError(LMError):
    """The engine did not start: a process it started died, or the start timed out."""


def start_llm_engine(model_dir: Path, options: dict, timeout: float,
                     stop: Callable[[], bool] = lambda: False) -> tuple[Any, list[int]]:
    """Start vLLM's ``LLMEngine`` for ``model_dir`` under ``watched_start``."""
    from vllm import EngineArgs, LLMEngine

    from tandem import quiet

    # vLLM's weight-loading bar shows only when tandem shows libraries' progress (-v, TANDEM_LOG).
    args = EngineArgs(model=str(model_dir), **{"use_tqdm_on_load": quiet.progress_bars(), **options})
    return watched_start(lambda: LLMEngine.from_engine_args(args), f"vLLM engine for {model_dir}", timeout, stop)


def watched_start(start: Callable[[], Any], what: str, timeout: float,
                  stop: Callable[[], bool] = lambda: False) -> tuple[Any, list[int]]:
    """``start()`` in a helper thread, watched as the module docstring says.

    Returns what it returned and the pids of the processes it created.
    ``stop``: polled with the processes; True ends the start (SIGTERM, Ctrl-C).
    """
    before = reaper.children()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["engine"] = start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="tandem-engine-start", daemon=True)
    t0 = time.monotonic()
    thread.start()
    watched = reaper.Watched(engine_process)
    problem = None
    try:
        while thread.is_alive():
            thread.join(0.25)
            if not thread.is_alive():
                break
            watched.add(reaper.children() - before)
            dead = watched.dead()
            if dead:
                problem = f"its process {dead} died while it started"
            elif time.monotonic() - t0 > timeout:
                problem = (f"it did not start within {timeout:g} s (the engine's start_timeout option or "
                           "TANDEM_ENGINE_START_TIMEOUT)")
            elif stop():
                problem = "tandem is shutting down (SIGTERM / Ctrl-C)"
            if problem:
                break
    except BaseException:  # a signal's exception in this (the main) thread: the start ends with it
        _kill_new(watched, before)
        raise
    if problem is None and "error" in box:
        # vLLM may notice a dead process (and raise) before the loop above looked again.
        watched.add(reaper.children() - before)
        dead = watched.dead()
        if dead:
            problem = f"its process {dead} died while it started"
    if problem is not None:
        _kill_new(watched, before)
        thread.join(2)  # vLLM notices its dead engine core and returns; a stuck start is a daemon thread
        raise EngineStartError(f"{what}: {problem}; see the log above for the cause") from box.get("error")
    if "error" in box:
        _kill_new(watched, before)
        raise box["error"]
    return box["engine"], sorted(reaper.children() - before)


def _kill_new(watched: reaper.Watched, before: set[int]) -> None:
    """Kill the engine processes a start created (those seen, and those that appeared since)."""
    watched.add(reaper.children() - before)
    reaper.kill(sorted(watched.pids()))


class Engine:
    """One vLLM engine and the thread that feeds it. See the module docstring."""

    def __init__(self, model_dir: Path, options: dict, reuse: "Engine | None" = None, *,
                 start_timeout: float = DEFAULT_START_TIMEOUT, stop: Callable[[], bool] = lambda: False) -> None:
        self.model_dir = model_dir
        self.options = options
        self.start_timeout = start_timeout
        t0 = time.perf_counter()
        if reuse is None:
            log.info("starting vLLM engine for %s (%s)", model_dir, options)
            self.engine, pids = start_llm_engine(model_dir, options, start_timeout, stop)
            # The engine core and worker processes die with us, even on SIGKILL / OOM kill.
            self.watcher = reaper.watch(pids)
        else:
            log.info("loading %s into the running vLLM engine of %s", model_dir, reuse.model_dir)
            self.engine, self.watcher = reuse.engine, reuse.watcher
            reuse.engine = None  # ours now: closing the old wrapper must not shut it down
            try:
                self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
                # Cached KV blocks were computed by the old weights.
                if not self.engine.reset_prefix_cache():
                    raise LMError("vLLM did not empty its prefix cache after a weight reload")
            except BaseException:
                self.engine.engine_core.shutdown()
                raise
        # Where an engine's time goes (engine_stats()): start-up (or weight reload),
        # time inside engine.step() (the model computing), steps, and requests in them.
        self.stats = {"model": str(model_dir), "start_s": time.perf_counter() - t0, "step_s": 0.0,
                      "steps": 0, "requests": 0, "request_steps": 0, "reloaded": reuse is not None}
        self.max_model_len = self.engine.model_config.max_model_len
        self._queue: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._pending: dict[str, tuple[Future, int]] = {}
        self.closed = False
        self._thread = threading.Thread(target=self._loop, name=f"vllm-{model_dir.name}", daemon=True)
        self._thread.start()

    def submit(self, token_ids: list[int], params, lora_request=None) -> Future:
        return self.submit_many([(token_ids, params, lora_request)])[0]

    def submit_many(self, items: list[tuple]) -> list[Future]:
        """Requests ``(token_ids, params, lora_request)`` that join the running batch together, in one step:
        a batch's composition then does not depend on how fast its requests were handed over."""
        futs: list[Future] = [Future() for _ in items]
        if self.closed:
            for fut in futs:
                fut.set_exception(EngineClosed(f"vLLM engine for {self.model_dir} is closed"))
            return futs
        self._queue.put([(*item, fut) for item, fut in zip(items, futs)])
        return futs

    def _add(self, items: list[tuple]) -> None:
        for item in items:
            self._add_one(item)

    def _add_one(self, item) -> None:
        token_ids, params, lora_request, fut = item
        rid = str(next(self._ids))
        try:
            self.engine.add_request(rid, {"prompt_token_ids": token_ids}, params, lora_request=lora_request)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone
            fut.set_exception(LMError(f"vLLM rejected a request: {exc}"))
            return
        self._pending[rid] = (fut, len(token_ids))
        self.stats["requests"] += 1

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - a dead loop must not leave callers waiting
            log.exception("vLLM loop thread crashed")
            self.closed = True
            err = LMError(f"vLLM engine loop for {self.model_dir} crashed: {exc}")
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            self._fail_waiting(err)

    def _fail_waiting(self, err: Exception) -> None:
        """Fail the requests still in the queue (never handed to vLLM) with ``err``."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            for request in item or ():
                if not request[3].done():
                    request[3].set_exception(err)

    def _serve(self) -> None:
        while not self.closed:
            if not self._pending:
                item = self._queue.get()
                if item is None:
                    break
                self._add(item)
            while True:  # everything that arrived joins the running batch
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.closed = True
                    break
                self._add(item)
            if not self._pending:
                continue
            t_step = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - fail every waiting caller, loudly
                log.exception("vLLM engine step failed")
                for fut, _ in self._pending.values():
                    fut.set_exception(LMError(f"vLLM engine for {self.model_dir} failed: {exc}"))
                self._pending.clear()
                self.closed = True
                break
            st = self.stats
            st["step_s"] += time.perf_counter() - t_step
            st["steps"] += 1
            st["request_steps"] += len(self._pending)  # / steps: the mean batch
            for out in outputs:
                if not out.finished or out.request_id not in self._pending:
                    continue
                fut, n_prompt = self._pending.pop(out.request_id)
                o = out.outputs[0]
                fut.set_result(Completion(o.text, n_prompt, len(o.token_ids), str(o.finish_reason or "stop")))
        if self._pending:
            # Closed (or handed on) mid-request: vLLM drops them, and the callers'
            # VLLM sends them again to the engine that serves their weights now.
            try:
                self.engine.abort_request(list(self._pending))
            except Exception:  # noqa: BLE001 - the engine may be gone already
                pass
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(EngineClosed("vLLM engine closed with requests in flight"))
            self._pending.clear()

    def idle(self) -> bool:
        """Running, with no request in flight or waiting."""
        return not self.closed and not self._pending and self._queue.empty()

    def reset_prefix_cache(self, timeout: float = 10.0) -> None:
        """Empty vLLM's prefix cache once no request is in flight (as in a fresh engine)."""
        t0 = time.monotonic()
        while not self.idle():  # the loop thread sets the last future, then frees the request
            if time.monotonic() - t0 > timeout:
                raise LMError(f"vLLM engine for {self.model_dir} still busy after {timeout} s")
            time.sleep(0.01)
        time.sleep(0.1)
        if not self.engine.reset_prefix_cache():
            raise LMError("vLLM did not empty its prefix cache")

    def _stop(self) -> None:
        """Stop the loop thread; requests that never reached vLLM fail with EngineClosed."""
        if not self.closed:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self.closed = True
        self._fail_waiting(EngineClosed(f"vLLM engine for {self.model_dir} was closed"))

    def close(self) -> None:
        self._stop()
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

    def hand_over(self, model_dir: Path) -> "Engine":
        """This engine's processes, now serving ``model_dir``'s weights (see ``reuse``)."""
        self._stop()
        return Engine(model_dir, self.options, reuse=self, start_timeout=self.start_timeout)
