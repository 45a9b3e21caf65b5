"""tandem.experiments.stats against hand computations and scipy; the statistics section and table.md."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from tandem.experiments.stats import (
    BOOTSTRAP, MCNEMAR, RunOutcomes, bootstrap_diff, compare_strategies, mcnemar_exact, mean_ci, paired_test,
)
from tandem.experiments.table import statistics_section, table_markdown


# -- intervals over runs ----------------------------------------------------------------------
def test_mean_ci_is_the_student_t_interval():
    # n = 4: mean 2.5, s = sqrt(5/3), t_{0.975, 3} = 3.182446305284263 (tables: 3.182)
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert mean == 2.5
    assert lo == pytest.approx(2.5 - half, abs=1e-9) and lo == pytest.approx(0.44574, abs=1e-5)
    assert hi == pytest.approx(2.5 + half, abs=1e-9)
    # 90%: t_{0.95, 3} = 2.353363434801823
    _, lo90, hi90 = mean_ci([1.0, 2.0, 3.0, 4.0], level=0.90)
    assert hi90 - lo90 == pytest.approx(2 * 2.353363434801823 * math.sqrt(5 / 3) / 2, abs=1e-9)
    # equal values: a zero-width interval
    assert mean_ci([7.0, 7.0, 7.0]) == (7.0, 7.0, 7.0)


def test_one_run_has_no_interval_and_no_run_is_an_error():
    mean, lo, hi = mean_ci([46.0])
    assert mean == 46.0 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


# -- McNemar --------------------------------------------------------------------------------------
def _table(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[int], list[int]]:
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return a, b


def test_mcnemar_exact_is_a_binomial_test_on_the_discordant_pairs():
    a, b = _table(both=6, a_only=7, b_only=2, neither=5)
    p = mcnemar_exact(a, b)
    # by hand: 2 * P(X <= 2), X ~ Bin(9, 1/2) = 2 * (1 + 9 + 36) / 512
    assert p == pytest.approx(92 / 512, abs=1e-12)
    assert p == pytest.approx(sps.binomtest(2, 9, 0.5).pvalue, abs=1e-12)
    assert mcnemar_exact(b, a) == pytest.approx(p, abs=1e-12)  # two-sided: symmetric
    # a lopsided table, against scipy
    a, b = _table(both=30, a_only=15, b_only=1, neither=4)
    assert mcnemar_exact(a, b) == pytest.approx(sps.binomtest(1, 16, 0.5).pvalue, abs=1e-12)
    assert mcnemar_exact(a, b) == pytest.approx(2 * 17 / 2 ** 16, abs=1e-12)
    # a balanced table: p is capped at 1; no discordant pair: 1
    assert mcnemar_exact(*_table(3, 4, 4, 3)) == 1.0
    assert mcnemar_exact(*_table(5, 0, 0, 5)) == 1.0
    with pytest.raises(ValueError, match="0 or 1"):
        mcnemar_exact([0.5, 1.0], [1.0, 0.0])


def test_paired_test_on_01_outcomes_uses_mcnemar():
    a, b = _table(both=6, a_only=7, b_only=2, neither=5)
    t = paired_test(a, b)
    assert t.method == MCNEMAR and t.n == 20 and (t.a_better, t.b_better) == (7, 2)
    assert t.diff == pytest.approx(0.25)
    assert t.p_value == pytest.approx(92 / 512, abs=1e-12)
    lo, hi = t.ci95
    assert lo < 0.25 < hi and -0.2 < lo and hi < 0.6
    with pytest.raises(ValueError, match="one length"):
        paired_test([1, 0], [1])


# -- the paired bootstrap ----------------------------------------------------------------------
def test_bootstrap_identical_programs_give_p_1():
    a = np.linspace(0.1, 0.9, 50)
    t = paired_test(a, a)
    assert t.method == BOOTSTRAP and t.p_value == 1.0 and t.ci95 == (0.0, 0.0) and t.diff == 0.0
    assert (t.a_better, t.b_better) == (0, 0)


def test_bootstrap_clearly_different_programs_give_the_smallest_p():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.2, 0.6, 100)
    a = b + 0.3 + rng.normal(0, 0.05, 100)
    t = paired_test(a, b)
    assert t.method == BOOTSTRAP and t.n == 100
    assert t.p_value == pytest.approx(1 / 10_001)  # no resample as far from the mean as 0 is
    assert t.diff == pytest.approx(float(np.mean(a - b)))
    assert 0.28 < t.ci95[0] < t.diff < t.ci95[1] < 0.32


def test_bootstrap_agrees_with_the_normal_theory_on_a_moderate_effect():
    rng = np.random.default_rng(7)
    d = rng.normal(0.05, 0.3, 400)
    lo, hi, p = bootstrap_diff(d)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - 1.96 * se, abs=0.1 * se * 1.96)
    assert hi == pytest.approx(d.mean() + 1.96 * se, abs=0.1 * se * 1.96)
    assert p == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue, abs=0.01)


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    d = rng.normal(0.02, 0.2, 60)
    assert bootstrap_diff(d, seed=5) == bootstrap_diff(d, seed=5)
    assert bootstrap_diff(d, seed=5) != bootstrap_diff(d, seed=6)
    a = rng.uniform(size=60)
    assert paired_test(a, a - d) == paired_test(a, a - d)


# -- strategies with several runs ---------------------------------------------------------------
def test_compare_strategies_pairs_runs_by_split_and_seed_and_pools_examples():
    def outcomes(bits):
        return {i: float(v) for i, v in enumerate(bits)}

    a = [RunOutcomes(0, 0, 60.0, outcomes([1, 1, 1, 0, 1])),
         RunOutcomes(0, 1, 80.0, outcomes([1, 1, 1, 1, 0])),
         RunOutcomes(1, 0, 40.0, outcomes([1, 0, 0, 1, 1])),
         RunOutcomes(2, 0, 99.0, outcomes([1, 1, 1, 1, 1]))]  # no partner in b
    b = [RunOutcomes(0, 0, 40.0, outcomes([0, 1, 0, 0, 1])),
         RunOutcomes(0, 1, 60.0, outcomes([0, 1, 1, 0, 1])),
         RunOutcomes(1, 0, 50.0, {**outcomes([1, 0, 1, 1, 0]), 9: 1.0})]  # example 9: not in a
    c = compare_strategies(a, b)
    assert c.run_pairs == 3 and c.unpaired == 1
    diffs = [20.0, 20.0, -10.0]
    assert c.diff == pytest.approx(10.0)
    half = sps.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / math.sqrt(3)
    assert c.diff_ci95 == pytest.approx((10.0 - half, 10.0 + half))
    # pooled: 15 example pairs; a better on 2 + 2 + 1 = 5, b better on 0 + 1 + 1 = 2
    t = c.test
    assert t.method == MCNEMAR and t.n == 15 and (t.a_better, t.b_better) == (5, 2)
    assert t.p_value == pytest.approx(sps.binomtest(2, 7, 0.5).pvalue, abs=1e-12)
    assert t.diff == pytest.approx(3 / 15)


def test_compare_strategies_with_one_run_pair_or_none():
    one = compare_strategies([RunOutcomes(0, 0, 50.0, {0: 1.0, 1: 0.0})], [RunOutcomes(0, 0, 0.0, {0: 0.0, 1: 0.0})])
    assert one.diff == 50.0 and one.diff_ci95 is None and one.run_pairs == 1 and one.test.n == 2
    no_records = compare_strategies([RunOutcomes(0, 0, 50.0)], [RunOutcomes(0, 0, 40.0)])
    assert no_records.diff == 10.0 and no_records.test is None
    assert compare_strategies([RunOutcomes(0, 0, 50.0)], [RunOutcomes(1, 0, 40.0)]) is None


# -- the table and the statistics ---------------------------------------------------------------
T_975_1 = 12.706204736174707  # Student t, 97.5%, 1 degree of freedom


def test_table_has_strategies_by_tasks_with_intervals_paired_tests_and_the_paper():
    def cell(task, strategy, seed, score, dev=None, status="ok", history=()):
        return {"task": task, "model": "m", "strategy": strategy, "seed": seed, "status": status,
                "test_score": score, "dev_score": dev, "sizes": {"train": 1, "dev": 1, "test": 1},
                "history": list(history), "wall_s": 10.0}

    start = {"index": 0, "kind": "start", "val_score": 40.0, "wall_s": 1.0}  # the given program: not a step
    steps = [start, {"index": 1, "kind": "p", "val_score": 70.0, "wall_s": 2.0},
             {"index": 2, "kind": "w", "val_score": 75.0, "wall_s": 3.0}]
    doc = {"experiment": {"tasks": ["iris", "gsm8k"], "models": ["m"], "seeds": [0, 1],
                          "strategies": ["zero-shot", "p -> w"], "out": "x"},
           "cells": [cell("iris", "zero-shot", 0, 50.0, 40.0), cell("iris", "zero-shot", 1, 60.0, 44.0),
                     cell("iris", "p -> w", 0, 80.0, 75.0, history=steps),
                     cell("iris", "p -> w", 1, None, status="pending"),
                     cell("gsm8k", "zero-shot", 0, 10.0, 12.0)]}
    stats = statistics_section(doc)
    zs = stats["iris"]["m"]["strategies"]["zero-shot"]
    assert zs["test_mean"] == 55.0 and zs["runs"] == 2 and zs["dev_mean"] == 42.0
    assert zs["test_ci95"] == [0.0, 100.0]  # 55 -/+ 12.706 * 5 (s/sqrt(n) = 5), clipped to the scores' range
    assert zs["dev_ci95"] == pytest.approx([42 - T_975_1 * 2, 42 + T_975_1 * 2], abs=0.006)
    assert stats["iris"]["m"]["strategies"]["p -> w"] == {"test_mean": 80.0, "test_ci95": None, "dev_mean": 75.0,
                                                         "dev_ci95": None, "runs": 1}
    assert stats["iris"]["m"]["best_combined"] == "p -> w"
    # paired by (split, seed): seed 0 only; no records in these runs, so no per-example test
    assert stats["iris"]["m"]["comparisons"] == [{
        "a": "p -> w", "b": "zero-shot", "diff": 30.0, "diff_ci95": None, "p_value": None, "method": None,
        "pairs": 0, "run_pairs": 1, "example_diff": None, "example_diff_ci95": None, "a_better": None,
        "b_better": None}]
    assert stats["gsm8k"]["m"]["comparisons"] == []

    md = table_markdown(doc)
    ours = md.split("## Ours: m")[1].split("\n\n")[2].splitlines()
    assert ours[0] == "| strategy | Iris | GSM8K |"
    assert ours[2] == "| zero-shot | 55.0 [0.0, 100.0] (n=2) | **10.0 (n=1, no interval)** |"
    assert ours[3] == "| p -> w | **80.0 (n=1, no interval)** | – |"
    times = md.split("Mean time per run")[1].split("\n\n")[1].splitlines()
    assert times[3] == "| p -> w | 6.0 | – |"  # the start's time counts, as the run spent it
    paired = md.split("### Paired tests: Iris, m")[1].split("\n\n")[2].splitlines()
    assert paired[0].startswith("| a | b | diff a − b (points) | 95% CI over runs | p |")
    assert paired[2] == "| p -> w | zero-shot | +30.0 | – (1 run pair) | – | no records | – | 0 | 1 |"
    assert "### Paired tests: GSM8K" not in md
    paper = md.split("## Paper (Table 1)")[1]
    assert "| zero-shot | 26.0 / 0.0 / 48.0 | 40.3 / 24.0 / 72.7 |" in paper
    assert "mistral-7b / llama-2-7b / llama-3-8b" in md
    assert "1 pending" in md


def _records(path: Path, scores: list[float], baseline: bool = False) -> None:
    recs = [{"index": i, "example": {"x": i}, "prediction": {}, "score": v, "failure": None, "error": None}
            for i, v in enumerate(scores)]
    path.write_text(json.dumps({"records": recs} if baseline else recs))


def test_statistics_pool_the_examples_of_paired_runs_and_fall_back_to_baselines(tmp_path):
    cells = []
    for seed, (scores, test) in enumerate([([1, 1, 0, 1], 75.0), ([1, 0, 0, 1], 50.0)]):
        run = tmp_path / f"p-s{seed}"
        run.mkdir()
        _records(run / "test_records.json", scores)
        _records(run / "baseline_records.json", [0, 1, 0, 0], baseline=True)
        cells.append({"task": "iris", "model": "m", "strategy": "p", "seed": seed, "split_seed": 0, "status": "ok",
                      "test_score": test, "dev_score": 50.0, "zero_shot_test_score": 25.0, "run_dir": str(run)})
    doc = {"experiment": {"tasks": ["iris"], "models": ["m"], "seeds": [0, 1], "strategies": ["p"], "out": "x"},
           "cells": cells}
    (comp,) = statistics_section(doc)["iris"]["m"]["comparisons"]
    # no zero-shot strategy: each run against its own baseline; a better on 2 + 2 examples, b on 0 + 1
    half = T_975_1 * statistics.stdev([50.0, 25.0]) / math.sqrt(2)
    assert comp["a"] == "p" and comp["b"] == "zero-shot" and comp["method"] == "mcnemar-exact"
    assert (comp["pairs"], comp["run_pairs"], comp["a_better"], comp["b_better"]) == (8, 2, 4, 1)
    assert comp["p_value"] == pytest.approx(sps.binomtest(1, 5, 0.5).pvalue) == 0.375
    assert comp["diff"] == 37.5 and comp["diff_ci95"] == pytest.approx([37.5 - half, 37.5 + half], abs=0.006)
    assert comp["example_diff"] == 37.5
    lo, hi, _ = bootstrap_diff([1, 0, 0, 1, 1, -1, 0, 1])  # the 8 pooled differences
    assert comp["example_diff_ci95"] == [round(100 * lo, 2), round(100 * hi, 2)]
    assert comp["example_diff_ci95"][0] < 37.5 < comp["example_diff_ci95"][1]
