"""A run directory read into plain data for the report templates (``run_context``), and the
helpers the experiment report shares: numbers and settings as text, the steps, candidates,
LoRA losses, RL rewards, the returned program and the test examples it fixed and broke.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tandem.experiments import report_plots
from tandem.experiments.paper import task_label
from tandem.experiments.run import BASELINE_RECORDS, RESULTS, TEST_RECORDS, compare_records, read_json
from tandem.train.adapter import META_FILE

MAX_TEXT = 600  # characters of one field shown in examples and demos


# -- helpers ------------------------------------------------------------------------------------
def short(x: Any, limit: int = MAX_TEXT) -> str:
    text = x if isinstance(x, str) else json.dumps(x, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit} more characters)"


def step_offset(history: list[dict]) -> int:
    """The step number of ``history[0]``: 0 when it is the ``start`` record (the given program), else 1."""
    return 0 if history and history[0].get("kind") == "start" else 1


def tokens(usage: dict | None) -> int:
    u = usage or {}
    return int(u.get("prompt_tokens", 0)) + int(u.get("output_tokens", 0))


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def failures_text(failures: dict | None) -> str:
    """``{"parse": 3, "empty": 1}`` -> ``"parse: 3, empty: 1"``; none -> ``"none"``."""
    return ", ".join(f"{k}: {v}" for k, v in sorted((failures or {}).items(), key=lambda kv: -kv[1])) or "none"



def setting_rows(doc: dict, flatten: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Settings as (name, value) rows; the dicts named in ``flatten`` give one row per key."""
    rows = []
    for k, v in doc.items():
        if k in flatten and isinstance(v, dict) and v:
            rows += [(f"{k}.{sub}" if k != "settings" else sub, _value(x)) for sub, x in v.items()]
        else:
            rows.append((k, _value(v)))
    return rows


def _value(v: Any) -> str:
    if v is None:
        return "–"
    if v == {}:
        return "defaults"
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


# -- a run's parts (shared with the experiment report) --------------------------------------------
def program_parts(run_dir: Path) -> list[dict] | None:
    """The returned program's predictors (final/program.json); None before the run finished."""
    doc = read_json(run_dir / "final" / "program.json")
    if doc is None:
        return None
    parts = []
    for name, state in (doc.get("predictors") or {}).items():
        sig = state.get("signature") or {}
        lm = state.get("lm") or {}
        parts.append({
            "name": name, "instructions": sig.get("instructions", ""),
            "inputs": ", ".join(f["name"] for f in sig.get("fields", []) if f.get("input")),
            "outputs": ", ".join(f["name"] for f in sig.get("fields", []) if not f.get("input")),
            "lm": f"{lm.get('backend', '?')}:{lm.get('model', '?')}"
                  + (f" + adapter {lm['adapter']}" if lm.get("adapter") else ""),
            "adapter": bool(lm.get("adapter")),
            "demos": ["\n".join(f"{k}: {short(v, 400)}" for k, v in demo.items()) for demo in state.get("demos") or []],
        })
    return parts


def _records(doc: Any) -> list[dict]:
    return doc["records"] if isinstance(doc, dict) else doc


def _pred_text(rec: dict) -> str:
    if rec.get("failure"):
        return f"[{rec['failure']} failure] {rec.get('error') or ''}"
    return "\n".join(f"{k}: {short(v, 400)}" for k, v in (rec.get("prediction") or {}).items())


