"""``tandem report RUN_DIR``: one self-contained HTML file, and a markdown summary.

    html_path, markdown = write_report("runs/exp-iris")     # an experiment's out folder
    html_path, markdown = write_report("runs/iris-pwp-s0")  # one run directory

The HTML has no external assets (plots are base64 PNGs from matplotlib,
styles inline), so it can be mailed or attached as it is. Sections:

- the results table (an experiment: strategies x tasks, mean [95% CI] over
  runs, ours and the paper's);
- scores after each step, with the spread over runs (an experiment: per task,
  each strategy's validation score after each step and its test score with
  its interval; ``report_plots.py``), and the paired tests between strategies;
- time and tokens per step;
- each module's final instructions and demos (``final/program.json``);
- test examples the optimization fixed and broke: the zero-shot program's
  records (``baseline_records.json``) against the returned program's
  (``test_records.json``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from tandem.experiments.paper import task_label
from tandem.experiments.run import BASELINE_RECORDS, RESULTS, TEST_RECORDS, compare_records, read_json

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1d2330; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 2px solid #e3e6ee; padding-bottom: 4px; }
h3 { margin-top: 24px; } .muted { color: #6b7385; font-size: 13px; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 13.5px; }
th, td { border: 1px solid #d7dbe5; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f2f4f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eceef3; margin: 6px 0; }
pre { background: #f6f7fa; padding: 8px 10px; white-space: pre-wrap; word-break: break-word; font-size: 12.5px;
      margin: 4px 0; border-radius: 4px; }
details { margin: 6px 0 10px; } summary { cursor: pointer; font-weight: 600; }
.fixed { color: #17803d; font-weight: 600; } .broken { color: #b42318; font-weight: 600; }
.card { border: 1px solid #e3e6ee; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
"""

MAX_TEXT = 600  # characters of one field shown in examples and demos


