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
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

from tandem.evaluate.evaluate import Metric, run_example
from tandem.lm.base import Usage
from tandem.program.example import Example
from tandem.program.module import Module
from tandem.program.predict import hint_override, sampling_override
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
    attempt: int = 0  # 0: greedy; k > 0: the k-th sample
    hinted: bool = False  # run with the gold answer as a hint (rationalization)


#: How an example's kept runs were found, in the order they are tried.
SOURCES = ("greedy", "sampled", "hint", "none")


@dataclass
class BootstrapResult:
    runs: list[BootstrapRun]  # per example: its passing runs (up to traces_per_example), or its last failed one
    usage: Usage
    sources: dict[str, int] = field(default_factory=dict)  # examples per SOURCES entry
    attempts: int = 0  # program runs made, all examples together

    @property
    def passed(self) -> list[BootstrapRun]:
        return [r for r in self.runs if r.passed]

    @property
    def passed_examples(self) -> int:
        """Examples with at least one passing run."""
        return len({id(r.example) for r in self.passed})

    def calls(self, predictor: str) -> list[TraceEntry]:
        """Every call of ``predictor`` in passing runs, in example order then call index."""
        out = []
        for r in self.passed:
            out.extend(sorted((e for e in r.entries if e.predictor == predictor), key=lambda e: e.call_index))
        return out

    def summary(self) -> str:
        n = sum(self.sources.values())
        return (f"{self.passed_examples} of {n} examples passed ({self.sources.get('greedy', 0)} greedily, "
                f"{self.sources.get('sampled', 0)} by sampling, {self.sources.get('hint', 0)} with the answer "
                f"as a hint, {self.sources.get('none', 0)} not at all); {len(self.passed)} passing traces "
                f"from {self.attempts} runs")


def mentions_hint(entries: list[TraceEntry]) -> bool:
    """Whether a hinted run's replies speak of the hint (their training prompt will not show one)."""
    return any(re.search(r"\bhint", e.completion, re.IGNORECASE) for e in entries)


def check_bootstrap_settings(attempts: int, temperature: float, traces_per_example: int, hint_attempts: int) -> None:
    """One-line errors naming the setting, before anything runs."""
    if not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be an integer >= 1 (1: greedy only), not {attempts!r}")
    if not isinstance(traces_per_example, int) or traces_per_example < 1:
        raise ValueError(f"traces_per_example must be an integer >= 1, not {traces_per_example!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, not {temperature!r}")
    if not isinstance(hint_attempts, int) or hint_attempts < 0:
        raise ValueError(f"hint_attempts must be an integer >= 0 (0: no rationalization), not {hint_attempts!r}")


def run_attempt(
    program: Module, example: Example, metric: Metric, index: int, attempt: int, *, hinted: bool = False,
    temperature: float = 0.7, seed: int = 0, threshold: float = PASS_THRESHOLD,
) -> tuple[BootstrapRun, Usage]:
    """One run of ``example``: greedy (``attempt`` 0) or the sample seeded by ``seed`` and ``attempt``.

    ``hinted``: with the example's gold labels as a hint; such a run passes
    only if its replies do not speak of the hint (failure ``hint_leak``).
    """
    with ExitStack() as stack:
        if attempt > 0:
            stack.enter_context(sampling_override(temperature=temperature, seed=seed * 1000 + attempt))
        if hinted:
            stack.enter_context(hint_override(example.labels()))
        rec, t = run_example(program, example, metric, index, metric_trace=True)
    entries = list(t.entries)
    failure = rec.failure
    if failure is None and hinted and mentions_hint(entries):
        failure = "hint_leak"
    run = BootstrapRun(example, rec.prediction, rec.score,
                       failure is None and rec.score >= threshold, entries, failure, attempt, hinted)
    return run, t.usage