def change_parts(run_dir: Path, max_examples: int) -> dict | None:
    """Test examples fixed and broken (the first ``max_examples`` of each); None without records."""
    base, final = read_json(run_dir / BASELINE_RECORDS), read_json(run_dir / TEST_RECORDS)
    if base is None or final is None:
        return None
    base_by = {r["index"]: r for r in _records(base)}
    final_by = {r["index"]: r for r in _records(final)}
    changes = compare_records(_records(base), _records(final))
    groups = []
    for kind in ("fixed", "broken"):
        shown = changes[kind][:max_examples]
        groups.append({"kind": kind, "total": len(changes[kind]), "shown": len(shown), "rows": [{
            "index": i, "example": "\n".join(f"{k}: {short(v, 400)}" for k, v in final_by[i]["example"].items()),
            "before": _pred_text(base_by[i]), "before_score": f"{base_by[i]['score']:g}",
            "after": _pred_text(final_by[i]), "after_score": f"{final_by[i]['score']:g}"} for i in shown]})
    return {"n": len(final_by), "fixed": len(changes["fixed"]), "broken": len(changes["broken"]), "groups": groups}


def step_rows(history: list[dict]) -> list[list[Any]]:
    first = step_offset(history)
    return [[first + i, h["kind"], h.get("status"), fmt(h.get("val_score")), fmt(h.get("inner_score")),
             fmt(round(h.get("wall_s") or 0.0, 1)), (h.get("usage") or {}).get("calls", 0), tokens(h.get("usage")),
             h.get("train_examples") if h["kind"] == "w" else "–",
             failures_text((h.get("extra") or {}).get("val_failures")), short(h.get("detail", ""), 160)]
            for i, h in enumerate(history)]


STEP_HEADER = ["step", "kind", "status", "dev %", "inner %", "wall s", "LM calls", "tokens", "SFT examples",
               "dev failures", "detail"]


def candidate_parts(history: list[dict]) -> list[dict]:
    """Each prompt step's candidates: name (the chosen one marked), score, failed examples, demos per module."""
    first, out = step_offset(history), []
    for i, h in enumerate(history):
        cands = (h.get("extra") or {}).get("candidates")
        if not cands:
            continue
        named = re.match(r"chose (.+?) \(\d", h.get("detail") or "")  # RandomSearch's detail names its choice
        names = [c.get("candidate") for c in cands]
        best = (names.index(named.group(1)) if named and named.group(1) in names
                else max(range(len(cands)), key=lambda j: (cands[j].get("score") or 0.0, -j)))
        out.append({"step": first + i, "kind": h["kind"], "detail": h.get("detail", ""), "rows": [
            [c.get("candidate") + (" (chosen)" if j == best else ""), fmt(c.get("score")), c.get("failed", "–"),
             " / ".join(str(d) for d in c.get("demos") or []) or "–"] for j, c in enumerate(cands)]})
    return out


def loss_parts(run_dir: Path, history: list[dict]) -> list[dict]:
    """Each trained adapter's loss curve: the whole one from its tandem_adapter.json when the folder is
    still there, else the last losses history.json keeps."""
    first, out = step_offset(history), []
    for i, h in enumerate(history):
        for key, info in ((h.get("extra") or {}).get("adapters") or {}).items():
            if not isinstance(info, dict):  # another step's record (the RL step's: module -> adapter path)
                continue
            meta = _adapter_meta(run_dir, key)
            losses = ((meta or {}).get("training") or {}).get("losses") or info.get("losses") or []
            whole = bool(meta) or len(losses) >= (info.get("steps") or 0)
            out.append({"step": first + i, "adapter": Path(key).name, "losses": losses, "whole": whole,
                        "row": [first + i, Path(key).name, ", ".join(info.get("modules") or []) or "–",
                                info.get("n_examples", "–"), info.get("steps", len(losses)),
                                f"{losses[0]:.3f}" if losses else "–", f"{losses[-1]:.3f}" if losses else "–",
                                f"{min(losses):.3f}" if losses else "–", fmt(info.get("wall_s")),
                                fmt(info.get("serve_setup_s")),
                                "whole curve" if whole else f"last {len(losses)} steps only"]})
    return out


LOSS_HEADER = ["step", "adapter", "modules", "examples", "optimizer steps", "first loss", "last loss", "lowest loss",
               "training s", "serve setup s", "curve"]


