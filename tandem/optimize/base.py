"""What every optimizer shares: the compile protocol and its typed result.

    result = optimizer.compile(program, trainset=train, valset=val, seed=0)
    result.program      # a new program; the input program is never mutated
    result.history      # one StepRecord per step, in order (BetterTogether: history[0]
                        # is the given program, kind "start", scored before any step)

An optimizer may take a ``progress(label, done, total)`` callback; the CLI
draws bars with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

from tandem.lm.base import Usage
from tandem.program.example import Example
from tandem.program.module import Module

Progress = Callable[[str, int, int], None]


@dataclass
class StepRecord:
    """One optimizer step as it appears in a run's history."""

    index: int
    kind: str  # "start" (BetterTogether's step 0, the given program), "p", "w", or a registered name
    status: str = "ok"  # "ok", "nothing_to_train", "failed"
    val_score: float | None = None  # on the selection split (BetterTogether's own)
    inner_score: float | None = None  # what the step's own optimizer selected on
    wall_s: float = 0.0
    usage: dict = field(default_factory=dict)  # LM calls and tokens spent by the step
    train_examples: int = 0  # SFT examples (weight steps) or demos candidates (prompt steps)
    trainable_params: int = 0
    detail: str = ""  # human-readable: the chosen candidate, the reason for a skip, the error
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepRecord":
        return cls(**d)


@dataclass
class CompileResult:
    program: Module
    history: list[StepRecord]
    score: float | None = None  # the returned program's validation score
    extra: dict[str, Any] = field(default_factory=dict)


class Optimizer(Protocol):
    def compile(
        self, program: Module, *, trainset: list[Example], valset: list[Example], seed: int = 0
    ) -> CompileResult: ...


def usage_dict(u: Usage) -> dict:
    return u.to_dict()


def check_dataset(name: str, data: list[Example], minimum: int = 1) -> None:
    if len(data) < minimum:
        raise ValueError(f"{name} has {len(data)} examples; at least {minimum} needed")
    for i, ex in enumerate(data):
        if not isinstance(ex, Example) or not ex.input_keys:
            raise ValueError(
                f"{name}[{i}] is not an Example with inputs; build rows with "
                "Example(...).with_inputs('field', ...)"
            )
