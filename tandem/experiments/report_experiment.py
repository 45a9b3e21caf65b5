"""``tandem report OUT`` for an experiment: the results table (from the numbers, not from table.md), the
settings and time, then per (task, model) its plots, intervals and paired tests, and each run's details
(steps, candidates, losses, RL reward tables, final program, fixed / broken examples); ``report.py`` has the rest.

- ``score_plots``: validation score after each step (mean over runs, min–max
  band; step 0 is the starting program: a run's ``start`` history record, or
  the zero-shot strategy's dev score) and each strategy's test score with its
  95% t-interval over runs (the ``statistics`` section's).
- ``cost_plots``: mean wall time and tokens of each strategy step.
- ``results_tables``: Table 1 as data (ours per model, the paper's), for the template.

A run's history may start with a record of kind ``start`` (the given program
scored on dev before any step): it is step 0, never a strategy step.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from tandem.experiments.grid import load_results
from tandem.experiments.paper import PAPER_MODELS, normalize_strategy, paper_cell, task_label
from tandem.experiments.report_run import fmt, run_context, setting_rows, step_offset, tokens
from tandem.experiments.report_plots import png, pyplot
from tandem.experiments.table import PAIRED_NOTE, ci_text, paired_rows, run_seconds, table_markdown


def _by_step(runs: list[dict]) -> dict[int, list[float]]:
    """Step number -> the runs' validation scores after it (the start record is step 0)."""
    out: dict[int, list[float]] = {}
    for c in runs:
        history = c.get("history") or []
        first = step_offset(history)
        for i, h in enumerate(history):
            if h.get("val_score") is not None:
                out.setdefault(first + i, []).append(h["val_score"])
    return out