def rl_parts(run_dir: Path, history: list[dict]) -> list[dict]:
    """Each RL step's reward curve (its record's ``extra["steps"]``): per RL step the mean reward, its
    spread, the groups whose rewards were all equal, failures, loss, time per phase and tokens; the
    step's totals per phase, and the LoRA(s) it ended with (``extra["adapters"]``)."""
    first, out = step_offset(history), []
    for i, h in enumerate(history):
        extra = h.get("extra") or {}
        steps = extra.get("steps")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) and "mean_reward" in s
                                                               for s in steps):
            continue
        rows = [[s.get("step", j + 1), fmt(s["mean_reward"], 3), fmt(s.get("reward_std"), 3),
                 f"{fmt(s.get('reward_min'), 2)} – {fmt(s.get('reward_max'), 2)}",
                 f"{s.get('zero_variance_groups', '–')}/{s.get('groups', '–')}", failures_text(s.get("failures")),
                 fmt(s.get("loss"), 4), fmt(s.get("rollout_s")), fmt(s.get("train_s")), fmt(s.get("sync_s")),
                 fmt(s.get("checkpoint_s")), tokens(s.get("usage")) if s.get("usage") else "–",
                 s.get("trained_tokens", "–")] for j, s in enumerate(steps)]
        adapters = []
        for key, path in (extra.get("adapters") or {}).items():
            if isinstance(path, str):
                training = ((_adapter_meta(run_dir, path) or {}).get("training") or {})
                adapters.append([key, Path(path).name, training.get("updates", "–"),
                                 ", ".join(training.get("modules") or []) or "–"])
        phases = extra.get("phases_s") or {}
        out.append({
            "step": first + i, "kind": h["kind"], "detail": h.get("detail", ""), "rows": rows, "adapters": adapters,
            "means": [s["mean_reward"] for s in steps], "stds": [s.get("reward_std") or 0.0 for s in steps],
            "zero_shares": [s.get("zero_variance_share") or 0.0 for s in steps],
            "first": steps[0]["mean_reward"], "last": steps[-1]["mean_reward"], "n": len(steps),
            "zero": sum(s.get("zero_variance_groups") or 0 for s in steps),
            "groups": sum(s.get("groups") or 0 for s in steps),
            "phases": [[name, fmt(phases.get(key))] for key, name in (
                ("rollout", "rollouts"), ("train", "training"), ("sync", "putting the LoRA on the engine"),
                ("checkpoint", "checkpoints"))],
            "tokens": extra.get("tokens") or {}, "resumed": extra.get("resumed_after_step"),
        })
    return out


RL_HEADER = ["RL step", "mean reward", "std", "min – max", "equal-reward groups", "failures", "loss", "rollouts s",
             "training s", "sync s", "checkpoint s", "rollout tokens", "trained tokens"]


def _adapter_meta(run_dir: Path, key: str) -> dict | None:
    """tandem_adapter.json of an adapter recorded as ``key`` (a path as the run saw it)."""
    p = Path(key)
    tries = [p]
    if "steps" in p.parts:  # the run directory may have moved since
        tries.append(run_dir.joinpath(*p.parts[p.parts.index("steps"):]))
    for d in tries:
        try:
            meta = read_json(d / META_FILE)
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict):
            return meta
    return None


def time_rows(res: dict, base: dict | None) -> list[list[Any]]:
    """(what, seconds, what it counts) for one run; the total is what ``tandem optimize`` printed."""
    load, wall = res.get("model_load_s"), res.get("wall_s")
    return [
        ["model load", fmt(load), "loading the model and starting its engine (recorded by tandem optimize; "
                                  "an experiment loads each model once for all its runs)"],
        ["steps", fmt(res.get("optimize_s")), "the steps' own wall times, the start's validation included "
                                              "(the same however often the run resumed)"],
        ["test evaluation", fmt(res.get("test_wall_s")), "the returned program on the test split"],
        ["zero-shot test evaluation", fmt((base or {}).get("wall_s")),
         "the unoptimized program on test (evaluated once per split and model; later runs reuse it)"],
        ["the run", fmt(wall), "this process from the data to results.json: steps, both test evaluations, "
                               "saving (a resumed run counts only what it redid)"],
        ["total", fmt(round(load + wall, 1)) if load is not None and wall is not None else "–",
         "model load + the run: the CLI's total"],
    ]


