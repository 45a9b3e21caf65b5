"""Traces: every predictor call made while a program runs.

    with trace() as calls:
        pred = program(question="...")
    calls[0].predictor, calls[0].inputs, calls[0].outputs

A trace lives in a context variable, so threads that each run one example
(Evaluate, bootstrapping) keep separate traces.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from tandem.lm.base import Usage


@dataclass
class TraceEntry:
    predictor: str  # the predictor's name in its program (named_predictors)
    call_index: int  # 0 for its first call in this run, 1 for the second, ...
    inputs: dict
    outputs: dict
    prompt: str  # the rendered prompt as the engine saw it
    completion: str  # the raw generated text

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Trace:
    entries: list[TraceEntry] = field(default_factory=list)
    # Tokens of every LM call made under this trace, parse failures included:
    # evaluations sum these, which stays exact when evaluations run concurrently.
    usage: Usage = field(default_factory=Usage)

    def record(self, predictor: str, inputs: dict, outputs: dict, prompt: str, completion: str) -> None:
        index = sum(1 for e in self.entries if e.predictor == predictor)
        self.entries.append(TraceEntry(predictor, index, dict(inputs), dict(outputs), prompt, completion))

    def __iter__(self) -> Iterator[TraceEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> TraceEntry:
        return self.entries[i]


_current: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("tandem_trace", default=None)


def current_trace() -> Trace | None:
    return _current.get()


@contextmanager
def trace() -> Iterator[Trace]:
    t = Trace()
    token = _current.set(t)
    try:
        yield t
    finally:
        _current.reset(token)