def score_plots(plt, by_s: dict[str, list[dict]], colors: dict, title: str, stats: dict | None) -> dict:
    """Left: dev score after each step (mean, band min..max, dots per run). Right: test, mean [95% CI]."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.9), gridspec_kw={"width_ratios": [1.25, 1]})
    zero = [c["dev_score"] for c in by_s.get("zero-shot", []) if c.get("dev_score") is not None]
    max_steps, has_zero = 1, False
    for s, runs in by_s.items():
        if s == "zero-shot":
            continue
        steps = _by_step(runs)
        if 0 not in steps and zero:
            steps[0] = zero
        xs = sorted(steps)
        if not xs:
            continue
        has_zero = has_zero or xs[0] == 0
        max_steps = max(max_steps, xs[-1])
        means = [statistics.fmean(steps[x]) for x in xs]
        for x in xs:
            a1.scatter([x] * len(steps[x]), steps[x], s=10, color=colors[s], alpha=0.35)
        a1.plot(xs, means, "o-", color=colors[s], label=s)
        a1.fill_between(xs, [min(steps[x]) for x in xs], [max(steps[x]) for x in xs], color=colors[s], alpha=0.12)
    a1.set_xticks(range(0 if has_zero else 1, max_steps + 1))
    a1.set_xlabel("step (0: the starting, zero-shot program)" if has_zero else "step")
    a1.set_ylabel("dev score % (mean; band: min–max over runs)")
    a1.set_ylim(-3, 103)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a1.set_title(f"{title}: validation after each step", fontsize=10)
    summary = (stats or {}).get("strategies") or {}
    names = list(by_s)
    for i, s in enumerate(names):
        vals = [c["test_score"] for c in by_s[s] if c.get("test_score") is not None]
        if not vals:
            continue
        m = statistics.fmean(vals)
        ci = (summary.get(s) or {}).get("test_ci95")
        err = [[max(0.0, m - ci[0])], [max(0.0, ci[1] - m)]] if ci else None  # ci is rounded
        a2.bar(i, m, color=colors[s], alpha=0.8, yerr=err, capsize=4)
        a2.scatter([i] * len(vals), vals, s=12, color="black", zorder=3)
        if m >= 12:
            a2.text(i, 3, f"{m:.1f}", ha="center", fontsize=8, color="white", fontweight="bold")
        else:
            a2.text(i, (ci[1] if ci else m) + 2, f"{m:.1f}", ha="center", fontsize=8)
    a2.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    a2.set_ylim(0, 103)
    a2.set_ylabel("test score % (mean, 95% CI; dots: runs)")
    a2.grid(alpha=0.3, axis="y")
    a2.set_title(f"{title}: test", fontsize=10)
    return png(fig, f"{title} scores")


def cost_plots(plt, by_s: dict[str, list[dict]], colors: dict, title: str) -> dict | None:
    """Mean wall time and tokens of each step of each strategy (over runs; not the start), as bars."""
    labels, times, toks, cols = [], [], [], []
    for s, runs in by_s.items():
        if s == "zero-shot":
            continue
        steps = [[h for h in (c.get("history") or []) if h.get("kind") != "start"] for c in runs]
        for i in range(max(len(h) for h in steps)):
            at = [h[i] for h in steps if len(h) > i]
            labels.append(f"{s}  ·  step {i + 1} ({at[0]['kind']})")
            times.append(statistics.fmean(h.get("wall_s") or 0.0 for h in at))
            toks.append(statistics.fmean(tokens(h.get("usage")) for h in at))
            cols.append(colors[s])
    if not labels:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.8 + 0.32 * len(labels)), sharey=True)
    ys = list(range(len(labels)))[::-1]  # first strategy on top
    for ax, vals, what in ((a1, times, "wall time per step, s"), (a2, toks, "tokens per step (prompt + output)")):
        ax.barh(ys, vals, color=cols)
        ax.set_title(f"{what}, mean over runs", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="x", labelsize=8)
    a1.set_yticks(ys, labels, fontsize=8)
    return png(fig, f"{title} time and tokens")


def results_tables(doc: dict) -> dict:
    """Table 1 as data: per model the strategies' test intervals (the best mean marked) and mean times per
    run, and the paper's numbers. table.md says the same in markdown (``table.table_markdown``)."""
    exp, stats, entries = doc["experiment"], doc.get("statistics") or {}, doc["cells"]
    tasks = [Path(t).stem for t in exp["tasks"]]
    strategies = [normalize_strategy(s) for s in exp["strategies"]]
    ok = [e for e in entries if e.get("status") == "ok"]
    counts = {s: sum(1 for e in entries if e.get("status") == s) for s in ("ok", "partial", "pending", "failed")}
    sizes: dict[str, set] = {}
    for e in ok:
        sz = e.get("sizes") or {}
        sizes.setdefault(e["task"], set()).add(f"{sz.get('train')}/{sz.get('dev')}/{sz.get('test')}")
    ours = []
    for model in exp["models"]:
        mine = {t: ((stats.get(t) or {}).get(model) or {}).get("strategies") or {} for t in tasks}
        best = {t: max((v["test_mean"] for v in mine[t].values()), default=None) for t in tasks}
        rows, times = [], []
        for s in strategies:
            cells = []
            for t in tasks:
                v = mine[t].get(s)
                cells.append({"text": ci_text(v["test_mean"], v["test_ci95"], v["runs"]) if v else "–",
                              "best": bool(v) and best[t] is not None and abs(v["test_mean"] - best[t]) < 1e-9})
            rows.append({"strategy": s, "cells": cells})
            secs = [[run_seconds(e) for e in ok if e["model"] == model and e["strategy"] == s and e["task"] == t]
                    for t in tasks]
            times.append([s, *(fmt(statistics.fmean(x), 0 if statistics.fmean(x) >= 10 else 1) if x else "–"
                               for x in secs)])
        ours.append({"model": model, "rows": rows, "times": times})
    known = [t for t in tasks if any(paper_cell(s, t) for s in strategies)]
    paper = [[s, *(" / ".join("–" if v is None else f"{v:.1f}" for v in cell) if (cell := paper_cell(s, t))
                   else "not in paper" for t in known)] for s in strategies]
    return {
        "counts": (f"Runs: {counts['ok']} finished, {counts['partial']} partial, {counts['pending']} pending, "
                   f"{counts['failed']} failed (of {len(entries)}). Seeds: {exp['seeds']}. Data splits (seeds): "
                   f"{sorted({e.get('split_seed', e.get('seed')) for e in entries}, key=str)}."),
        "sizes": "; ".join(f"{task_label(t)} {', '.join(sorted(v))}" for t, v in sizes.items()),
        "header": ["strategy", *(task_label(t) for t in tasks)], "ours": ours,
        "paper_models": " / ".join(PAPER_MODELS), "paper_header": ["strategy", *(task_label(t) for t in known)],
        "paper": paper if known else None,
        "failed": [f"{e['task']} / {e['model']} / {e['strategy']} / data split {e.get('split_seed', '–')} / "
                   f"seed {e['seed']}: {e.get('error', '')}" for e in entries if e.get("status") == "failed"],
    }


