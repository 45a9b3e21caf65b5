"""An experiment's numbers: the ``statistics`` section of results.json, and table.md.

    doc["statistics"] = statistics_section(doc)   # doc: an experiment's results.json
    text = table_markdown(doc)                     # Table 1 with intervals, and paired tests

``statistics_section`` gives, per task and model::

    {"strategies": {"p": {"test_mean": 46.0, "test_ci95": [38.1, 53.9], "dev_mean": 44.2,
                          "dev_ci95": [40.0, 48.4], "runs": 15}, ...},
     "best_combined": "p -> w -> p",
     "comparisons": [{"a": "p", "b": "zero-shot", "diff": 12.3, "diff_ci95": [8.0, 16.6],
                      "p_value": 0.0004, "method": "mcnemar-exact", "pairs": 750, "run_pairs": 15,
                      "example_diff": 12.3, "example_diff_ci95": [9.1, 15.5],
                      "a_better": 130, "b_better": 38}, ...]}

Scores are percentages; a ``*_ci95`` is null where there is no interval
(one run). Comparisons: every strategy against zero-shot, against ``p``
and against ``w`` (those present; each unordered pair once), which includes
the best combined strategy (the ``->`` strategy with the highest mean dev
score, chosen on dev so that the test comparison is not chosen by its own
outcome) against each single-step one. How runs and examples are paired:
``tandem.experiments.stats.compare_strategies``. When the experiment has no
zero-shot strategy, each run is compared with its own zero-shot baseline
(``baseline_records.json``, the unoptimized program on the same test split).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

from tandem.experiments.paper import PAPER_MODELS, normalize_strategy, paper_cell, task_label
from tandem.experiments.run import BASELINE_RECORDS, TEST_RECORDS, ZERO_SHOT, read_json
from tandem.experiments.stats import RunOutcomes, compare_strategies, mean_ci

REFERENCES = (ZERO_SHOT, "p", "w")  # what every strategy is compared with


# -- the statistics section -------------------------------------------------------------------
def statistics_section(doc: dict) -> dict:
    """``{task: {model: {"strategies", "best_combined", "comparisons"}}}`` of the finished runs."""
    exp = doc["experiment"]
    strategies = [normalize_strategy(s) for s in exp["strategies"]]
    ok = [e for e in doc["cells"] if e.get("status") == "ok" and e.get("test_score") is not None]
    out: dict = {}
    for task in [Path(t).stem for t in exp["tasks"]]:
        for model in exp["models"]:
            mine = [e for e in ok if e["task"] == task and e["model"] == model]
            by_s = {s: [e for e in mine if e["strategy"] == s] for s in strategies}
            by_s = {s: runs for s, runs in by_s.items() if runs}
            if not by_s:
                continue
            summary = {s: _strategy_summary(runs) for s, runs in by_s.items()}
            combined = [s for s in by_s if "->" in s and summary[s]["dev_mean"] is not None]
            best = max(combined, key=lambda s: summary[s]["dev_mean"]) if combined else None
            out.setdefault(task, {})[model] = {"strategies": summary, "best_combined": best,
                                               "comparisons": _comparisons(by_s)}
    return out


def _strategy_summary(runs: list[dict]) -> dict:
    test = _interval([e["test_score"] for e in runs])
    dev = _interval([e["dev_score"] for e in runs if e.get("dev_score") is not None])
    return {"test_mean": test[0], "test_ci95": test[1], "dev_mean": dev[0], "dev_ci95": dev[1], "runs": len(runs)}


def _interval(values: list[float]) -> tuple[float | None, list[float] | None]:
    if not values:
        return None, None
    mean, lo, hi = mean_ci(values)
    # Scores are percentages: a t-interval of few runs can pass 0 or 100, which no score can.
    return _r(mean), (None if math.isnan(lo) else [_r(max(lo, 0.0)), _r(min(hi, 100.0))])


def _comparisons(by_s: dict[str, list[dict]]) -> list[dict]:
    """Each strategy against zero-shot, p and w (those that ran), each unordered pair once."""
    runs = {s: [_run(e) for e in entries] for s, entries in by_s.items()}
    if ZERO_SHOT not in runs:  # each run's own baseline on its test split stands in
        base = [_run(e, baseline=True) for s, entries in by_s.items() for e in entries]
        base = list({(r.split, r.seed): r for r in base if r.outcomes}.values())
        if base:
            runs[ZERO_SHOT] = base
    seen: set[frozenset] = set()
    out = []
    for ref in REFERENCES:
        if ref not in runs:
            continue
        for s in by_s:
            if s == ref or frozenset((s, ref)) in seen:
                continue
            seen.add(frozenset((s, ref)))
            c = compare_strategies(runs[s], runs[ref])
            if c is None:
                continue
            t = c.test
            out.append({
                "a": s, "b": ref, "diff": _r(c.diff), "diff_ci95": _pair_r(c.diff_ci95),
                "p_value": None if t is None else float(f"{t.p_value:.3g}"),
                "method": None if t is None else t.method, "pairs": 0 if t is None else t.n,
                "run_pairs": c.run_pairs,
                "example_diff": None if t is None else _r(100 * t.diff),
                "example_diff_ci95": None if t is None else _pair_r((100 * t.ci95[0], 100 * t.ci95[1])),
                "a_better": None if t is None else t.a_better, "b_better": None if t is None else t.b_better,
            })
    return out


def _run(e: dict, baseline: bool = False) -> RunOutcomes:
    """A finished run's entry as ``RunOutcomes`` (no outcomes when its records are missing)."""
    run_dir = Path(e["run_dir"]) if e.get("run_dir") else None
    split = e.get("split_seed", e.get("seed"))
    if baseline:
        return RunOutcomes(split, e["seed"], e.get("zero_shot_test_score") or 0.0,
                           (run_dir and _outcomes(run_dir / BASELINE_RECORDS)) or {})
    return RunOutcomes(split, e["seed"], e["test_score"], (run_dir and _outcomes(run_dir / TEST_RECORDS)) or {})


