"""Traces: every predictor call made while a program runs.

    with trace(program) as calls:
        pred = program(question="...")
    calls[0].predictor, calls[0].inputs, calls[0].outputs

``calls[0].predictor`` is the predictor's name in ``program.named_predictors()``,
also for predictors of nested modules and for a sub-module called on its
own under the trace (``program.sub(x=1)``). Without a program, names come
from the outermost module call (tandem.program.module.predictor_name).

A trace lives in a context variable, so threads that each run one example
(Evaluate, bootstrapping) keep separate traces.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

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
    # The program whose predictor names the entries use (None: the outermost module call's).
    program: Any = None
    # Calls whose reply did not parse (the run then stopped with a ParseError): kept apart from
    # ``entries``, which hold parsed calls only; the RL step trains on them with a format penalty.
    unparsed: list[TraceEntry] = field(default_factory=list)
    _names: dict | None = field(default=None, repr=False, compare=False)

    def names(self) -> dict[int, str]:
        """``{id(predictor): name}`` for ``program``'s predictors, read on first use."""
        if self._names is None:
            named = self.program.named_predictors() if self.program is not None else []
            self._names = {id(pred): name for name, pred in named}
        return self._names

    def record(self, predictor: str, inputs: dict, outputs: dict, prompt: str, completion: str) -> None:
        index = sum(1 for e in self.entries if e.predictor == predictor)
        self.entries.append(TraceEntry(predictor, index, dict(inputs), dict(outputs), prompt, completion))

    def record_unparsed(self, predictor: str, inputs: dict, prompt: str, completion: str) -> None:
        """A call whose reply did not parse: its prompt and reply, no outputs (``unparsed``)."""
        index = sum(1 for e in self.entries if e.predictor == predictor)
        self.unparsed.append(TraceEntry(predictor, index, dict(inputs), {}, prompt, completion))

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
def trace(program: Any = None) -> Iterator[Trace]:
    """Record every predictor call in this context, named after ``program``'s predictors if given."""
    t = Trace(program=program)
    token = _current.set(t)
    try:
        yield t
    finally:
        _current.reset(token)
