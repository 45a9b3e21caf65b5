"""The prompt step ``p``: bootstrapped few-shot with random search.

Candidates, as in the paper (at most 3 demos per module, 9 candidates by
default: the paper's 6 random candidate programs after the three fixed ones,
which is what DSPy's ``num_candidate_programs=6`` scores):

0. zero-shot (no demos);
1. labelled demos only (a seeded sample of the whole training set);
2. bootstrapped demos, in training order;
3+. seeded random subsets and orders of the bootstrapped demos, each with a
    random number of demos between 1 and the maximum.

``num_candidates`` counts all of them.

The teacher runs once over the training set; every candidate is assembled
from that one bootstrap. All candidates are then evaluated on the validation
set at the same time, once the bootstrap has finished, so the engine sees
one large batch whose demo prefixes it caches (docs/benchmarks.md, "Results:
prompt step", has the timings behind this order). The best score wins; ties
go to the earlier candidate, so the choice is deterministic.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tandem.evaluate.evaluate import EvalResult, Metric, evaluate
from tandem.lm.base import Usage
from tandem.optimize.base import CompileResult, Progress, StepRecord, check_dataset
from tandem.optimize.bootstrap import BootstrapFewShot, BootstrapResult
from tandem.program.example import Example
from tandem.program.module import Module

log = logging.getLogger(__name__)


class RandomSearch:
    """The prompt step (tandem.optimize.base.Optimizer): picks demos for every predictor."""

    #: A prompt optimizer: BetterTogether hands it the original prompts on the current weights.
    restarts_prompts = True

    def __init__(
        self,
        metric: Metric,
        *,
        num_candidates: int = 9,  # zero-shot, labelled, bootstrapped + the paper's 6 random candidates
        max_demos: int = 3,  # the paper's at most 3 demos per module
        max_labeled_demos: int | None = None,
        teacher: Module | None = None,
        num_threads: int = 64,
        attempts: int = 3,  # greedy, then 2 re-samples of each failed training example
    ) -> None:
        if num_candidates < 1:
            raise ValueError("num_candidates must be at least 1")
        self.metric = metric
        self.num_candidates = num_candidates
        self.max_demos = max_demos
        self.fewshot = BootstrapFewShot(
            metric, max_bootstrapped_demos=max_demos,
            max_labeled_demos=max_demos if max_labeled_demos is None else max_labeled_demos,
            teacher=teacher, num_threads=num_threads, attempts=attempts,
        )
        self.num_threads = num_threads

    def candidates(self, program: Module, boot, trainset: list[Example], seed: int) -> list[tuple[str, Module]]:
        out: list[tuple[str, Module]] = [("zero-shot", program.reset_copy())]
        # Labelled demos: a seeded sample of the whole training set, as DSPy's LabeledFewShot.
        labeled = BootstrapFewShot(self.metric, max_bootstrapped_demos=0, max_labeled_demos=self.max_demos)
        out.append(("labeled", labeled.assemble(program, BootstrapResult([], Usage()), trainset, random.Random(seed))))
        out.append(("bootstrapped", self.fewshot.assemble(program, boot, trainset)))
        for i in range(3, self.num_candidates):
            rng = random.Random(seed * 1000 + i)
            size = rng.randint(1, self.max_demos)
            out.append((f"random-{i}(k={size})", self.fewshot.assemble(program, boot, trainset, rng, n_boot=size)))
        return out[: self.num_candidates]

    def compile(
        self, program: Module, *, trainset: list[Example], valset: list[Example], seed: int = 0,
        progress: Progress | None = None, out_dir: str | Path | None = None,
    ) -> CompileResult:
        """The best candidate on ``valset``; ``out_dir`` is accepted for the protocol (nothing is written)."""
        check_dataset("trainset", trainset)
        check_dataset("valset", valset)
        start = time.perf_counter()
        boot = self.fewshot.run_bootstrap(
            program, trainset, progress=(lambda d, t: progress("bootstrap", d, t)) if progress else None
        )
        cands = self.candidates(program, boot, trainset, seed)
        total = len(cands) * len(valset)
        done = [0]
        lock = threading.Lock()

        def tick(_d: int, _t: int) -> None:
            with lock:
                done[0] += 1
                n = done[0]
            if progress:
                progress("candidates", n, total)

        def score(c: tuple[str, Module]) -> EvalResult:
            return evaluate(c[1], valset, self.metric, num_threads=self.num_threads, progress=tick)

        # Candidates run side by side: the engine batches all of them together (one thread: one at a time).
        with ThreadPoolExecutor(max_workers=len(cands) if self.num_threads > 1 else 1) as pool:
            results = list(pool.map(score, cands))
        best = max(range(len(cands)), key=lambda i: (results[i].score, -i))
        usage = Usage()
        usage.merge(boot.usage)
        for r in results:
            usage.merge(r.usage)
        table = [
            {"candidate": name, "score": round(r.score, 2), "failed": r.n_failed,
             "demos": [len(p.demos) for p in prog.predictors()]}
            for (name, prog), r in zip(cands, results)
        ]
        log.info("random search: %s", table)
        rec = StepRecord(
            0, "p", inner_score=results[best].score, wall_s=time.perf_counter() - start,
            usage=usage.to_dict(), train_examples=len(boot.passed),
            detail=f"chose {cands[best][0]} ({results[best].score:.1f}); "
                   f"{len(boot.passed)} of {len(trainset)} bootstrap runs passed",
            extra={"candidates": table, "bootstrap_passed": len(boot.passed)},
        )
        return CompileResult(cands[best][1], [rec], score=results[best].score)
