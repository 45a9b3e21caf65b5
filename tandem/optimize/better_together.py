"""BetterTogether: prompt and weight steps in alternation, as a strategy string.

    bt = BetterTogether(metric, strategy="p -> w -> p", run_dir="runs/iris")
    result = bt.compile(program, trainset=train, valset=dev, seed=0)

Steps (``p``: RandomSearch, ``w``: BootstrapFinetune, ``r``: GRPO, or any name given in
``optimizers={"name": optimizer}``) run left to right. Every step's optimizer
is called the same way (the ``Optimizer`` protocol, ``tandem.optimize.base``):
``compile(program, trainset=, valset=, seed=, progress=, out_dir=)``. A prompt
optimizer (``restarts_prompts = True``, as RandomSearch) always restarts from
the *original* prompts, on the weights current at that point (the paper's
``Pi'' = OptimizePrompts(program<Theta', Pi>)``). Any other step, the weight
step included, starts from the current program (current prompts and weights).

Step 0, the start. Before the first step the given program is scored on the
``valset``; ``history[0]`` is its record (``kind="start"``) and the strategy's
steps follow as ``history[1..n]``. The returned program is the best by
validation score over the start and every step, ties to the later one: the
given program comes back only when every step scored strictly lower than it
(a step that kept the score is not worse, and it is what was asked for), so
a run is never worse on the validation set than its start. DSPy's
BetterTogether lets the earlier program win ties; tandem prefers the later.
``result.extra["best_step"]`` is the history index (0: the start).

Splits. The inner optimizers get the training set only: prompt optimizers
get two disjoint parts of it, bootstrap on one and pick their candidate on
the other (Iris: 15 / 35, as in the paper); any other step gets all of it as
``trainset`` (the weight step bootstraps on all of it) and the second part as
``valset``. The
``valset`` is used only here, to score the start and the program after each
step and to pick the returned program: a split that no inner optimizer selected on.

Run directory. The start is checkpointed like a step, in ``steps/00-start/``;
after each step, ``steps/NN-kind/`` (NN = its history index: ``01-p``,
``02-w``, ...) receives the program (program.json + adapters) and its record;
the step's optimizer is handed ``steps/NN-kind/out/`` as its ``out_dir`` (the
weight step trains its adapters there; without a run directory, a fresh
temporary folder stands in for the run directory);
``final/`` is the returned program. ``resume=True`` reloads the start and
the steps that finished and continues with the next one. A step's seed is
``seed * 100 + its position in the strategy`` (0-based), so a resumed run
makes the same choices.

Resume checks the settings. plan.json records every setting that changes a
step's result (``tandem.optimize.plan``: the strategy, seed, metric, splits,
each step optimizer's settings, a hash of the trainset and the valset, the
program's prompts, formats and LMs, and the caller's ``settings``). Resuming
over finished steps made with other settings raises ``ResumeMismatch``, one
line naming each ``setting: was X, now Y``, before anything runs or is
written. A plan.json of an older tandem, which recorded only the strategy
and the seed, is refused too (over finished steps): it cannot show that
nothing else differed (other sizes or candidate counts would reuse steps
made with the old ones). ``num_threads`` and
progress callbacks do not count. A resumed run says which steps it reused
(``info``, and ``result.extra["reused_steps"]``). A run that does not resume
starts over: it marks the steps already in the directory unfinished (their
record.json is removed), so a later resume never mixes them with its own.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tandem.evaluate.evaluate import Metric, evaluate
from tandem.fileio import write_json
from tandem.lm.protocol import TrainableLM
from tandem.optimize.base import CompileResult, Optimizer, Progress, StepRecord, check_dataset, check_optimizer
from tandem.optimize.finetune import BootstrapFinetune
from tandem.optimize.grpo import GRPO
from tandem.optimize.plan import PLAN_VERSION, ResumeMismatch, differences, run_settings
from tandem.optimize.random_search import RandomSearch
from tandem.persist import load_program, save_program
from tandem.program.example import Example
from tandem.program.module import Module

log = logging.getLogger(__name__)

_STEP = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
START = "start"  # the kind of step 0: the given program, scored before the strategy runs


class StrategyError(ValueError):
    pass


def parse_strategy(strategy: str, known: set[str]) -> list[str]:
    """``"p -> w -> p"`` -> ``["p", "w", "p"]``; unknown steps are an error."""
    steps = [s.strip() for s in strategy.split("->")]
    if not strategy.strip() or any(not s for s in steps):
        raise StrategyError(f"empty step in strategy {strategy!r}; write steps like 'p -> w -> p'")
    for s in steps:
        if not _STEP.match(s) or s not in known:
            raise StrategyError(
                f"unknown step {s!r} in strategy {strategy!r}; known steps: {', '.join(sorted(known))} "
                "(add your own with BetterTogether(optimizers={'name': optimizer}))"
            )
    return steps


@dataclass
class SplitPlan:
    """How the training set is divided for prompt steps (paper: Iris 15/35, GSM8K 100/250)."""

    prompt_train: int | None = None  # examples the prompt step bootstraps on
    prompt_val: int | None = None  # examples it selects its candidate on

    def split(self, trainset: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
        data = list(trainset)
        random.Random(seed).shuffle(data)
        n_train = self.prompt_train or max(1, len(data) * 3 // 10)
        n_val = self.prompt_val or (len(data) - n_train)
        if n_train + n_val > len(data):
            raise ValueError(
                f"the prompt step needs {n_train} + {n_val} training examples, the training set has {len(data)}"
            )
        return data[:n_train], data[n_train:n_train + n_val]


@dataclass
class BetterTogether:
    metric: Metric
    strategy: str = "p -> w -> p"
    prompt_optimizer: Optimizer | None = None  # step "p" (default: RandomSearch)
    weight_optimizer: Optimizer | None = None  # step "w" (default: BootstrapFinetune)
    splits: SplitPlan = field(default_factory=SplitPlan)
    run_dir: str | Path | None = None
    num_threads: int = 64
    optimizers: dict[str, Optimizer] = field(default_factory=dict)  # more steps, by name
    rl_optimizer: Optimizer | None = None  # step "r" (default: GRPO, the RL weight step)

    def __post_init__(self) -> None:
        self.prompt_optimizer = self.prompt_optimizer or RandomSearch(self.metric, num_threads=self.num_threads)
        self.weight_optimizer = self.weight_optimizer or BootstrapFinetune(self.metric, num_threads=self.num_threads)
        self.rl_optimizer = self.rl_optimizer or GRPO(self.metric, num_threads=self.num_threads)
        self.optimizers = {"p": self.prompt_optimizer, "w": self.weight_optimizer, "r": self.rl_optimizer,
                           **self.optimizers}
        if START in self.optimizers:
            raise StrategyError(f"{START!r} names step 0 (the given program); register your optimizer as another name")
        for name, opt in self.optimizers.items():
            check_optimizer(name, opt)
        self.steps = parse_strategy(self.strategy, set(self.optimizers))

    def with_strategy(self, strategy: str) -> "BetterTogether":
        """The same optimizers under another strategy string."""
        from dataclasses import replace

        return replace(self, strategy=strategy)

    # -- the run ---------------------------------------------------------------------
    def compile(
        self, program: Module, *, trainset: list[Example], valset: list[Example], seed: int = 0,
        resume: bool = False, progress: Progress | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        settings: dict | None = None, info: Callable[[str], None] | None = None,
    ) -> CompileResult:
        """Run the strategy on ``program``; ``settings``: the caller's own settings that change a
        step's result (recorded in plan.json and compared on resume, ``tandem.optimize.plan``);
        ``info``: one-line notes for the user (which steps a resumed run reused), else logged."""
        check_dataset("trainset", trainset, minimum=2)
        check_dataset("valset", valset)
        say = info or (lambda msg: log.info("%s", msg))
        run_dir = Path(self.run_dir) if self.run_dir else None
        files_dir = run_dir or Path(tempfile.mkdtemp(prefix="tandem-run-"))  # the steps' out_dir live here
        original = program.deepcopy()  # never touch the caller's program
        history: list[StepRecord] = []  # history[i] scored programs[i]; 0 is the start
        programs: list[Module] = []
        if run_dir is not None:
            plan = self.check_run_dir(original, trainset=trainset, valset=valset, seed=seed, resume=resume,
                                      settings=settings)
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                self._forget_finished(run_dir)  # starting over: none of these steps may be reused later
            write_json(run_dir / "plan.json", plan)
            if resume:
                history, programs = self._load_finished(run_dir, original)
                if history:
                    say(self._reused_text(run_dir, history))
        reused = [r.index for r in history]
        if not history:
            t0 = time.perf_counter()
            start = original.deepcopy()
            val = self._validate(start, valset, "start validation", progress)
            rec = StepRecord(0, START, status="ok", val_score=val.score, wall_s=time.perf_counter() - t0,
                             usage=val.usage.to_dict(), detail="the given program",
                             extra={"val_failures": val.failures})
            self._finish(run_dir, rec, start, history, programs, seed, on_step)

        for i in range(len(history), len(self.steps) + 1):
            kind = self.steps[i - 1]
            step_seed = seed * 100 + (i - 1)  # the position in the strategy, as before step 0 existed
            current = programs[-1]
            t0 = time.perf_counter()
            try:
                out_dir = files_dir / "steps" / f"{i:02d}-{kind}" / "out"
                result = self._run_step(kind, original, current, trainset, step_seed, out_dir, progress)
            except Exception as exc:
                rec = StepRecord(i, kind, status="failed", wall_s=time.perf_counter() - t0,
                                 detail=f"{type(exc).__name__}: {exc}")
                history.append(rec)
                if run_dir is not None:
                    self._write_history(run_dir, history)
                raise
            rec = result.history[-1]
            rec.index, rec.kind = i, kind
            # a skipped step (nothing_to_train, ...) leaves the program as it was
            candidate = result.program if rec.status == "ok" else current
            val = self._validate(candidate, valset, f"step {i} validation", progress)
            rec.val_score = val.score
            rec.wall_s = time.perf_counter() - t0
            rec.usage = _add_usage(rec.usage, val.usage.to_dict())
            rec.extra["val_failures"] = val.failures
            self._finish(run_dir, rec, candidate, history, programs, seed, on_step)

        # The returned program: best validation score, ties to the later step. The start
        # (index 0) loses every tie, so it comes back only if every step scored lower.
        best = max(range(len(programs)), key=lambda j: (history[j].val_score or 0.0, j))
        out = CompileResult(programs[best], history, score=history[best].val_score,
                            extra={"best_step": best, "final_program": programs[-1], "reused_steps": reused})
        if run_dir is not None:
            save_program(out.program, run_dir / "final", seed=seed,
                         extra={"best_step": best, "strategy": self.strategy})
        return out

    def _validate(self, program: Module, valset: list[Example], label: str, progress: Progress | None):
        if progress:
            progress(label, 0, len(valset))
        return evaluate(program, valset, self.metric, num_threads=self.num_threads,
                        progress=(lambda d, t: progress(label, d, t)) if progress else None)

    def _finish(self, run_dir, rec, program, history, programs, seed, on_step) -> None:
        """Record a scored step (or the start): in memory, then on disk, then to ``on_step``."""
        history.append(rec)
        programs.append(program)
        if run_dir is not None:
            self._checkpoint(run_dir, rec.index, rec.kind, program, rec, seed)
            self._write_history(run_dir, history)
        if on_step:
            on_step(rec)

    def _run_step(self, kind, original, current, trainset, seed, out_dir, progress) -> CompileResult:
        """Run step ``kind``'s optimizer, called as every step's is (tandem.optimize.base.Optimizer)."""
        opt = self.optimizers[kind]
        part_train, part_val = self.splits.split(trainset, seed)
        if getattr(opt, "restarts_prompts", False):
            # A prompt optimizer restarts from the original prompts, on the current weights.
            program = original.deepcopy()
            for (_, p), (_, c) in zip(program.named_predictors(), current.named_predictors()):
                p.lm = c.lm
        else:
            program, part_train = current, trainset
        return opt.compile(program, trainset=part_train, valset=part_val, seed=seed, progress=progress,
                           out_dir=out_dir)

    # -- run directory -----------------------------------------------------------------
    def settings(self, program: Module, *, trainset: list[Example], valset: list[Example], seed: int = 0,
                 settings: dict | None = None) -> dict:
        """The settings plan.json records: every one that changes a step's result (tandem.optimize.plan)."""
        return run_settings(strategy_steps=self.steps, seed=seed, metric=self.metric, splits=self.splits,
                            optimizers=self.optimizers, trainset=trainset, valset=valset, program=program,
                            extra=settings)

    def check_run_dir(self, program: Module, *, trainset: list[Example], valset: list[Example], seed: int = 0,
                      resume: bool = False, settings: dict | None = None) -> dict:
        """The plan.json this run writes; raises first if the run directory cannot be used for it.

        Reads only: a caller (``run_cell``) calls it before it writes anything of its own.
        Resuming over finished steps: ``ResumeMismatch`` naming every setting that differs
        from plan.json's, or a ValueError for a plan.json of an older tandem (it recorded
        only the strategy and the seed, so it cannot show that nothing else differed).
        Not resuming: a directory holding finished steps of another strategy or seed is
        refused (use another run directory); one of the same is started over.
        """
        plan = {"version": PLAN_VERSION, "strategy": self.strategy, "steps": self.steps, "seed": seed,
                "splits": vars(self.splits), "start_step": True,
                "settings": self.settings(program, trainset=trainset, valset=valset, seed=seed, settings=settings)}
        run_dir = Path(self.run_dir) if self.run_dir else None
        path = run_dir / "plan.json" if run_dir is not None else None
        if path is None or not path.exists():
            return plan
        old = json.loads(path.read_text())
        finished = any((run_dir / "steps").glob("*/record.json"))
        if not finished:
            return plan  # nothing that could be reused
        if not old.get("start_step"):
            raise ValueError(
                f"{run_dir} holds steps of an older tandem, numbered without the start step "
                f"(steps/00-{self.steps[0]} is now steps/01-{self.steps[0]}); use another run directory"
            )
        if resume:
            if "settings" not in old:
                raise ValueError(
                    f"cannot resume {run_dir}: its steps were made by an older tandem, whose plan.json records "
                    "only the strategy and the seed, so other settings (sizes, candidates, LoRA, ...) may differ; "
                    "start over there without resume, or use another run directory"
                )
            diffs = differences(old["settings"], plan["settings"])
            if diffs:
                raise ResumeMismatch(run_dir, diffs)
        elif old.get("steps") != self.steps or old.get("seed") != seed:
            raise ValueError(
                f"{run_dir} holds a run of strategy {old.get('strategy')!r} seed {old.get('seed')}; "
                f"use another run directory for {self.strategy!r} seed {seed}"
            )
        return plan

    @staticmethod
    def _forget_finished(run_dir: Path) -> None:
        """Mark the steps in ``run_dir`` unfinished (remove their record.json) and drop the steps'
        own checkpoints (an RL step's ``out/checkpoint*``): a fresh run replaces them, never continues them."""
        for record in sorted((run_dir / "steps").glob("*/record.json")):
            record.unlink()
        for ckpt in sorted((run_dir / "steps").glob("*/out/checkpoint*")):
            if ckpt.is_dir():
                shutil.rmtree(ckpt, ignore_errors=True)
            else:
                ckpt.unlink()

    def _reused_text(self, run_dir: Path, history: list[StepRecord]) -> str:
        done = ", ".join("the start" if r.index == 0 else f"step {r.index} ({r.kind})" for r in history)
        left = [f"{i} ({kind})" for i, kind in enumerate(self.steps, 1) if i >= len(history)]
        todo = f"running step(s) {', '.join(left)}" if left else "every step had finished"
        return f"resuming {run_dir}: reused {done}, finished earlier with the same settings; {todo}"

    def _checkpoint(self, run_dir: Path, i: int, kind: str, program: Module, rec: StepRecord, seed: int) -> None:
        d = run_dir / "steps" / f"{i:02d}-{kind}"
        save_program(program, d / "program", seed=seed)
        write_json(d / "record.json", rec.to_dict())  # the record is written last: it marks the step finished

    def _write_history(self, run_dir: Path, history: list[StepRecord]) -> None:
        write_json(run_dir / "history.json", [r.to_dict() for r in history])

    def _load_finished(self, run_dir: Path, original: Module) -> tuple[list[StepRecord], list[Module]]:
        history, programs = [], []
        lms: dict = {}
        for (name, p) in original.named_predictors():
            if p.lm is not None:
                spec = p.lm.spec()
                base = p.lm.with_adapter(None) if spec.get("adapter") and isinstance(p.lm, TrainableLM) else p.lm
                lms.setdefault(f"{spec['backend']}:{spec['model']}", base)
        for i, kind in enumerate([START, *self.steps]):
            d = run_dir / "steps" / f"{i:02d}-{kind}"
            if not (d / "record.json").exists():
                break
            history.append(StepRecord.from_dict(json.loads((d / "record.json").read_text())))
            programs.append(load_program(d / "program", program=original, lms=lms))
        return history, programs


def _add_usage(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}
