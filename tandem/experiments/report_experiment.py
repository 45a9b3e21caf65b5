"""``tandem report OUT`` for an experiment: the results table, then per (task, model) its plots,
intervals and paired tests, runs, final programs and fixed / broken examples (``report.py`` has the rest).

- ``score_plots``: validation score after each step (mean over runs, min–max
  band; step 0 is the starting program: a run's ``start`` history record, or
  the zero-shot strategy's dev score) and each strategy's test score with its
  95% t-interval over runs (the ``statistics`` section's).
- ``cost_plots``: mean wall time and tokens of each strategy step.
- ``stats_html``: the strategies' intervals (test and dev) and the paired tests.

A run's history may start with a record of kind ``start`` (the given program
scored on dev before any step): it is step 0, never a strategy step.
"""

from __future__ import annotations

import html
import statistics
from pathlib import Path

from tandem.experiments.grid import load_results
from tandem.experiments.paper import task_label
from tandem.experiments.report import (
    _changes_html, _e, _fmt, _img, _md_to_html, _program_html, _pyplot, _table, _tokens, step_offset,
)
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


def score_plots(plt, by_s: dict[str, list[dict]], colors: dict, title: str, stats: dict | None) -> str:
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
    return _img(fig, f"{title} scores")


def cost_plots(plt, by_s: dict[str, list[dict]], colors: dict, title: str) -> str:
    """Mean wall time and tokens of each step of each strategy (over runs; not the start), as bars."""
    labels, times, tokens, cols = [], [], [], []
    for s, runs in by_s.items():
        if s == "zero-shot":
            continue
        steps = [[h for h in (c.get("history") or []) if h.get("kind") != "start"] for c in runs]
        for i in range(max(len(h) for h in steps)):
            at = [h[i] for h in steps if len(h) > i]
            labels.append(f"{s}  ·  step {i + 1} ({at[0]['kind']})")
            times.append(statistics.fmean(h.get("wall_s") or 0.0 for h in at))
            tokens.append(statistics.fmean(_tokens(h.get("usage")) for h in at))
            cols.append(colors[s])
    if not labels:
        return ""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.8 + 0.32 * len(labels)), sharey=True)
    ys = list(range(len(labels)))[::-1]  # first strategy on top
    for ax, vals, what in ((a1, times, "wall time per step, s"), (a2, tokens, "tokens per step (prompt + output)")):
        ax.barh(ys, vals, color=cols)
        ax.set_title(f"{what}, mean over runs", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="x", labelsize=8)
    a1.set_yticks(ys, labels, fontsize=8)
    return _img(fig, f"{title} time and tokens")


