"""What every optimizer shares: the compile protocol and its typed result.

    result = optimizer.compile(program, trainset=train, valset=val, seed=0,
                               progress=None, out_dir=None)
    result.program      # a new program; the input program is never mutated
    result.history      # one StepRecord per step, in order (BetterTogether: history[0]
                        # is the given program, kind "start", scored before any step)

``Optimizer`` is the protocol. BetterTogether calls every step's optimizer
the same way, its own ``p`` and ``w`` and any registered with
``optimizers={"name": optimizer}``: with a ``progress(label, done, total)``
callback (the CLI draws bars with it) and an ``out_dir`` for the files the
step writes (adapters, logs), ``steps/NN-name/out/`` of the run directory.
A callback may also take a keyword ``status`` (a short text shown with
the bar, such as the RL step's "mean reward 0.412"); optimizers pass it
through ``report``, which leaves it out for a callback that does not take it.
An optimizer that sets ``restarts_prompts = True`` (RandomSearch) is a
prompt optimizer: it is given the original prompts on the current weights,
and two disjoint parts of the training set.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    """An optimizer: ``compile`` returns a new program and the step's record (``history[-1]``).

    ``progress`` may be None (no bars); ``out_dir`` is a folder the optimizer
    may create and write into, or None (it then picks its own, if it needs one).
    """

    #: True for a prompt optimizer: BetterTogether hands it the original prompts (not the
    #: current ones) on the current weights. Read with ``getattr(opt, "restarts_prompts", False)``.
    restarts_prompts: bool = False

    def compile(
        self, program: Module, *, trainset: list[Example], valset: list[Example], seed: int = 0,
        progress: Progress | None = None, out_dir: str | Path | None = None,
    ) -> CompileResult: ...


def check_optimizer(name: str, opt: object) -> None:
    """Raise TypeError unless ``opt.compile`` takes the protocol's keywords (``progress``, ``out_dir``)."""
    compile_ = getattr(opt, "compile", None)
    if not callable(compile_):
        raise TypeError(f"optimizer {name!r} ({type(opt).__name__}) has no compile() method")
    try:
        params = inspect.signature(compile_).parameters
    except (TypeError, ValueError):
        return  # a signature that cannot be read: trust it
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    lacking = [k for k in ("trainset", "valset", "seed", "progress", "out_dir") if k not in params]
    if lacking:
        raise TypeError(
            f"optimizer {name!r} ({type(opt).__name__}): compile() takes no {', '.join(lacking)}; "
            "it is called as compile(program, *, trainset, valset, seed, progress, out_dir) "
            "(tandem.optimize.base.Optimizer)"
        )


def report(progress: Progress | None, label: str, done: int, total: int, status: str | None = None) -> None:
    """Call ``progress(label, done, total)``, with ``status=`` when given and the callback takes it."""
    if progress is None:
        return
    if status is not None and _takes_status(progress):
        progress(label, done, total, status=status)
    else:
        progress(label, done, total)


def _takes_status(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "status" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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
