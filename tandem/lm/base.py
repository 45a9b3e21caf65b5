"""A base for backends that run whole batches: ``BatchedLM`` and its dispatcher.

Programs are plain Python that call predictors one at a time, so concurrency
comes from running many examples in threads. ``Batcher`` gathers the single
requests those threads submit into batches, so that a program run from 64
threads reaches the backend as one batch of 64 rather than 64 calls in a row.
A backend subclasses ``BatchedLM`` and implements ``generate_batch`` (and
``fingerprint``, ``spec``); ``prepare`` may turn a request into what
``generate_batch`` wants in the caller's thread (the transformers backend
tokenizes there, so a prompt that cannot fit fails alone).

Backends with their own scheduling (the vLLM engine loop, the HTTP client's
pool) implement ``tandem.lm.protocol.LM`` directly instead. The contract's
types are importable from here too (``from tandem.lm.base import Request``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import abstractmethod
from concurrent.futures import Future
from typing import Callable

from tandem.lm.chat import render_completion_text
from tandem.lm.protocol import (  # noqa: F401 - the contract's names, importable from here too
    LM, Completion, ContextLengthError, LMError, Prompt, Request, SamplingParams, TrainableLM, Usage, check_fits,
)

__all__ = [
    "BatchedLM", "Batcher", "LM", "Completion", "ContextLengthError", "LMError", "Prompt", "Request",
    "SamplingParams", "TrainableLM", "Usage", "check_fits",
]

log = logging.getLogger(__name__)

#: How long the dispatcher waits for more requests to join a batch.
BATCH_GRACE_S = 0.005


class Batcher:
    """Single requests from many threads -> batches for ``run`` (a list of requests -> one completion each).

    A thread started on the first request takes what is waiting (up to
    ``max_batch``, after a short grace period so that threads about to submit
    join) and runs it. When a batch fails, its requests run again one by one,
    so one bad request (say, too long) fails alone.
    """

    def __init__(self, run: Callable[[list[Request]], list[Completion]], name: str, max_batch: int) -> None:
        self.run = run
        self.name = name
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, request: Request) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=f"tandem-lm-{self.name}", daemon=True)
                self._thread.start()
        self._queue.put((request, fut))
        return fut

    def _loop(self) -> None:
        q = self._queue
        while True:
            items = [q.get()]
            deadline = time.monotonic() + BATCH_GRACE_S
            while len(items) < self.max_batch:
                try:
                    items.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._run(items)

    def _run(self, items: list[tuple[Request, Future]]) -> None:
        try:
            outs = self.run([r for r, _ in items])
            if len(outs) != len(items):
                raise LMError(f"{self.name}: backend returned {len(outs)} completions for {len(items)} requests")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            if len(items) > 1 and not isinstance(exc, KeyboardInterrupt):
                for item in items:
                    self._run([item])
                return
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), out in zip(items, outs):
            if not fut.done():
                fut.set_result(out)


class BatchedLM(LM):
    """An ``LM`` whose backend takes whole batches: subclasses implement ``generate_batch``."""

    #: Largest batch the dispatcher hands to ``generate_batch`` at once.
    max_batch: int = 64
    #: Tokens of prompt plus completion the model accepts.
    context_length: int = 2048

    def __init__(self, name: str) -> None:
        self.name = name
        self._batcher: Batcher | None = None
        self._batcher_lock = threading.Lock()

    @abstractmethod
    def generate_batch(self, requests: list[Request]) -> list[Completion]:
        """Run a batch through the model. Returns one completion per request, in order."""

    @abstractmethod
    def fingerprint(self) -> str: ...

    @abstractmethod
    def spec(self) -> dict: ...

    def prepare(self, request: Request) -> Request:
        """Runs in the submitting thread before the request joins a batch; an LMError fails it alone."""
        return request

    def submit(self, request: Request) -> Future:
        try:
            request = self.prepare(request)
        except Exception as exc:  # noqa: BLE001 - submit never raises: the future carries it
            fut: Future = Future()
            fut.set_exception(exc)
            return fut
        if self._batcher is None:
            with self._batcher_lock:
                if self._batcher is None:
                    # Through a lambda: generate_batch is looked up at each batch.
                    self._batcher = Batcher(lambda reqs: self.generate_batch(reqs), self.name, self.max_batch)
        return self._batcher.submit(request)

    def render(self, prompt: Prompt) -> str:
        return render_completion_text(prompt)

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def check_fits(self, request: Request, prompt_tokens: int) -> int:
        """The request's ``max_tokens``, capped by what is left of the context window; ContextLengthError if none."""
        return check_fits(self.name, self.context_length, request, prompt_tokens)

    def start(self) -> None:
        """Nothing to load by default."""

    def close(self) -> None:
        """Nothing to release by default."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
