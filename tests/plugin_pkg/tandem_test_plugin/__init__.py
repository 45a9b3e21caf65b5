"""A backend written against tandem's public LM protocol alone, and a task: x -> whether x is even."""

from __future__ import annotations

from concurrent.futures import Future

from tandem.lm.protocol import Completion, Prompt, Request, TrainableLM
from tandem.program import ChainOfThought, Example, Module
from tandem.tasks.registry import Task


class EchoLM(TrainableLM):
    """Answers every prompt that asks whether a number is even; no engine, no base class of tandem's."""

    def __init__(self, model: str, adapter=None, **options) -> None:
        self.name = f"echo:{model}"
        self.model, self.adapter, self.options = model, adapter, options
        self.model_dir = None
        self.requests: list[Request] = []

    def submit(self, request: Request) -> Future:
        self.requests.append(request)
        x = int(request.text.rsplit("X: ", 1)[1].split("\n")[0].strip())
        fut: Future = Future()
        fut.set_result(Completion(f" {x} mod 2 is {x % 2}\nEven: {'yes' if x % 2 == 0 else 'no'}", 3, 5))
        return fut

    def render(self, prompt: Prompt) -> str:
        return "\n".join(content for _, content in prompt.messages) + "\n" + prompt.prefix

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def fingerprint(self) -> str:
        return f"echo:{self.model}:{self.adapter}"

    def spec(self) -> dict:
        return {"backend": "echo", "model": self.model, "adapter": self.adapter}

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def with_adapter(self, adapter) -> "EchoLM":
        return EchoLM(self.model, adapter, **self.options)


def make_backend(model: str, **options) -> EchoLM:
    return EchoLM(model, **options)


class Parity(Module):
    def __init__(self):
        self.decide = ChainOfThought("x -> even")

    def forward(self, x):
        return self.decide(x=x)


def _load(data=None, seed=0, sizes=None):
    rows = [Example(x=str(i), even="yes" if i % 2 == 0 else "no").with_inputs("x") for i in range(12)]
    return {"train": rows[:4], "dev": rows[4:8], "test": rows[8:]}


def make_task() -> Task:
    return Task("parity", _load, Parity, lambda ex, pred, trace=None: ex.even == pred.even, (4, 4, 4))
