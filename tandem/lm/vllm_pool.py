"""The process's vLLM engines: shared, limited in number, and closed by whoever owns them.

One engine per checkpoint and options is shared by every ``VLLM`` that
points at it (candidates, steps, adapters), because starting one costs
half a minute on a small CPU. Each engine records its owners: the
``EngineGroup`` of every ``VLLM`` made by its constructor (``with_adapter``
copies share their creator's group). ``release(group)`` (``VLLM.close``)
drops that group from its engines and closes the engines no one else owns.

At most ``max_engines`` engines stay alive (``TANDEM_MAX_ENGINES``, default
1). At the limit, the least recently used idle engine makes room: if it has
the same architecture, the new weights are loaded into it in place (vLLM's
``reload_weights``: under a second, against a new engine's start and memory;
``TANDEM_RELOAD_WEIGHTS=0`` switches it off); otherwise it is closed and a
new engine starts. An engine with requests in flight is never closed for
another: the limit is exceeded instead, until it is idle. An LM whose engine
was closed or reloaded gets the right one again on its next call.

``pool`` is the one pool of the process; ``shutdown_engines`` (atexit, tests)
and ``abort`` (SIGTERM, Ctrl-C) act on it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from tandem.lm.chat import ChatTokenizer
from tandem.lm.vllm_engine import Engine, start_timeout_setting

log = logging.getLogger(__name__)


class EngineGroup:
    """What one ``VLLM`` shares with its adapter copies: it owns the engines they asked for, and
    holds the checkpoint's tokenizer (one per checkpoint folder) so that copies do not load it again."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, ChatTokenizer] = {}
        self._lock = threading.Lock()

    def tokenizer(self, model_dir: Path) -> ChatTokenizer:
        with self._lock:
            found = self._tokenizers.get(str(model_dir))
            if found is None:
                found = self._tokenizers[str(model_dir)] = ChatTokenizer(model_dir)
            return found

    def __repr__(self) -> str:
        return f"EngineGroup({id(self):#x})"


def same_architecture(a: Path, b: Path) -> bool:
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


def _env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