# -- entry point ------------------------------------------------------------------------------
def write_report(path: str | Path, out: str | Path | None = None, max_examples: int = 8) -> tuple[Path, str]:
    """Write the HTML report of a run or experiment directory; return (its path, a markdown summary)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    doc = read_json(path / RESULTS)
    if isinstance(doc, dict) and "cells" in doc:
        from tandem.experiments.report_experiment import experiment_report

        body, md = experiment_report(path, max_examples)
        title = f"tandem experiment {path}"
    elif doc is not None or (path / "history.json").exists() or (path / "plan.json").exists():
        body, md = _single(path, max_examples)
        title = f"tandem run {path}"
    else:
        raise ValueError(f"{path} is neither a run directory (results.json, history.json) nor an experiment's "
                         "out folder (results.json with cells)")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
    target = Path(out) if out else path / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target, md


# -- helpers ------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _short(x: Any, limit: int = MAX_TEXT) -> str:
    text = x if isinstance(x, str) else json.dumps(x, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit} more characters)"


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("tandem report draws its plots with matplotlib: pip install 'tandem[report]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(fig, alt: str) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def step_offset(history: list[dict]) -> int:
    """The step number of ``history[0]``: 0 when it is the ``start`` record (the given program), else 1."""
    return 0 if history and history[0].get("kind") == "start" else 1


def _tokens(usage: dict | None) -> int:
    u = usage or {}
    return int(u.get("prompt_tokens", 0)) + int(u.get("output_tokens", 0))


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(
            f"<td class='num'>{_e(_fmt(c))}</td>" if i in numeric else f"<td>{_e(_fmt(c))}</td>"
            for i, c in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def _md_to_html(md: str) -> str:
    """The small markdown subset table_markdown writes: headings, paragraphs, pipe tables, bullets, bold."""
    def inline(text: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", _e(text))

    out, table, bullets = [], [], []

    def flush():
        if table:
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                    if not re.fullmatch(r"\|[\s\-|]+\|", line.strip())]
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            table.clear()
        if bullets:
            out.append("<ul>" + "".join(f"<li>{inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            bullets.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


# -- final programs ---------------------------------------------------------------------------------
def _program_html(run_dir: Path) -> str:
    doc = read_json(run_dir / "final" / "program.json")
    if doc is None:
        return "<p class='muted'>no final/program.json (the run has not finished)</p>"
    parts = []
    for name, state in (doc.get("predictors") or {}).items():
        sig = state.get("signature") or {}
        ins = [f["name"] for f in sig.get("fields", []) if f.get("input")]
        outs = [f["name"] for f in sig.get("fields", []) if not f.get("input")]
        lm = state.get("lm") or {}
        lm_text = f"{lm.get('backend', '?')}:{lm.get('model', '?')}" + (
            f" + adapter {lm['adapter']}" if lm.get("adapter") else "")
        demos = state.get("demos") or []
        parts.append(
            f"<div class='card'><b>{_e(name)}</b> <span class='muted'>{_e(', '.join(ins))} → "
            f"{_e(', '.join(outs))}; model {_e(lm_text)}; {len(demos)} demo(s)</span>"
            f"<div class='muted'>instructions</div><pre>{_e(sig.get('instructions', ''))}</pre>")
        for i, demo in enumerate(demos):
            fields = "\n".join(f"{k}: {_short(v, 400)}" for k, v in demo.items())
            parts.append(f"<div class='muted'>demo {i + 1}</div><pre>{_e(fields)}</pre>")
        parts.append("</div>")
    return "".join(parts) or "<p class='muted'>the program has no predictors</p>"


def _program_md(run_dir: Path) -> list[str]:
    doc = read_json(run_dir / "final" / "program.json") or {}
    lines = []
    for name, state in (doc.get("predictors") or {}).items():
        lm = state.get("lm") or {}
        lines.append(f"- `{name}`: {len(state.get('demos') or [])} demo(s)"
                     + (", with a LoRA adapter" if lm.get("adapter") else ""))
    return lines


# -- fixed and broken ---------------------------------------------------------------------------------
def _changes(run_dir: Path) -> tuple[dict | None, dict, dict]:
    """(indices fixed/broken or None when records are missing, baseline by index, final by index)."""
    base = read_json(run_dir / BASELINE_RECORDS)
    final = read_json(run_dir / TEST_RECORDS)
    if base is None or final is None:
        return None, {}, {}
    base_records = base["records"] if isinstance(base, dict) else base
    final_records = final["records"] if isinstance(final, dict) else final
    return (compare_records(base_records, final_records), {r["index"]: r for r in base_records},
            {r["index"]: r for r in final_records})


def _pred_text(rec: dict) -> str:
    if rec.get("failure"):
        return f"[{rec['failure']} failure] {rec.get('error') or ''}"
    pred = rec.get("prediction") or {}
    return "\n".join(f"{k}: {_short(v, 400)}" for k, v in pred.items())


def _changes_html(run_dir: Path, max_examples: int) -> str:
    changes, base, final = _changes(run_dir)
    if changes is None:
        return "<p class='muted'>no per-example records (test_records.json / baseline_records.json)</p>"
    n = len(final)
    parts = [f"<p><span class='fixed'>{len(changes['fixed'])} fixed</span>, "
             f"<span class='broken'>{len(changes['broken'])} broken</span> of {n} test examples "
             f"(zero-shot program → returned program).</p>"]
    for kind in ("fixed", "broken"):
        idx = changes[kind][:max_examples]
        if not idx:
            continue
        rows = []
        for i in idx:
            ex = final[i]["example"]
            ex_text = "\n".join(f"{k}: {_short(v, 400)}" for k, v in ex.items())
            rows.append(f"<tr><td class='num'>{i}</td><td><pre>{_e(ex_text)}</pre></td>"
                        f"<td><pre>{_e(_pred_text(base[i]))}</pre><div class='muted'>score {base[i]['score']:g}</div></td>"
                        f"<td><pre>{_e(_pred_text(final[i]))}</pre><div class='muted'>score {final[i]['score']:g}</div></td></tr>")
        more = len(changes[kind]) - len(idx)
        parts.append(
            f"<details{' open' if kind == 'fixed' else ''}><summary class='{kind}'>{kind} "
            f"({len(changes[kind])}{f', first {len(idx)} shown' if more else ''})</summary>"
            "<table><tr><th>#</th><th>example</th><th>zero-shot prediction</th><th>returned program</th></tr>"
            + "".join(rows) + "</table></details>")
    return "".join(parts)


# -- one run ---------------------------------------------------------------------------------------------
def _single(run_dir: Path, max_examples: int) -> tuple[str, str]:
    plt = _pyplot()
    res = read_json(run_dir / RESULTS) or {}
    cfg = read_json(run_dir / "config.json") or {}
    plan = read_json(run_dir / "plan.json") or {}
    history = res.get("history") or read_json(run_dir / "history.json") or []
    task = res.get("task") or Path(str(cfg.get("task", "?"))).stem
    strategy = res.get("strategy") or plan.get("strategy") or cfg.get("strategy", "?")
    model = res.get("model") or cfg.get("model", "?")
    seed = res.get("seed", cfg.get("seed"))
    first = step_offset(history)  # the number of history[0]: 0 for the start record
    number = {id(h): first + i for i, h in enumerate(history)}
    finished = bool(res)
    parts = [f"<h1>{_e(task_label(task))}: {_e(strategy)}</h1>",
             f"<p class='muted'>run directory {_e(run_dir)}; model {_e(model)}; seed {_e(seed)}"
             f"{'' if finished else '; <b>not finished</b> (no results.json)'}</p>"]
    sizes = res.get("sizes") or (cfg.get("resolved") or {}).get("sizes") or {}
    summary_rows = [
        ["splits (train/dev/test)", f"{sizes.get('train', '?')}/{sizes.get('dev', '?')}/{sizes.get('test', '?')}"],
        ["prompt-step sizes (bootstrap/select)", "/".join(str(x) for x in res.get("prompt_sizes") or []) or "–"],
        ["dev score of the returned program", _fmt(res.get("dev_score"))],
        ["returned step", "–" if res.get("best_step") is None else str(res["best_step"] + first)],
        ["test score", _fmt(res.get("test_score"))],
        ["zero-shot test score", _fmt(res.get("zero_shot_test_score"))],
        ["fixed / broken test examples", f"{res.get('fixed', '–')} / {res.get('broken', '–')}"],
        ["steps' wall time, s", _fmt(res.get("optimize_s", sum(h.get("wall_s") or 0 for h in history)), 0)],
    ]
    parts += ["<h2>Summary</h2>", "<table>" + "".join(
        f"<tr><th>{_e(k)}</th><td class='num'>{_e(v)}</td></tr>" for k, v in summary_rows) + "</table>"]
    for note in res.get("notes") or []:
        parts.append(f"<p class='muted'>note: {_e(note)}</p>")

    parts.append("<h2>Scores after each step</h2>")
    if history:
        xs = [number[id(h)] for h in history]
        labels = [f"{number[id(h)]}: {h['kind']}" for h in history]
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        ax.plot(xs, [h.get("val_score") for h in history], "o-", label="dev (validation) after the step")
        inner = [h.get("inner_score") for h in history]
        if any(v is not None for v in inner):
            ax.plot(xs, [v if v is not None else float("nan") for v in inner], "s--", alpha=0.7,
                    label="the step's own selection score")
        if res.get("zero_shot_test_score") is not None:
            ax.axhline(res["zero_shot_test_score"], color="grey", ls=":", label="zero-shot, test")
        if res.get("test_score") is not None and res.get("best_step") is not None:
            ax.plot([res["best_step"] + first], [res["test_score"]], "*", ms=14, color="C3", label="returned program, test")
        ax.set_xticks(xs, labels)
        ax.set_ylabel("score %")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        parts.append(_img(fig, "scores after each step"))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        a1.bar(labels, [h.get("wall_s") or 0 for h in history], color="C0")
        a1.set_title("wall time per step, s", fontsize=10)
        a2.bar(labels, [_tokens(h.get("usage")) for h in history], color="C1")
        a2.set_title("tokens per step (prompt + output)", fontsize=10)
        parts += ["<h2>Time and tokens per step</h2>", _img(fig, "time and tokens per step")]
        rows = [[number[id(h)], h["kind"], h.get("status"), h.get("val_score"), h.get("inner_score"),
                 round(h.get("wall_s") or 0.0, 1), (h.get("usage") or {}).get("calls", 0), _tokens(h.get("usage")),
                 h.get("train_examples") if h["kind"] == "w" else "–", _short(h.get("detail", ""), 160)]
                for h in history]
        parts.append(_table(["step", "kind", "status", "dev %", "inner %", "wall s", "LM calls", "tokens",
                             "SFT examples", "detail"], rows, numeric={0, 3, 4, 5, 6, 7, 8}))
    else:
        parts.append("<p class='muted'>no optimization steps (a zero-shot run, or none finished yet)</p>")
    parts += ["<h2>Returned program: instructions and demos</h2>",
              "<p class='muted'>final/program.json: the step with the best dev score (ties: the later step)</p>",
              _program_html(run_dir)]
    parts += ["<h2>Test examples fixed and broken</h2>", _changes_html(run_dir, max_examples)]

    md = [f"# {task_label(task)}: {strategy} (model {model}, seed {seed})", ""]
    if history:
        md += ["| step | kind | status | dev % | wall s | tokens |", "|---|---|---|---|---|---|"]
        md += [f"| {number[id(h)]} | {h['kind']} | {h.get('status')} | {_fmt(h.get('val_score'))} | "
               f"{(h.get('wall_s') or 0):.0f} | {_tokens(h.get('usage'))} |" for h in history]
        md.append("")
    if finished:
        md.append(f"test {_fmt(res.get('test_score'))}% (zero-shot {_fmt(res.get('zero_shot_test_score'))}%) "
                  f"on {res.get('test_n')} examples: {res.get('fixed')} fixed, {res.get('broken')} broken.")
    else:
        md.append("not finished: no results.json")
    md += _program_md(run_dir)
    return "\n".join(parts), "\n".join(md) + "\n"
