"""The LM protocol every backend implements.

A backend turns a batch of rendered prompts into completions with token
counts (``_generate``). Everything else lives here, once for all backends:

- ``render``: messages -> text, with the model's chat template when it has one
  (instruct models) or as plain completion text (base models);
- ``submit``/``complete``: thread-safe single requests that a dispatcher
  gathers into batches, so that a program run from 64 threads reaches the
  engine as one batch of 64 rather than 64 calls in a row;
- the on-disk call cache and the usage counters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # greedy by default: optimization compares candidates, noise hurts
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0.0 or self.seed is not None


@dataclass(frozen=True)
class Prompt:
    """A chat prompt: (role, content) turns and the start of the reply.

    ``prefix`` is written as the beginning of the assistant's answer; the model
    continues from it. Small models follow a format far better when its first
    label is already there.
    """

    messages: tuple[tuple[str, str], ...]
    prefix: str = ""


@dataclass(frozen=True)
class Request:
    text: str  # the rendered prompt, exactly as the engine sees it
    params: SamplingParams = SamplingParams()
    prompt: Prompt | None = None  # kept for chat endpoints that take messages


@dataclass
class Completion:
    text: str  # generated text only (the prompt's prefix is not repeated)
    prompt_tokens: int
    output_tokens: int
    finish_reason: str = "stop"
    cached: bool = False


class LMError(RuntimeError):
    """A backend failed to produce a completion."""


class ContextLengthError(LMError):
    """The prompt does not fit into the model's context window."""


@dataclass
class Usage:
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0

    def add(self, c: Completion) -> None:
        self.calls += 1
        if c.cached:
            self.cached_calls += 1
        else:
            self.prompt_tokens += c.prompt_tokens
            self.output_tokens += c.output_tokens

    def merge(self, other: "Usage") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return asdict(self)


def render_completion_text(prompt: Prompt) -> str:
    """Plain-text rendering for base models without a chat template."""
    parts: list[str] = []
    for role, content in prompt.messages:
        if role == "system":
            parts.append(content.strip() + "\n\n")
        elif role == "user":
            parts.append("---\n\n" + content.strip() + "\n")
        else:
            parts.append(content.strip() + "\n\n")
    return "".join(parts) + prompt.prefix


class LM(ABC):
    """Base class of every backend. Subclasses implement ``_generate``."""

    #: Largest batch a dispatcher hands to ``_generate`` at once.
    max_batch: int = 64
    #: Tokens of prompt plus completion the model accepts.
    context_length: int = 2048

    def __init__(self, name: str, cache: "CallCache | None | bool" = True) -> None:
        from tandem.lm.cache import CallCache, default_cache

        self.name = name
        if cache is True:
            cache = default_cache()
        # `cache or None` would drop an empty cache: CallCache has __len__.
        self.cache: CallCache | None = cache if isinstance(cache, CallCache) else None
        self.usage = Usage()
        self._usage_lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._dispatcher: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- what a backend provides -------------------------------------------------
    @abstractmethod
    def _generate(self, requests: list[Request]) -> list[Completion]:
        """Run a batch through the engine. Returns one completion per request."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the weights (base + adapter) for the cache."""

    def chat_template(self, prompt: Prompt) -> str | None:
        """Text of the prompt under the model's chat template, or None."""
        return None

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    # -- shared behaviour --------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        text = self.chat_template(prompt)
        if text is None:
            return render_completion_text(prompt)
        return text + prompt.prefix

    def _cache_key(self, req: Request) -> str:
        blob = json.dumps([self.fingerprint(), req.text, asdict(req.params)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _record(self, c: Completion) -> Completion:
        with self._usage_lock:
            self.usage.add(c)
        return c

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Batch call: cached answers are returned, the rest go to the engine together."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def complete(self, request: Request) -> Completion:
        return self.submit(request).result()

    def submit(self, request: Request) -> Future:
        fut: Future = Future()
        key = None
        if self.cache is not None and request.params.deterministic:
            key = self._cache_key(request)
            hit = self.cache.get(key)
            if hit is not None:
                fut.set_result(self._record(hit))
                return fut
        self._enqueue(request, fut, key)
        return fut

    def _finish(self, fut: Future, key: str | None, result: Completion | BaseException) -> None:
        """Hand a result to its caller. Never raises: it runs in engine threads and
        future callbacks, where an exception would leave the caller waiting forever."""
        if fut.done():
            return
        if isinstance(result, BaseException):
            fut.set_exception(result)
            return
        if key is not None and self.cache is not None:
            try:
                self.cache.put(key, result)
            except Exception as exc:  # noqa: BLE001 - a cache problem must not lose the result
                log.warning("%s: could not write the call cache (%s); continuing without it", self.name, exc)
        fut.set_result(self._record(result))

    def _enqueue(self, request: Request, fut: Future, key: str | None) -> None:
        with self._start_lock:
            if self._dispatcher is None or not self._dispatcher.is_alive():
                self._queue = queue.Queue()
                self._dispatcher = threading.Thread(
                    target=self._dispatch_loop, name=f"tandem-lm-{self.name}", daemon=True
                )
                self._dispatcher.start()
        assert self._queue is not None
        self._queue.put((request, fut, key))

    def _dispatch_loop(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            items = [q.get()]
            # A short grace period lets threads that are about to submit join
            # this batch; without it the first request would go alone.
            deadline = time.monotonic() + 0.005
            while len(items) < self.max_batch:
                try:
                    items.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._run_batch(items)

    def _run_batch(self, items: list) -> None:
        try:
            outs = self._generate([r for r, _, _ in items])
            if len(outs) != len(items):
                raise LMError(f"{self.name}: backend returned {len(outs)} completions for {len(items)} requests")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            if len(items) > 1 and not isinstance(exc, KeyboardInterrupt):
                # One bad request (say, too long) must not fail its neighbours.
                for item in items:
                    self._run_batch([item])
                return
            for _, fut, _ in items:
                self._finish(fut, None, exc)
            return
        for (_, fut, key), out in zip(items, outs):
            self._finish(fut, key, out)

    def check_fits(self, req: Request, prompt_tokens: int) -> int:
        """Raise ContextLengthError if the prompt cannot fit; return usable max_tokens."""
        room = self.context_length - prompt_tokens
        if room <= 0:
            raise ContextLengthError(
                f"{self.name}: prompt has {prompt_tokens} tokens but the context window is "
                f"{self.context_length}; use fewer or shorter demos or inputs"
            )
        return min(req.params.max_tokens, room)

    def start(self) -> None:
        """Load weights / start the engine now rather than at the first call."""

    def close(self) -> None:
        """Release engine resources. The base class holds none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