# -- one run ---------------------------------------------------------------------------------------------
def run_context(run_dir: Path, max_examples: int, plots: bool) -> dict:
    """What the run templates show; ``plots``: draw the figures (the experiment report shows tables only)."""
    res = read_json(run_dir / RESULTS) or {}
    cfg = read_json(run_dir / "config.json") or {}
    plan = read_json(run_dir / "plan.json") or {}
    base = read_json(run_dir / BASELINE_RECORDS)
    history = res.get("history") or read_json(run_dir / "history.json") or []
    first = step_offset(history)
    task = res.get("task") or Path(str(cfg.get("task", "?"))).stem
    sizes = res.get("sizes") or (cfg.get("resolved") or {}).get("sizes") or {}
    best = res.get("best_step")
    summary = [
        ["splits (train/dev/test)", f"{sizes.get('train', '?')}/{sizes.get('dev', '?')}/{sizes.get('test', '?')}"],
        ["prompt-step sizes (bootstrap/select)", "/".join(str(x) for x in res.get("prompt_sizes") or []) or "–"],
        ["dev score of the returned program", fmt(res.get("dev_score"))],
        ["returned step", "–" if best is None else str(best + first)],
        ["test score", fmt(res.get("test_score"))],
        ["zero-shot test score", fmt(res.get("zero_shot_test_score"))],
        ["fixed / broken test examples", f"{res.get('fixed', '–')} / {res.get('broken', '–')}"],
        ["test failures (returned program)", failures_text(res.get("test_failures")) if res else "–"],
        ["zero-shot test failures", failures_text((base or {}).get("failures")) if base else "–"],
    ]
    labels = [f"{first + i}: {h['kind']}" for i, h in enumerate(history)]
    losses = loss_parts(run_dir, history)
    rl = rl_parts(run_dir, history)
    figures = {"scores": None, "costs": None, "loss": None, "reward": None}
    if plots and history:
        returned = (best + first, res["test_score"]) if best is not None and res.get("test_score") is not None else None
        figures = {
            "scores": report_plots.run_scores(list(range(first, first + len(history))), labels,
                                              [h.get("val_score") for h in history],
                                              [h.get("inner_score") for h in history],
                                              res.get("zero_shot_test_score"), returned),
            "costs": report_plots.run_costs(labels, [h.get("wall_s") or 0.0 for h in history],
                                            [tokens(h.get("usage")) for h in history]),
            "loss": report_plots.loss_curves([(f"step {x['step']} · {x['adapter']}", x["losses"]) for x in losses]),
            "reward": report_plots.reward_curves([(f"step {x['step']} ({x['kind']})", x["means"], x["stds"],
                                                   x["zero_shares"]) for x in rl]),
        }
    times = time_rows(res, base)
    return {
        "title": f"{task_label(task)}: {res.get('strategy') or plan.get('strategy') or cfg.get('strategy', '?')}",
        "run_dir": str(run_dir), "model": res.get("model") or cfg.get("model", "?"),
        "seed": res.get("seed", cfg.get("seed")), "finished": bool(res), "summary": summary,
        "notes": res.get("notes") or [], "times": times, "settings": setting_rows(cfg, ("resolved",)),
        "steps": step_rows(history), "step_header": STEP_HEADER, "history": history,
        "candidates": candidate_parts(history), "losses": losses, "loss_header": LOSS_HEADER,
        "rl": rl, "rl_header": RL_HEADER,
        "figures": figures, "program": program_parts(run_dir), "changes": change_parts(run_dir, max_examples),
        "res": res, "time_line": ", ".join(f"{r[0]} {r[1]} s" for r in times if r[1] != "–"),
    }
