"""The call cache and the usage counter around any LM: ``with_cache(lm, cache)``.

``tandem.lm.registry.get_lm`` applies it to every backend it builds, so all
backends cache and count alike. A request is looked up before the backend
sees it: a deterministic request (greedy, or seeded) whose key is in the
cache is answered from it, and the backend is not called at all, so an
evaluation that the cache answers whole never starts an engine (backends
start their engines at the first request that needs one). The key is a hash
of the backend's ``fingerprint()``, the rendered prompt and the sampling
parameters.

The wrapper is transparent: attributes it does not define are the
backend's (``lm.model``, ``lm.engine()``); ``inner`` is the backend itself.
It is a ``TrainableLM`` exactly when the backend is one, and ``with_adapter``
wraps the backend's copy in the same cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any, Sequence

from tandem.lm.cache import CallCache
from tandem.lm.protocol import LM, Completion, Prompt, Request, TrainableLM, Usage

log = logging.getLogger(__name__)


def cache_key(fingerprint: str, request: Request) -> str:
    """The cache key of ``request`` on weights ``fingerprint``."""
    blob = json.dumps([fingerprint, request.text, asdict(request.params)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class CachedLM(LM):
    """``inner`` behind the call cache ``cache`` (None: no cache, usage still counted)."""

    def __init__(self, inner: LM, cache: CallCache | None) -> None:
        self.inner = inner
        self.cache = cache
        self.usage = Usage()
        self._usage_lock = threading.Lock()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def __getattr__(self, attr: str) -> Any:
        # Only reached for attributes this class lacks: the backend's own.
        if attr == "inner" or attr.startswith("__"):  # not set yet (unpickling), or a protocol of copy/pickle
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def _count(self, c: Completion) -> Completion:
        with self._usage_lock:
            self.usage.add(c)
        return c

    def submit(self, request: Request) -> Future:
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[Request]) -> list[Future]:
        """Hits answered from the cache; the misses handed to the backend together."""
        outs: list[Future] = []
        misses: list[tuple[Request, Future, str | None]] = []
        for request in requests:
            out: Future = Future()
            outs.append(out)
            key = None
            if self.cache is not None and request.params.deterministic:
                key = cache_key(self.inner.fingerprint(), request)
                try:
                    hit = self.cache.get(key)
                except Exception as exc:  # noqa: BLE001 - an unreadable cache must not fail the call
                    log.warning("%s: could not read the call cache (%s); asking the model", self.name, exc)
                    hit = None
                if hit is not None:
                    out.set_result(self._count(hit))
                    continue
            misses.append((request, out, key))
        if misses:
            inners = self.inner.submit_many([request for request, _, _ in misses])
            for (_, out, key), inner in zip(misses, inners):
                inner.add_done_callback(lambda f, out=out, key=key: self._done(f, out, key))
        return outs

    def _done(self, inner: Future, out: Future, key: str | None) -> None:
        """Hand the backend's result on. Never raises: it runs in the backend's threads."""
        try:
            exc = inner.exception()
        except BaseException as cancelled:  # noqa: BLE001 - a cancelled future
            out.set_exception(cancelled)
            return
        if exc is not None:
            out.set_exception(exc)
            return
        result = inner.result()
        if key is not None and self.cache is not None:
            try:
                self.cache.put(key, result)
            except Exception as err:  # noqa: BLE001 - a cache problem must not lose the result
                log.warning("%s: could not write the call cache (%s); continuing without it", self.name, err)
        out.set_result(self._count(result))

    def complete(self, request: Request) -> Completion:
        return self.submit(request).result()

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return [f.result() for f in self.submit_many(requests)]

    def render(self, prompt: Prompt) -> str:
        return self.inner.render(prompt)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def spec(self) -> dict:
        return self.inner.spec()

    def start(self) -> None:
        self.inner.start()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"{self.inner!r} (call cache {self.cache.path if self.cache is not None else 'off'})"


class CachedTrainableLM(CachedLM, TrainableLM):
    """``CachedLM`` around a ``TrainableLM``: its adapter copies share the cache."""

    inner: TrainableLM

    @property
    def model_dir(self):  # type: ignore[override]
        return self.inner.model_dir

    @property
    def adapter(self):  # type: ignore[override]
        return self.inner.adapter

    @property
    def serves_full_weights(self):  # type: ignore[override]
        return self.inner.serves_full_weights

    def with_adapter(self, adapter) -> "CachedTrainableLM":
        return CachedTrainableLM(self.inner.with_adapter(adapter), self.cache)


def with_cache(lm: LM, cache: CallCache | None) -> CachedLM:
    """``lm`` behind ``cache`` and a usage counter (an LM already wrapped is re-wrapped, not nested)."""
    if isinstance(lm, CachedLM):
        lm = lm.inner
    if isinstance(lm, TrainableLM):
        return CachedTrainableLM(lm, cache)
    return CachedLM(lm, cache)