class EnginePool:
    """The engine table; see the module docstring. ``factory`` builds an engine (tests pass stand-ins)."""

    def __init__(self, factory: Callable[..., Engine] = Engine, *, max_engines: int | None = None,
                 reload_weights: bool | None = None) -> None:
        self.factory = factory
        self._max_engines = max_engines
        self._reload_weights = reload_weights
        self._engines: dict[tuple, Engine] = {}  # least recently used first
        self._owners: dict[int, set[int]] = {}  # id(engine) -> ids of its owning groups
        self._lock = threading.Lock()
        self.stats: list[dict] = []  # every engine this pool started, closed ones included
        self.aborted = threading.Event()

    @property
    def max_engines(self) -> int:
        if self._max_engines is not None:
            return self._max_engines
        raw = _env_flag("TANDEM_MAX_ENGINES", "1")
        try:
            return max(1, int(raw))
        except ValueError:
            raise ValueError(f"TANDEM_MAX_ENGINES: expected a whole number of engines, got {raw!r}") from None

    @property
    def reload_weights(self) -> bool:
        if self._reload_weights is not None:
            return self._reload_weights
        return _env_flag("TANDEM_RELOAD_WEIGHTS", "1") != "0"

    def engines(self) -> list[Engine]:
        with self._lock:
            return list(self._engines.values())

    def get(self, model_dir: Path, options: dict, owner: EngineGroup, start_timeout: float | None = None) -> Engine:
        """The running engine for ``model_dir`` and ``options`` (started, or reloaded, if need be)."""
        key = (str(model_dir), tuple(sorted(options.items())))
        with self._lock:
            eng = self._engines.pop(key, None)
            if eng is None or eng.closed:
                eng = self._make_room_and_start(key, model_dir, options, start_timeout)
            self._engines[key] = eng  # re-inserted: most recently used last
            self._owners.setdefault(id(eng), set()).add(id(owner))
            return eng

    def _make_room_and_start(self, key: tuple, model_dir: Path, options: dict, start_timeout: float | None) -> Engine:
        eng = None
        limit = self.max_engines
        for old_key in list(self._engines):  # least recently used first
            if len(self._engines) < limit:
                break
            old = self._engines[old_key]
            if not old.idle() and not old.closed:
                continue  # busy: never fail its requests to make room
            del self._engines[old_key]
            self._owners.pop(id(old), None)
            if (self.reload_weights and eng is None and not old.closed and old_key[1] == key[1]
                    and same_architecture(Path(old_key[0]), model_dir)):
                try:
                    eng = old.hand_over(model_dir)
                except Exception as exc:  # noqa: BLE001 - the old engine is gone; start a new one
                    log.warning("could not load %s into a running vLLM engine (%s); starting one", model_dir, exc)
            else:
                log.info("closing the vLLM engine for %s to make room", old_key[0])
                old.close()
        if eng is None:
            if len(self._engines) >= limit:
                log.warning("%d vLLM engine(s) busy: starting one more than TANDEM_MAX_ENGINES=%d",
                            len(self._engines), limit)
            timeout = start_timeout if start_timeout is not None else start_timeout_setting()
            eng = self.factory(model_dir, options, start_timeout=timeout, stop=self.aborted.is_set)
            # At exit, multiprocessing's own atexit hook joins child processes, the
            # engine's included, which only end once shut down: ours must run first.
            # atexit runs the last registered first, so register again after vLLM.
            atexit.unregister(shutdown_engines)
            atexit.register(shutdown_engines)
        stats = getattr(eng, "stats", None)
        if stats is not None:
            self.stats.append(stats)
        return eng

    def release(self, owner: EngineGroup) -> None:
        """Drop ``owner`` from every engine; close those that no other group owns."""
        with self._lock:
            for key, eng in list(self._engines.items()):
                owners = self._owners.get(id(eng))
                if owners is None or id(owner) not in owners:
                    continue
                owners.discard(id(owner))
                if not owners:
                    del self._engines[key]
                    self._owners.pop(id(eng), None)
                    eng.close()

    def shutdown(self, wait: bool = True) -> None:
        """Close every engine. ``wait=False``: do nothing if another caller holds the table."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            for eng in self._engines.values():
                eng.close()
            self._engines.clear()
            self._owners.clear()
        finally:
            self._lock.release()

    def engine_stats(self) -> list[dict]:
        """Per engine started: model folder, start-up seconds, seconds inside ``engine.step()``,
        steps, requests and the mean batch (requests in flight per step)."""
        out = []
        for st in self.stats:
            d = dict(st)
            d["mean_batch"] = round(d.pop("request_steps") / d["steps"], 1) if d["steps"] else 0.0
            d["start_s"], d["step_s"] = round(d["start_s"], 2), round(d["step_s"], 2)
            out.append(d)
        return out


#: The process's engines (named in tandem/settings.py).
pool = EnginePool()


def engine_stats() -> list[dict]:
    """``pool.engine_stats()``: where the in-process engines' time went."""
    return pool.engine_stats()


def abort() -> None:
    """Stop every engine now and refuse new calls: for SIGTERM and Ctrl-C.

    Calls in flight fail at once instead of running to the end, so threads
    that wait on them (an evaluation's workers) finish in seconds and the
    process exits; what finished before is in the call cache and the run
    directory, so a ``--resume`` loses nothing. An engine that is starting
    stops starting.
    """
    pool.aborted.set()
    # From a signal handler: if this thread is inside get() (an engine
    # starting), waiting for the lock would deadlock; atexit closes them later.
    pool.shutdown(wait=False)


@atexit.register
def shutdown_engines(wait: bool = True) -> None:
    """Close every engine of the process (tests, the end of a CLI run)."""
    pool.shutdown(wait=wait)
