"""The LM contract: what a program needs from a model, and the types it speaks in.

Every backend (``vllm``, ``hf``, ``openai``, ``fake`` and any backend that a
package registers under the ``tandem.backends`` entry point) implements
``LM``; backends whose weights tandem can fine-tune also implement
``TrainableLM``. Both are ``typing.Protocol`` classes: a backend need not
inherit from them, but one that does gets ``complete`` and ``generate``
written in terms of ``submit``. ``tandem.lm.registry.get_lm`` wraps every
backend in the call cache and usage counter (``tandem.lm.caching``), so a
backend itself neither caches nor counts. docs/design.md ("The LM
contract") has the table.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable


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


class LMUnavailable(LMError):
    """The model cannot be reached at all (every server down after the retries): not one request's
    failure. Evaluations and runs stop on it instead of scoring the example 0."""


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


def check_fits(name: str, context_length: int, request: Request, prompt_tokens: int) -> int:
    """The ``max_tokens`` that fits after a prompt of ``prompt_tokens``; ContextLengthError if none does."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise ContextLengthError(
            f"{name}: prompt has {prompt_tokens} tokens but the context window is "
            f"{context_length}; use fewer or shorter demos or inputs"
        )
    return min(request.params.max_tokens, room)


@runtime_checkable
class LM(Protocol):
    """A model that completes rendered prompts. Thread-safe: programs call it from many threads."""

    #: A short label for messages and logs (``vllm:smollm2-135m``).
    name: str

    def submit(self, request: Request) -> Future[Completion]:
        """Start one request; the future holds its completion or its ``LMError``. Never raises.
        Requests submitted from many threads at once are the backend's batch."""
        ...

    def render(self, prompt: Prompt) -> str:
        """The prompt as the text the model reads (its chat template, or plain completion text)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model counts them (an estimate where it cannot know)."""
        ...

    def fingerprint(self) -> str:
        """Names the weights (base and adapter) and whatever else changes replies: the cache key's first part."""
        ...

    def spec(self) -> dict:
        """What rebuilds this LM: ``backend``, ``model``, ``adapter`` and the backend's own keys (program.json)."""
        ...

    def start(self) -> None:
        """Load weights or connect now rather than at the first request that needs them."""
        ...

    def close(self) -> None:
        """Release what this LM owns (never what other LMs share with it); it may start again later."""
        ...

    def complete(self, request: Request) -> Completion:
        """One request, waited for."""
        return self.submit(request).result()

    def submit_many(self, requests: Sequence[Request]) -> list[Future[Completion]]:
        """Start several requests together; a backend that batches them (vLLM) starts them in the
        same step, so the batch does not depend on how fast they were handed over. Never raises."""
        return [self.submit(r) for r in requests]

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Several requests, submitted together (one batch) and waited for."""
        return [f.result() for f in self.submit_many(requests)]


@runtime_checkable
class TrainableLM(LM, Protocol):
    """An LM on local weights that tandem can fine-tune, and serve with a LoRA adapter."""

    #: The base checkpoint the weight step trains on (None: not known here, e.g. a remote server).
    model_dir: Path | None
    #: The adapter folder (or served adapter name) in use, None for the base weights.
    adapter: Path | str | None
    #: Whether ``with_adapter`` also takes a checkpoint tuned in full (``[lora] method = "full"``,
    #: ``tandem.lm.identity.is_full_checkpoint``) and serves it in the base's place; a server
    #: that loads only LoRAs at run time says False.
    serves_full_weights: bool = True

    def with_adapter(self, adapter: str | Path | None) -> "TrainableLM":
        """The same model and settings with ``adapter`` (None: the base weights). The copy shares
        this LM's engine or connection, which its creator still owns."""
        ...