def _rows_html(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def stats_html(stats: dict | None) -> str:
    """The (task, model)'s intervals per strategy and its paired tests, as HTML tables."""
    if not stats:
        return "<p class='muted'>no statistics (no finished runs)</p>"
    rows = [[s, ci_text(v["test_mean"], v["test_ci95"], v["runs"]), ci_text(v["dev_mean"], v["dev_ci95"], v["runs"])]
            for s, v in stats.get("strategies", {}).items()]
    parts = ["<p class='muted'>Mean [95% CI] over runs (Student-t; n: runs, optimizer seeds x data splits).</p>",
             _rows_html(["strategy", "test %", "dev %"], rows)]
    if stats.get("comparisons"):
        header, prow = paired_rows(stats["comparisons"])
        best = stats.get("best_combined")
        parts += [f"<p class='muted'>{html.escape(PAIRED_NOTE)}"
                  + (f" Best combined strategy (highest mean dev score): {html.escape(best)}." if best else "")
                  + "</p>", _rows_html(header, prow)]
    return "".join(parts)


def experiment_report(out: Path, max_examples: int) -> tuple[str, str]:
    """The HTML body and the markdown summary of an experiment's out folder."""
    plt = _pyplot()
    doc = load_results(out)
    exp = doc["experiment"]
    table = table_markdown(doc)
    cells = [c for c in doc["cells"] if c.get("status") == "ok"]
    strategies = list(dict.fromkeys(c["strategy"] for c in doc["cells"]))
    tasks = list(dict.fromkeys(c["task"] for c in doc["cells"]))
    models = list(dict.fromkeys(c["model"] for c in doc["cells"]))
    parts = [f"<h1>Experiment {_e(out)}</h1>",
             f"<p class='muted'>tasks {_e(', '.join(tasks))}; models {_e(', '.join(models))}; "
             f"seeds {_e(exp.get('seeds'))}; data seeds {_e(exp.get('data_seeds') or 'one split')}; "
             f"config {_e(exp.get('source') or '–')}</p>",
             # without its title; the paired tests come in each task's section
             "<h2>Results table</h2>", _md_to_html(_without_paired(table.split("\n", 1)[1]))]
    md = [table]
    colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}

    for model in models:
        for task in tasks:
            mine = [c for c in cells if c["model"] == model and c["task"] == task]
            head = f"{task_label(task)} · {model}"
            parts.append(f"<h2>{_e(head)}</h2>")
            if not mine:
                parts.append("<p class='muted'>no finished runs yet</p>")
                continue
            by_s = {s: [c for c in mine if c["strategy"] == s] for s in strategies}
            by_s = {s: v for s, v in by_s.items() if v}
            stats = ((doc.get("statistics") or {}).get(task) or {}).get(model)
            parts += ["<h3>Scores after each step</h3>",
                      "<p class='muted'>Left: the validation (dev) score after each step, mean over runs with "
                      "the min–max band; step 0 is the starting (zero-shot) program. Right: the returned "
                      "program's test score, mean and 95% CI over runs, one dot per run.</p>",
                      score_plots(plt, by_s, colors, head, stats),
                      "<h3>Intervals and paired tests</h3>", stats_html(stats)]
            cost = cost_plots(plt, by_s, colors, head)
            if cost:
                parts += ["<h3>Time and tokens per step</h3>", cost]
            # fixed / broken per strategy and seed
            rows, md_rows = [], []
            for s, runs in by_s.items():
                for c in sorted(runs, key=_run_key):
                    rows.append([s, c.get("split_seed", "–"), c["seed"], c.get("dev_score"), c.get("test_score"),
                                 c.get("zero_shot_test_score"), c.get("fixed"), c.get("broken"),
                                 round(run_seconds(c), 1)])
                fixed = [c.get("fixed") or 0 for c in runs]
                broken = [c.get("broken") or 0 for c in runs]
                md_rows.append(f"- {task_label(task)} / {model} / {s}: fixed {statistics.fmean(fixed):.1f}, "
                               f"broken {statistics.fmean(broken):.1f} test examples per run (n={len(runs)})")
            parts += ["<h3>Runs</h3>", _table(["strategy", "data split", "seed", "dev %", "test %", "zero-shot test %",
                                               "fixed", "broken", "time s"], rows, numeric={1, 2, 3, 4, 5, 6, 7, 8})]
            md += [f"## {head}: fixed / broken vs zero-shot", *md_rows, ""]
            parts.append("<h3>Final programs and fixed / broken examples</h3>")
            for s, runs in by_s.items():
                for c in sorted(runs, key=_run_key):
                    run_dir = Path(c["run_dir"])
                    split = f" · data split {c['split_seed']}" if len(exp.get("data_seeds") or []) > 1 else ""
                    parts.append(
                        f"<details><summary>{_e(s)}{_e(split)} · seed {c['seed']} · test {_fmt(c.get('test_score'))}% · "
                        f"{c.get('fixed', '–')} fixed / {c.get('broken', '–')} broken</summary>"
                        f"<p class='muted'>run directory {_e(run_dir)}</p>"
                        f"<h4>Instructions and demos</h4>{_program_html(run_dir)}"
                        f"<h4>Fixed and broken test examples</h4>{_changes_html(run_dir, max_examples)}</details>")
    return "\n".join(parts), "\n".join(md) + "\n"


def _run_key(c: dict) -> tuple:
    split = c.get("split_seed")
    return (split if isinstance(split, int) else -1, c["seed"])


def _without_paired(md: str) -> str:
    """table.md without its "### Paired tests" subsections."""
    out, skip = [], False
    for line in md.splitlines():
        if line.startswith("#"):
            skip = line.startswith("### Paired tests")
        if not skip:
            out.append(line)
    return "\n".join(out)