_OUTCOMES: dict[tuple, dict] = {}  # (path, mtime, size) -> outcomes: results.json is rewritten after every run


def _outcomes(path: Path) -> dict | None:
    """Per-example scores of a records file, keyed by (index, a hash of the example)."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _OUTCOMES:
        doc = read_json(path)
        records = doc.get("records", []) if isinstance(doc, dict) else (doc or [])
        if len(_OUTCOMES) > 4096:
            _OUTCOMES.clear()
        _OUTCOMES[key] = {(r["index"], _digest(r.get("example"))): float(r["score"]) for r in records}
    return _OUTCOMES[key]


def _digest(example) -> str:
    return hashlib.sha1(json.dumps(example, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _r(v: float) -> float:
    return round(float(v), 2)


def _pair_r(v: tuple[float, float] | None) -> list[float] | None:
    return None if v is None else [_r(v[0]), _r(v[1])]


# -- table.md -------------------------------------------------------------------------------------
def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def ci_text(mean: float | None, ci: list[float] | None, n: int) -> str:
    """``46.0 [38.1, 53.9] (n=15)``; one run: ``46.0 (n=1, no interval)``."""
    if mean is None:
        return "–"
    if ci is None:
        return f"{mean:.1f} (n={n}, no interval)"
    return f"{mean:.1f} [{ci[0]:.1f}, {ci[1]:.1f}] (n={n})"


def p_text(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def paired_rows(comparisons: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The paired-test table (header, rows of text): shared by table.md and the HTML report."""
    header = ["a", "b", "diff a − b (points)", "95% CI over runs", "p", "test", "a / b better on",
              "example pairs", "run pairs"]
    rows = []
    for c in comparisons:
        ci = c.get("diff_ci95")
        rows.append([c["a"], c["b"], f"{c['diff']:+.1f}", f"[{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "– (1 run pair)",
                     p_text(c.get("p_value")), c.get("method") or "no records",
                     "–" if c.get("a_better") is None else f"{c['a_better']} / {c['b_better']}",
                     str(c.get("pairs", 0)), str(c.get("run_pairs", 0))])
    return header, rows


PAIRED_NOTE = ("diff: the mean over run pairs (same data split, same seed) of a's test score minus b's, "
               "with the Student-t interval of those differences. p: two-sided, over every test example "
               "of every run pair pooled: exact McNemar for 0/1 scores, a paired bootstrap (10,000 "
               "resamples) otherwise. An example that appears in several run pairs (several seeds on "
               "one split) counts each time, so p is then optimistic; the run interval is not.")


