"""Bootstrapping: run a program on training inputs and keep what passed.

Both BetterTogether steps start here. A teacher program (by default the
program itself) runs over training examples under a trace; the metric
receives the example, the prediction and the trace; every module call of a
passing run is kept. Calls are identified by predictor name and call index,
never by position in the trace, so a module called a variable number of
times per example cannot shift the others.

``BootstrapFewShot`` turns passing traces into demos.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from tandem.evaluate.evaluate import Metric, run_example
from tandem.lm.base import Usage
from tandem.program.example import Example
from tandem.program.module import Module
from tandem.program.predict import sampling_override
from tandem.program.trace import TraceEntry
from tandem.optimize.base import CompileResult, Progress, StepRecord, check_dataset

log = logging.getLogger(__name__)

#: A score at or above this counts as passing (metrics may return floats, e.g. F1).
PASS_THRESHOLD = 1.0


@dataclass
class BootstrapRun:
    example: Example
    prediction: dict | None
    score: float
    passed: bool
    entries: list[TraceEntry]  # the trace of this run
    failure: str | None = None
    attempt: int = 0  # 0: greedy; k > 0: the k-th re-sample


@dataclass
class BootstrapResult:
    runs: list[BootstrapRun]
    usage: Usage

    @property
    def passed(self) -> list[BootstrapRun]:
        return [r for r in self.runs if r.passed]

    def calls(self, predictor: str) -> list[TraceEntry]:
        """Every call of ``predictor`` in passing runs, in example order then call index."""
        out = []
        for r in self.passed:
            out.extend(sorted((e for e in r.entries if e.predictor == predictor), key=lambda e: e.call_index))
        return out


def bootstrap(
    program: Module,
    examples: list[Example],
    metric: Metric,
    *,
    num_threads: int = 64,
    threshold: float = PASS_THRESHOLD,
    attempts: int = 1,
    temperature: float = 0.7,
    progress: Callable[[int, int], None] | None = None,
    teacher_for: Callable[[int], Module] | None = None,
) -> BootstrapResult:
    """Run ``program`` on each example concurrently and score it with the trace.

    An example that fails greedily is tried again up to ``attempts - 1`` times,
    sampled at ``temperature`` with seeds 1, 2, ... (deterministic, cacheable).
    A small model that answers every input alike passes only the examples of
    one class greedily; re-sampling finds passing traces for the others, which
    is what demos and fine-tuning need (DSPy's bootstrap re-samples failed
    examples the same way, over several rounds). The re-samples of one
    example run at the same time, and the first passing one in seed order is
    kept, so the result does not depend on which finishes first.

    ``teacher_for(i)``: the program to run on example ``i`` (default:
    ``program``), e.g. one with labelled demos of the other examples.
    """
    runs: list[BootstrapRun | None] = [None] * len(examples)
    usage = Usage()

    def attempt_run(prog: Module, i: int, attempt: int) -> tuple[BootstrapRun, Usage]:
        if attempt == 0:
            rec, t = run_example(prog, examples[i], metric, i)
        else:
            with sampling_override(temperature=temperature, seed=attempt):
                rec, t = run_example(prog, examples[i], metric, i)
        run = BootstrapRun(
            examples[i], rec.prediction, rec.score,
            rec.failure is None and rec.score >= threshold, list(t.entries), rec.failure,
        )
        run.attempt = attempt
        return run, t.usage

    def work(i: int) -> tuple[BootstrapRun, Usage]:
        spent = Usage()
        prog = teacher_for(i) if teacher_for is not None else program
        run, u = attempt_run(prog, i, 0)
        spent.merge(u)
        if run.passed or attempts <= 1:
            return run, spent
        # The re-samples together: one round of latency instead of attempts - 1.
        # (Issuing them with the greedy try, before it fails, gained nothing:
        # benchmarks/results/prompt_step_scheduling.json.)
        with ThreadPoolExecutor(max_workers=attempts - 1) as inner:
            tries = list(inner.map(lambda a: attempt_run(prog, i, a), range(1, attempts)))
        for _r, u in tries:
            spent.merge(u)
        passed = [r for r, _ in tries if r.passed]
        return (passed[0] if passed else tries[-1][0]), spent

    done = 0
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(examples) or 1))) as pool:
        for i, (run, u) in enumerate(pool.map(work, range(len(examples)))):
            runs[i] = run
            usage.merge(u)
            done += 1
            if progress:
                progress(done, len(examples))
    out = BootstrapResult([r for r in runs if r is not None], usage)
    log.info("bootstrap: %d of %d runs passed", len(out.passed), len(examples))
    return out


def demo_from_entry(entry: TraceEntry) -> dict:
    return {**entry.inputs, **entry.outputs}


def labeled_demo(program_predictor, example: Example) -> dict | None:
    """A demo from the raw labels, when the example holds every field the predictor needs."""
    sig = program_predictor.signature
    demo = {f.name: example[f.name] for f in sig.fields if f.name in example}
    needed = [f.name for f in sig.input_fields] + [
        f.name for f in sig.output_fields if f.name != "reasoning"
    ]
    return demo if all(n in demo for n in needed) else None


class BootstrapFewShot:
    """Demos from the teacher's passing traces, topped up with labelled examples.

    Each predictor gets at most ``max_bootstrapped_demos`` demos from passing
    traces (its own calls, in example order) and, to reach ``max_labeled_demos``
    in total, labelled training examples that contain its fields.
    """

    def __init__(
        self,
        metric: Metric,
        *,
        max_bootstrapped_demos: int = 3,
        max_labeled_demos: int = 3,
        teacher: Module | None = None,
        num_threads: int = 64,
        attempts: int = 3,
        labeled_teacher: bool = True,
    ) -> None:
        self.metric = metric
        self.attempts = attempts
        # As DSPy's BootstrapFewShot: without an explicit teacher, the program
        # runs on each training example with up to max_labeled_demos labelled
        # demos of *other* examples, so a model that cannot follow the format
        # zero-shot still produces passing traces, of more than one class.
        self.labeled_teacher = labeled_teacher
        self.teacher_demos = "per_example"  # or "shared": see _labeled_teachers
        self.max_bootstrapped_demos = max_bootstrapped_demos
        self.max_labeled_demos = max_labeled_demos
        self.teacher = teacher
        self.num_threads = num_threads

    def run_bootstrap(self, program: Module, trainset: list[Example], progress=None) -> BootstrapResult:
        teacher = self.teacher or program
        teacher_for = None
        if self.teacher is None and self.labeled_teacher and self.max_labeled_demos > 0 and len(trainset) > 1:
            teacher_for = self._labeled_teachers(program, trainset)
        return bootstrap(teacher, trainset, self.metric, num_threads=self.num_threads, attempts=self.attempts,
                         progress=progress, teacher_for=teacher_for)

    def _labeled_teachers(self, program: Module, trainset: list[Example]) -> Callable[[int], Module]:
        """Example i's teacher: the program with labelled demos of up to k *other* examples.

        ``teacher_demos = "per_example"`` (the default): a seeded sample for
        each example, so reruns are identical and hit the call cache.
        ``"shared"``: every teacher shows the same k examples (the first k of
        one seeded order), an example never its own label (it gets the next
        one instead), as DSPy's teacher does; the engine then caches one demo
        prefix. With 9 candidates that saved no time on Iris and chose
        worse programs (val 38.6% against 47.1%, median of 4 rounds each;
        benchmarks/prompt_step.py), so it is not the default.
        """
        order = list(range(len(trainset)))
        random.Random(0).shuffle(order)

        def teacher_for(i: int) -> Module:
            t = program.reset_copy()
            if self.teacher_demos == "shared":
                others = [trainset[j] for j in order if j != i]
            else:
                others = [ex for j, ex in enumerate(trainset) if j != i]
                random.Random(i).shuffle(others)
            for _name, pred in t.named_predictors():
                pred.demos = self._top_up([], pred, others)
            return t
        return teacher_for

    def assemble(
        self, program: Module, boot: BootstrapResult, trainset: list[Example], rng: random.Random | None = None,
        n_boot: int | None = None,
    ) -> Module:
        """A copy of ``program`` with demos built from ``boot`` (shuffled with ``rng`` if given)."""
        new = program.reset_copy()
        used = {id(r.example) for r in boot.passed}
        for name, pred in new.named_predictors():
            calls = boot.calls(name)
            if rng is not None:
                calls = list(calls)
                rng.shuffle(calls)
            k = self.max_bootstrapped_demos if n_boot is None else n_boot
            demos = [demo_from_entry(e) for e in calls[:k]]
            pool = [ex for ex in trainset if id(ex) not in used]
            if rng is not None:
                pool = list(pool)
                rng.shuffle(pool)
            pred.demos = self._top_up(demos, pred, pool)
        return new

    def _top_up(self, demos: list[dict], pred, pool: list[Example]) -> list[dict]:
        """``demos`` plus labelled demos from ``pool``, in order, up to max_labeled_demos in all."""
        demos = list(demos)
        for ex in pool:
            if len(demos) >= self.max_labeled_demos:
                break
            d = labeled_demo(pred, ex)
            if d is not None:
                demos.append(d)
        return demos

    def compile(self, program: Module, *, trainset: list[Example], valset=None, seed: int = 0,
                progress: Progress | None = None) -> CompileResult:
        check_dataset("trainset", trainset)
        boot = self.run_bootstrap(program, trainset)
        new = self.assemble(program, boot, trainset)
        rec = StepRecord(0, "bootstrap", usage=boot.usage.to_dict(), train_examples=len(boot.passed),
                         detail=f"{len(boot.passed)} of {len(trainset)} training runs passed")
        return CompileResult(new, [rec])
