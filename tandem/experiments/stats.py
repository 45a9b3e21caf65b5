"""Uncertainty for experiment results: intervals over runs, paired tests over test examples.

    mean, lo, hi = mean_ci([46.0, 52.0, 40.0])        # Student-t 95% interval over runs
    t = paired_test(scores_a, scores_b)                # same test examples, two programs
    t.diff, t.ci95, t.p_value, t.method, t.n
    c = compare_strategies(runs_a, runs_b)             # several runs per strategy
    c.diff, c.diff_ci95, c.run_pairs, c.test.p_value

Which test and why (docs/design.md, "Statistics"):

- ``mean_ci``: the runs of one strategy (optimizer seeds x data splits) are
  a small sample of what the strategy gives; the mean's interval uses
  Student's t with n - 1 degrees of freedom. One run has no interval (the
  bounds are nan).
- ``paired_test`` with 0/1 outcomes (accuracy): the exact McNemar test. Only
  the discordant examples (one program right, the other wrong) carry
  information; under "no difference" each is equally likely to go either
  way, so their split is Binomial(b + c, 1/2) and the two-sided p-value is
  ``min(1, 2 * P(X <= min(b, c)))``. Exact, so it holds for the handful of
  discordant examples a 50-example test split gives.
- ``paired_test`` with continuous outcomes (F1 and the like): a paired
  bootstrap of the per-example differences (10,000 seeded resamples). The
  p-value is the share of resampled means, centred on the observed mean,
  at least as far from it as the observed mean is from 0 (two-sided, with
  the +1 correction); the interval is the percentile interval. The
  interval of a 0/1 comparison is computed the same way.

This module is pure numpy/scipy (no tandem imports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as _sps

RESAMPLES = 10_000
SEED = 0
MCNEMAR = "mcnemar-exact"
BOOTSTRAP = "paired-bootstrap"


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean and its Student-t interval over independent runs.

    ``lo, hi = mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample
    standard deviation. With one value there is no interval: ``lo`` and ``hi``
    are nan (a caller writes "no interval", or null in JSON). With no values: ValueError.
    """
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = float(_sps.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


@dataclass
class PairedTest:
    """Two programs on the same examples: ``diff`` = mean of a - b (the outcomes' units)."""

    diff: float
    ci95: tuple[float, float]  # percentile interval of the mean difference (paired bootstrap)
    p_value: float  # two-sided, "a and b do equally well"
    method: str  # MCNEMAR (every outcome 0 or 1) or BOOTSTRAP
    n: int  # example pairs
    a_better: int = 0  # pairs where a scored higher (for 0/1: McNemar's discordant count b)
    b_better: int = 0  # pairs where b scored higher (McNemar's c)


def is_binary(*arrays: Sequence[float]) -> bool:
    """True when every value of every array is 0 or 1."""
    return all(np.isin(np.asarray(a, dtype=float), (0.0, 1.0)).all() for a in arrays)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes: a binomial test on the discordant pairs."""
    a, b = _pair(a, b)
    if not is_binary(a, b):
        raise ValueError("mcnemar_exact needs outcomes that are all 0 or 1")
    a_only = int(np.sum((a == 1) & (b == 0)))
    b_only = int(np.sum((a == 0) & (b == 1)))
    n = a_only + b_only
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * _sps.binom.cdf(min(a_only, b_only), n, 0.5)))


def bootstrap_diff(d: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = 0.95) -> tuple[float, float, float]:
    """``(lo, hi, p_value)`` of the mean of paired differences ``d`` by the bootstrap.

    Each resample draws ``len(d)`` differences with replacement (with at most
    64 distinct values, as multinomial counts over them: the same
    distribution, and much cheaper). ``lo, hi``: the
    percentile interval. ``p_value``: ``(1 + #{|m* - m| >= |m|}) / (1 + resamples)``,
    the resampled means ``m*`` centred on the observed mean ``m`` standing in for
    the null distribution; identical programs (every difference 0) give 1.
    Deterministic for a given ``seed``.
    """
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        raise ValueError("bootstrap_diff needs at least one pair")
    rng = np.random.default_rng(seed)
    values, counts = np.unique(d, return_counts=True)
    few = values.size <= 64  # 0/1 outcomes: differences in {-1, 0, 1}
    chunk = max(1, min(resamples, 2_000_000 // (values.size if few else d.size)))
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        if few:
            means[start:start + k] = rng.multinomial(d.size, counts / d.size, size=k) @ values / d.size
        else:
            means[start:start + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    m = float(d.mean())
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    extreme = int(np.sum(np.abs(means - m) >= abs(m) - 1e-12))  # the tolerance: float sums
    return float(lo), float(hi), float(min(1.0, (1 + extreme) / (1 + resamples)))


def paired_test(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES,
                seed: int = SEED) -> PairedTest:
    """Two programs' outcomes on the same examples, in the same order (a[i] and b[i]: example i).

    0/1 outcomes: exact McNemar p-value. Otherwise: paired-bootstrap p-value.
    Either way ``ci95`` is the paired bootstrap's 95% interval of the mean difference.
    """
    a, b = _pair(a, b)
    d = a - b
    lo, hi, p_boot = bootstrap_diff(d, resamples=resamples, seed=seed)
    binary = is_binary(a, b)
    return PairedTest(diff=float(d.mean()), ci95=(lo, hi), p_value=mcnemar_exact(a, b) if binary else p_boot,
                      method=MCNEMAR if binary else BOOTSTRAP, n=int(d.size),
                      a_better=int(np.sum(d > 0)), b_better=int(np.sum(d < 0)))


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes need two 1-d sequences of one length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no pairs to compare")
    return a, b


# -- strategies with several runs ---------------------------------------------------------
@dataclass
class RunOutcomes:
    """One finished run: what pairs it (``split``, ``seed``), its score, its per-example outcomes."""

    split: Hashable  # the data split (data seed): runs on one split share their test examples
    seed: Hashable  # the optimizer seed
    score: float  # the run's own score, e.g. test accuracy %
    outcomes: Mapping[Hashable, float] = field(default_factory=dict)  # example key -> outcome (0..1)


@dataclass
class StrategyComparison:
    """Strategy a against strategy b over paired runs.

    ``diff`` / ``diff_ci95``: the mean of the paired run differences
    ``score_a - score_b`` and its Student-t interval (None with one run pair).
    ``test``: the paired test on every example pair pooled over the run pairs
    (None when no run pair has per-example outcomes for common examples).
    """

    diff: float
    diff_ci95: tuple[float, float] | None
    run_pairs: int
    test: PairedTest | None
    unpaired: int  # runs of a or b without a partner of the same (split, seed)


def compare_strategies(runs_a: Sequence[RunOutcomes], runs_b: Sequence[RunOutcomes], *,
                       resamples: int = RESAMPLES, seed: int = SEED) -> StrategyComparison | None:
    """Compare two strategies that each ran over several (data split, optimizer seed) pairs.

    What is paired: run ``i`` of a with the run of b that has the same data
    split and the same seed (runs without such a partner are left out and
    counted in ``unpaired``); within a run pair, a's and b's outcomes on the
    same test example (same key). Every example pair of every run pair enters
    one pooled ``paired_test``: "on a test example of one of these runs, does
    a do better than b?". The pooled test treats the pairs as independent;
    when one example appears in several run pairs (several seeds on one
    split, test sets that overlap across splits) they are not, and its
    p-value is then too small. The run-level interval ``diff_ci95`` (one
    difference per run pair) answers "would a new run of a beat a new run of
    b?" and takes the seeds' and splits' variation into account.
    None when no run pairs.
    """
    by_key = {(r.split, r.seed): r for r in runs_b}
    pairs = [(r, by_key[(r.split, r.seed)]) for r in runs_a if (r.split, r.seed) in by_key]
    if not pairs:
        return None
    unpaired = len(runs_a) + len(runs_b) - 2 * len(pairs)
    diffs = [ra.score - rb.score for ra, rb in pairs]
    mean, lo, hi = mean_ci(diffs)
    xs: list[float] = []
    ys: list[float] = []
    for ra, rb in pairs:
        for key, value in ra.outcomes.items():
            if key in rb.outcomes:
                xs.append(float(value))
                ys.append(float(rb.outcomes[key]))
    test = paired_test(xs, ys, resamples=resamples, seed=seed) if xs else None
    return StrategyComparison(diff=mean, diff_ci95=None if math.isnan(lo) else (lo, hi),
                              run_pairs=len(pairs), test=test, unpaired=unpaired)
