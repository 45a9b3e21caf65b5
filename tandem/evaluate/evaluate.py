"""Evaluate a program on a dataset, concurrently.

Every example runs in its own thread, so the LM backend receives many
requests at once (vLLM batches them continuously). Failures are counted
apart from wrong answers: a reply that does not parse, an exception in the
program, a metric that raises or returns a non-number. A failed example
scores 0 and keeps its error message; it never stops the evaluation. What
stops it is ``LMUnavailable``, a model that cannot be reached at all (every
server down after the retries): the examples not started are dropped and the
error is raised, so a run stops instead of scoring the rest 0.
The metric is called as ``metric(example, prediction, None)`` here (or
without the third argument if it takes none); bootstrapping passes the trace.

    result = evaluate(program, devset, metric, num_threads=64)
    result.score, result.failures, result.records[0].prediction
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from tandem.lm.base import ContextLengthError, LMError, Usage
from tandem.lm.protocol import LMUnavailable
from tandem.program.example import Example, Prediction
from tandem.program.module import Module
from tandem.program.render import ParseError
from tandem.program.trace import Trace, trace

log = logging.getLogger(__name__)

Metric = Callable[..., float]


class MetricError(TypeError):
    """The metric returned something that is not a number (counted as a ``"metric"`` failure)."""


@dataclass
class Record:
    index: int
    example: dict
    prediction: dict | None
    score: float
    failure: str | None = None  # "parse", "context", "lm", "program", "metric"
    error: str | None = None
    trace: list[dict] | None = None
    usage: Usage = field(default_factory=Usage)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    score: float  # mean metric in [0, 100] scale, failures counted as 0
    n: int
    correct: float
    failures: dict[str, int]
    records: list[Record]
    wall_s: float
    usage: Usage = field(default_factory=Usage)

    @property
    def n_failed(self) -> int:
        return sum(self.failures.values())

    def summary(self) -> dict:
        return {
            "score": round(self.score, 2), "n": self.n, "failed": self.n_failed,
            "failures": dict(self.failures), "wall_s": round(self.wall_s, 2), **self.usage.to_dict(),
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "records": [r.to_dict() for r in self.records]}


def metric_takes_trace(metric: Metric) -> bool:
    """Whether ``metric`` accepts a third positional argument (or ``*args``), the trace.

    A callable whose signature cannot be read is given the trace, as the
    metric protocol ``metric(example, prediction, trace=None)`` asks.
    """
    try:
        params = inspect.signature(metric).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)) >= 3


def call_metric(metric: Metric, example: Example, prediction: Prediction, trace_: Trace | None) -> float:
    """Score ``prediction``: ``metric(example, prediction, trace_)``, or ``metric(example, prediction)``
    for a metric whose signature takes no trace. The metric runs once; what it raises, a TypeError
    included, reaches the caller, as does a ``MetricError`` for a result that is not a number.
    """
    if metric_takes_trace(metric):
        value = metric(example, prediction, trace_)
    else:
        value = metric(example, prediction)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise MetricError(f"metric returned {value!r} ({type(value).__name__}); it must return a number or bool")
    return float(value)


def classify_failure(exc: BaseException) -> str:
    if isinstance(exc, ParseError):
        return "parse"
    if isinstance(exc, ContextLengthError):
        return "context"
    if isinstance(exc, LMError):
        return "lm"
    return "program"


def run_example(
    program: Module, example: Example, metric: Metric | None, index: int = 0, keep_trace: bool = False,
    *, metric_trace: bool = False,
) -> tuple[Record, Trace]:
    """Run one example under a trace; never raises for the example's own errors (``LMUnavailable``,
    a model that cannot be reached at all, is raised).

    The metric receives the trace when ``metric_trace`` is set (optimizers
    bootstrapping) and ``None`` otherwise (evaluation), as in DSPy. An
    exception raised by the metric, or a result that is not a number, is the
    example's ``"metric"`` failure.
    """
    with trace(program) as t:
        try:
            pred = program(**example.inputs())
        except LMUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - counted, not raised
            kind = classify_failure(exc)
            rec = Record(index, dict(example), None, 0.0, kind, f"{type(exc).__name__}: {exc}")
            if keep_trace:
                rec.trace = [e.to_dict() for e in t]
            return rec, t
    score, failure, error = 0.0, None, None
    if metric is not None:
        try:
            score = call_metric(metric, example, pred, t if metric_trace else None)
        except Exception as exc:  # noqa: BLE001 - a raising metric is a counted failure
            failure, error = "metric", f"{type(exc).__name__}: {exc}"
    rec = Record(index, dict(example), dict(pred), score, failure, error)
    if keep_trace:
        rec.trace = [e.to_dict() for e in t]
    return rec, t


def evaluate(
    program: Module,
    dataset: Iterable[Example],
    metric: Metric,
    *,
    num_threads: int = 64,
    progress: Callable[[int, int], None] | None = None,
    keep_traces: bool = False,
) -> EvalResult:
    """Run ``program`` on every example and score it with ``metric`` (given ``None`` as the trace).

    ``progress(done, total)`` is called after each example (the CLI draws a
    bar with it). The score is a percentage of the metric's maximum 1.0.
    """
    examples = list(dataset)
    start = time.perf_counter()
    records: list[Record | None] = [None] * len(examples)
    usage = Usage()
    done = 0

    def work(i: int) -> Record:
        rec, t = run_example(program, examples[i], metric, i, keep_traces)
        rec.usage = t.usage
        return rec

    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(examples) or 1))) as pool:
        try:
            for rec in pool.map(work, range(len(examples))):
                records[rec.index] = rec
                usage.merge(rec.usage)
                done += 1
                if progress is not None:
                    progress(done, len(examples))
        except LMUnavailable:
            pool.shutdown(wait=True, cancel_futures=True)  # the examples not started never start
            raise
    wall = time.perf_counter() - start
    recs = [r for r in records if r is not None]
    failures: dict[str, int] = {}
    for r in recs:
        if r.failure:
            failures[r.failure] = failures.get(r.failure, 0) + 1
    correct = sum(r.score for r in recs)
    score = 100.0 * correct / len(recs) if recs else 0.0
    if failures:
        log.info("evaluation: %d of %d examples failed: %s", sum(failures.values()), len(recs), failures)
    return EvalResult(score, len(recs), correct, failures, recs, wall, usage)