def bootstrap(
    program: Module,
    examples: list[Example],
    metric: Metric,
    *,
    num_threads: int = 64,
    threshold: float = PASS_THRESHOLD,
    attempts: int = 1,
    temperature: float = 0.7,
    traces_per_example: int = 1,
    hint_attempts: int = 0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    teacher_for: Callable[[int], Module] | None = None,
) -> BootstrapResult:
    """Run ``program`` on each example concurrently and keep the runs that pass.

    Per example: a greedy run first, then up to ``attempts - 1`` samples at
    ``temperature`` (seeds derived from ``seed`` and the attempt number, so
    reruns repeat and hit the call cache), in waves, stopping once
    ``traces_per_example`` distinct passing runs are found. An example that
    no run passed is then run up to ``hint_attempts`` times (greedy, then
    samples) with its gold labels shown as a hint (rationalization, as in
    STaR); a hinted run passes only if its replies do not speak of the hint,
    and its trace records the inputs without the hint. A small model that
    answers every input alike passes only one class greedily; sampling and
    hints find passing traces for the others, which is what demos and
    fine-tuning need.

    ``teacher_for(i)``: the program to run on example ``i`` (default:
    ``program``), e.g. one with labelled demos of the other examples.
    """
    check_bootstrap_settings(attempts, temperature, traces_per_example, hint_attempts)
    per_example: list[tuple[list[BootstrapRun], str, int, Usage] | None] = [None] * len(examples)

    def attempt_run(prog: Module, i: int, attempt: int, hinted: bool) -> tuple[BootstrapRun, Usage]:
        return run_attempt(prog, examples[i], metric, i, attempt, hinted=hinted, temperature=temperature,
                           seed=seed, threshold=threshold)

    def search(prog: Module, i: int, budget: int, hinted: bool, kept: list[BootstrapRun],
               spent: Usage) -> tuple[BootstrapRun | None, int]:
        """Runs of example ``i`` (greedy, then sampled waves) until enough pass; the last failed run."""
        seen = {tuple(e.completion for e in r.entries) for r in kept}
        last, made, attempt = None, 0, 0
        while attempt < budget and len(kept) < traces_per_example:
            wave = 1 if attempt == 0 else min(budget - attempt, max(2, traces_per_example - len(kept)))
            numbers = range(attempt, attempt + wave)
            if wave == 1 or num_threads == 1:  # one thread: one request at a time, as repeatable as it gets
                tries = [attempt_run(prog, i, a, hinted) for a in numbers]
            else:  # a wave's samples together: one round of latency
                with ThreadPoolExecutor(max_workers=wave) as inner:
                    tries = list(inner.map(lambda a: attempt_run(prog, i, a, hinted), numbers))
            attempt += wave
            made += wave
            for run, u in tries:  # in attempt order, so the result does not depend on timing
                spent.merge(u)
                key = tuple(e.completion for e in run.entries)
                if run.passed and key not in seen and len(kept) < traces_per_example:
                    kept.append(run)
                    seen.add(key)
                elif not run.passed:
                    last = run
        return last, made

    def work(i: int) -> tuple[list[BootstrapRun], str, int, Usage]:
        spent = Usage()
        prog = teacher_for(i) if teacher_for is not None else program
        kept: list[BootstrapRun] = []
        last, made = search(prog, i, attempts, False, kept, spent)
        if kept:
            return kept, ("greedy" if kept[0].attempt == 0 else "sampled"), made, spent
        if hint_attempts:
            last_h, made_h = search(prog, i, hint_attempts, True, kept, spent)
            made += made_h
            if kept:
                return kept, "hint", made, spent
            last = last_h or last
        assert last is not None
        return [last], "none", made, spent

    usage = Usage()
    sources = {s: 0 for s in SOURCES}
    made_total = 0
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(examples) or 1))) as pool:
        for i, (kept, source, made, u) in enumerate(pool.map(work, range(len(examples)))):
            per_example[i] = (kept, source, made, u)
            usage.merge(u)
            sources[source] += 1
            made_total += made
            done += 1
            if progress:
                progress(done, len(examples))
    runs = [r for item in per_example if item is not None for r in item[0]]
    out = BootstrapResult(runs, usage, sources, made_total)
    log.info("bootstrap: %s", out.summary())
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
        prefix. It is not the default: on Iris it saved no time and its
        programs scored lower (docs/benchmarks.md, "Results: prompt step").
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
                progress: Progress | None = None, out_dir=None) -> CompileResult:
        """The optimizer protocol's compile (``out_dir`` is unused: nothing is written)."""
        check_dataset("trainset", trainset)
        boot = self.run_bootstrap(program, trainset)
        new = self.assemble(program, boot, trainset)
        rec = StepRecord(0, "bootstrap", usage=boot.usage.to_dict(), train_examples=len(boot.passed),
                         detail=f"{len(boot.passed)} of {len(trainset)} training runs passed")
        return CompileResult(new, [rec])