def _stats(stats: dict | None) -> dict | None:
    """The (task, model)'s intervals per strategy and its paired tests, as rows for the template."""
    if not stats:
        return None
    rows = [[s, ci_text(v["test_mean"], v["test_ci95"], v["runs"]), ci_text(v["dev_mean"], v["dev_ci95"], v["runs"])]
            for s, v in stats.get("strategies", {}).items()]
    header, paired = paired_rows(stats["comparisons"]) if stats.get("comparisons") else ([], [])
    best = stats.get("best_combined")
    note = PAIRED_NOTE + (f" Best combined strategy (highest mean dev score): {best}." if best else "")
    return {"rows": rows, "paired_header": header, "paired": paired, "note": note}


def _times(doc: dict, cells: list[dict]) -> list[list[str]]:
    loads = doc.get("model_load_s") or {}
    run_s = sum(c.get("wall_s") or 0.0 for c in cells)
    rows = [[f"model load, {m}", fmt(v), "loading the model and starting its engine, once for all its runs "
                                         "(this invocation's; runs finished by an earlier one were not run again)"]
            for m, v in loads.items()]
    rows += [["steps, all runs", fmt(round(sum(run_seconds(c) for c in cells), 1)),
              "the finished runs' steps (validation included; zero-shot: its evaluation)"],
             ["runs, all", fmt(round(run_s, 1)), "each finished run's own time (steps, test evaluations, saving)"],
             ["total", fmt(round(run_s + sum(loads.values()), 1)), "model loads + the runs: about the grid's wall "
                                                                   "time when one invocation ran every run"]]
    return rows


def experiment_context(out: Path, max_examples: int) -> dict:
    """What the experiment templates show, and the markdown summary's parts."""
    plt = pyplot()
    doc = load_results(out)
    exp = doc["experiment"]
    cells = [c for c in doc["cells"] if c.get("status") == "ok"]
    strategies = list(dict.fromkeys(c["strategy"] for c in doc["cells"]))
    tasks = list(dict.fromkeys(c["task"] for c in doc["cells"]))
    models = list(dict.fromkeys(c["model"] for c in doc["cells"]))
    colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    many_splits = len(exp.get("data_seeds") or []) > 1
    sections = []
    for model in models:
        for task in tasks:
            mine = [c for c in cells if c["model"] == model and c["task"] == task]
            head = f"{task_label(task)} · {model}"
            by_s = {s: [c for c in mine if c["strategy"] == s] for s in strategies}
            by_s = {s: sorted(v, key=_run_key) for s, v in by_s.items() if v}
            stats = ((doc.get("statistics") or {}).get(task) or {}).get(model)
            runs, rows, fixed_broken = [], [], []
            for s, rs in by_s.items():
                for c in rs:
                    rows.append([s, c.get("split_seed", "–"), c["seed"], fmt(c.get("dev_score")),
                                 fmt(c.get("test_score")), fmt(c.get("zero_shot_test_score")), c.get("fixed"),
                                 c.get("broken"), fmt(round(run_seconds(c), 1))])
                    split = f" · data split {c['split_seed']}" if many_splits else ""
                    runs.append({"label": f"{s}{split} · seed {c['seed']} · test {fmt(c.get('test_score'))}% · "
                                          f"{c.get('fixed', '–')} fixed / {c.get('broken', '–')} broken",
                                 **run_context(Path(c["run_dir"]), max_examples, plots=False)})
                fixed_broken.append(
                    f"{task_label(task)} / {model} / {s}: fixed {statistics.fmean(c.get('fixed') or 0 for c in rs):.1f}"
                    f", broken {statistics.fmean(c.get('broken') or 0 for c in rs):.1f} test examples per run "
                    f"(n={len(rs)})")
            sections.append({
                "head": head, "empty": not mine, "stats": _stats(stats), "rows": rows, "runs": runs,
                "fixed_broken": fixed_broken,
                "scores": score_plots(plt, by_s, colors, head, stats) if mine else None,
                "cost": cost_plots(plt, by_s, colors, head) if mine else None,
            })
    return {
        "out": str(out), "tasks": ", ".join(tasks), "models": ", ".join(models), "seeds": exp.get("seeds"),
        "data_seeds": exp.get("data_seeds") or "one split", "source": exp.get("source") or "–",
        "results": results_tables(doc), "table_md": table_markdown(doc), "sections": sections,
        "settings": setting_rows({k: v for k, v in exp.items() if k != "per_task"}, ("settings",))
        + setting_rows({"per_task": exp["per_task"]} if exp.get("per_task") else {}, ("per_task",)),
        "times": _times(doc, cells),
    }


def _run_key(c: dict) -> tuple:
    split = c.get("split_seed")
    return (split if isinstance(split, int) else -1, c["seed"])