def table_markdown(doc: dict) -> str:
    """The experiment as Table 1: strategies x tasks, mean [95% CI] over runs, paired tests, the paper's."""
    exp = doc["experiment"]
    entries = doc["cells"]
    stats = doc.get("statistics") or statistics_section(doc)
    tasks = [Path(t).stem for t in exp["tasks"]]
    strategies = [normalize_strategy(s) for s in exp["strategies"]]
    ok = [e for e in entries if e.get("status") == "ok"]
    lines = [f"# Experiment {exp['out']}", ""]
    counts = {s: sum(1 for e in entries if e.get("status") == s) for s in ("ok", "partial", "pending", "failed")}
    splits = sorted({e.get("split_seed", e.get("seed")) for e in entries}, key=str)
    lines.append(f"Runs: {counts['ok']} finished, {counts['partial']} partial, {counts['pending']} pending, "
                 f"{counts['failed']} failed (of {len(entries)}). Seeds: {exp['seeds']}. "
                 f"Data splits (seeds): {splits}.")
    sizes: dict[str, set] = {}
    for e in ok:
        sz = e.get("sizes") or {}
        sizes.setdefault(e["task"], set()).add(f"{sz.get('train')}/{sz.get('dev')}/{sz.get('test')}")
    if sizes:
        lines.append("Splits (train/dev/test): " + "; ".join(
            f"{task_label(t)} {', '.join(sorted(v))}" for t, v in sizes.items()) + ".")
    lines.append("")
    header = _row(["strategy", *[task_label(t) for t in tasks]])
    sep = _row(["---"] * (len(tasks) + 1))
    for model in exp["models"]:
        mine = {t: (stats.get(t) or {}).get(model) or {} for t in tasks}
        lines += [f"## Ours: {model}", "",
                  "Test accuracy %: mean [95% CI] over finished runs (Student-t; n: runs, optimizer seeds x "
                  "data splits); best mean per column in bold.", "", header, sep]
        best = {t: max((v["test_mean"] for v in (mine[t].get("strategies") or {}).values()), default=None)
                for t in tasks}
        for s in strategies:
            row = [s]
            for t in tasks:
                v = (mine[t].get("strategies") or {}).get(s)
                text = ci_text(v["test_mean"], v["test_ci95"], v["runs"]) if v else "–"
                if v and best[t] is not None and abs(v["test_mean"] - best[t]) < 1e-9:
                    text = f"**{text}**"
                row.append(text)
            lines.append(_row(row))
        lines += ["", "Mean time per run, seconds (the steps' wall times, validation included; "
                  "zero-shot: its dev and test evaluation):", "", header, sep]
        for s in strategies:
            row = [s]
            for t in tasks:
                times = [run_seconds(e) for e in ok if e["model"] == model and e["strategy"] == s and e["task"] == t]
                row.append(_seconds(statistics.fmean(times)) if times else "–")
            lines.append(_row(row))
        lines.append("")
        for t in tasks:
            comps = mine[t].get("comparisons") or []
            if not comps:
                continue
            head, rows = paired_rows(comps)
            best_c = mine[t].get("best_combined")
            lines += [f"### Paired tests: {task_label(t)}, {model}", "", PAIRED_NOTE + (
                f" Best combined strategy (highest mean dev score): {best_c}." if best_c else ""), "",
                _row(head), _row(["---"] * len(head)), *[_row(r) for r in rows], ""]
    known = [t for t in tasks if any(paper_cell(s, t) for s in strategies)]
    lines += [f"## Paper (Table 1): {' / '.join(PAPER_MODELS)}", ""]
    if known:
        lines += ["Test accuracy %, mean of 3 seeds, as transcribed in the project's paper notes "
                  "(approximate; –: no number). Larger models and the paper's splits: compare the "
                  "ordering of strategies, not the levels.", "",
                  _row(["strategy", *[task_label(t) for t in known]]), _row(["---"] * (len(known) + 1))]
        for s in strategies:
            row = [s]
            for t in known:
                cell = paper_cell(s, t)
                row.append(" / ".join("–" if v is None else f"{v:.1f}" for v in cell) if cell else "not in paper")
            lines.append(_row(row))
    else:
        lines.append("The paper has none of these tasks.")
    failed = [e for e in entries if e.get("status") == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {e['task']} / {e['model']} / {e['strategy']} / data split {e.get('split_seed', '–')} / "
                  f"seed {e['seed']}: {e.get('error', '')}" for e in failed]
    return "\n".join(lines) + "\n"


def _seconds(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def run_seconds(e: dict) -> float:
    """A run's optimization time (its steps' wall times, the start's included); zero-shot: its wall time."""
    if e.get("history"):
        return e.get("optimize_s") or sum(r.get("wall_s") or 0 for r in e["history"])
    return e.get("wall_s") or 0.0
