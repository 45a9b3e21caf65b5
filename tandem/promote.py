"""The promotion gate: ``tandem promote CHALLENGER --over DEPLOY --data FILE``.

    outcome = run_gate("runs/iris-from-log", "deploy/iris", "data.jsonl", alpha=0.05, guard="failures")
    outcome.promoted, outcome.record["test"]["p_value"], outcome.comparison

The champion (the deployment's, ``tandem.deploy``) and the challenger run on
the same examples (``tandem.compare.comparison_of``: both scores with 95%
intervals, and ``tandem.experiments.stats.paired_test``: exact McNemar for
0/1 outcomes, else a paired bootstrap). The challenger is promoted only when

1. it scored higher than the champion, and the two-sided p-value of the
   paired test is below ``alpha`` (default 0.05), and
2. with a ``guard``, it is no worse on the guard than the champion, within
   ``guard_tolerance``: ``failures`` (percent of examples whose run failed),
   ``tokens``, ``output_tokens`` or ``calls`` (per example; lower is better),
   or ``module:function``, a metric ``(example, prediction, trace=None)``
   (percent; higher is better).

Before anything runs (each a one-line ValueError, nothing written): the
deployment exists; the challenger is the champion's program class with the
same predictors and fields, on the same base model(s), and (when both
recorded one) made for the same task; the data holds the program's input and
label fields; alpha, guard and split are valid. The decision, promoted or
refused, is recorded in deploy.json (``record``: who, when, both scores and
intervals, the test, the data file's and the examples' sha256); a promotion
copies the challenger in as the new champion in the same step.

Data: an examples file of ``tandem data from-log`` (its ``test`` split when
it records splits, else every example; ``split`` chooses), or the task's
own data (``tandem.compare.eval_examples``; default its test split).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tandem import deploy
from tandem.compare import Comparison, comparison_of, eval_config, eval_examples, load_saved, model_label, run_settings
from tandem.evaluate import evaluate
from tandem.evaluate.evaluate import EvalResult
from tandem.log_examples import check_examples, is_examples_file, read_examples
from tandem.program import Example, Prediction
from tandem.program.program_file import read_program_file, resolve_program_dir
from tandem.tasks.errors import DataError

LOWER_IS_BETTER = {
    "failures": lambda r: 100.0 if r.failure else 0.0,
    "tokens": lambda r: float(r.usage.prompt_tokens + r.usage.output_tokens),
    "output_tokens": lambda r: float(r.usage.output_tokens),
    "calls": lambda r: float(r.usage.calls),
}


@dataclass
class Outcome:
    promoted: bool
    record: dict
    comparison: Comparison
    version: str | None = None  # the new champion's, when promoted
    notes: list[str] = field(default_factory=list)


def check_pair(champion_dir: Path, challenger_dir: Path) -> None:
    """The challenger is a program of the champion's task and model; else one line saying how it differs."""
    a, b = read_program_file(champion_dir), read_program_file(challenger_dir)
    task_a, task_b = run_settings(champion_dir).get("task"), run_settings(challenger_dir).get("task")
    if task_a and task_b and task_a != task_b:
        raise ValueError(f"the challenger {challenger_dir} was made for task {task_b}, the champion for {task_a}")
    if a["program"] != b["program"]:
        raise ValueError(f"the challenger {challenger_dir} is a {b['program']} program, the champion a {a['program']}")

    def shape(doc: dict) -> dict:
        return {name: [(f["name"], f["input"]) for f in s["signature"]["fields"]] for name, s in doc["predictors"].items()}

    if shape(a) != shape(b):
        raise ValueError(f"the challenger {challenger_dir} has other predictors or fields than the champion "
                         f"({shape(b)} against {shape(a)})")

    def models(doc: dict) -> list[str]:
        return sorted({f"{s['lm']['backend']}:{s['lm']['model']}" for s in doc["predictors"].values() if s.get("lm")})

    if models(a) != models(b):
        raise ValueError(f"the challenger {challenger_dir} runs on {', '.join(models(b)) or 'no saved model'}, the "
                         f"champion on {', '.join(models(a)) or 'no saved model'}; a promotion keeps the model")


def guard_function(guard: str | None) -> tuple[Callable | None, bool]:
    """``(per-record value, lower_is_better)`` of a guard name (module docstring)."""
    if guard is None:
        return None, True
    if guard in LOWER_IS_BETTER:
        return LOWER_IS_BETTER[guard], True
    module, sep, name = guard.partition(":")
    if not sep:
        raise ValueError(f"--guard must be one of {', '.join(LOWER_IS_BETTER)} or module:function (a metric), "
                         f"got {guard!r}")
    try:
        metric = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--guard {guard}: cannot import it ({exc})") from None

    def value(r) -> float:
        if r.prediction is None:
            return 0.0
        return 100.0 * float(metric(Example(r.example), Prediction(r.prediction), None))

    return value, False


def sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _examples_of_file(path: Path, split: str | None) -> tuple[list[Example], str]:
    rows = read_examples(path)
    recorded = {s for _, s in rows if s is not None}
    if split is None:
        split = "test" if "test" in recorded else "all"
    if split == "all":
        return [ex for ex, _ in rows], split
    if not recorded:
        raise ValueError(f"{path} records no splits (tandem data from-log --split makes them); use --split all")
    examples = [ex for ex, s in rows if s == split]
    if not examples:
        raise ValueError(f"{path} has no {split} examples")
    return examples, split


def gate_examples(data: str, champion_dir: Path, challenger_dir: Path, *, split: str | None, task: str | None,
                  limit: int | None):
    """``(task, examples, loaded, split, cfg)`` to promote on."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    cfg = eval_config([champion_dir, challenger_dir], task=task, data=str(path.resolve()))
    if is_examples_file(path):
        from tandem.experiments.config import resolve_task

        task_ = resolve_task(cfg)
        if task_.program_takes_data:
            raise ValueError(f"task {task_.name} builds its program from its own data; promote it on its data, "
                             "not on an examples file")
        examples, split = _examples_of_file(path, split)
        loaded = None
    else:
        split = split or "test"
        try:
            task_, examples, loaded = eval_examples(cfg, split, None)
        except DataError as exc:
            raise DataError(f"--data {data} is neither an examples file (tandem data from-log) nor {cfg.task} "
                            f"data: {exc}") from None
    examples = examples[:limit] if limit is not None else examples
    if not examples:
        raise ValueError(f"--data {data}: no examples in the {split} split")
    return task_, examples, loaded, split, cfg


def _guard_summary(value: Callable, lower: bool, res_a: EvalResult, res_b: EvalResult, name: str,
                   tolerance: float) -> dict:
    a = sum(value(r) for r in res_a.records) / res_a.n
    b = sum(value(r) for r in res_b.records) / res_b.n
    ok = b <= a + tolerance if lower else b >= a - tolerance
    return {"name": name, "champion": round(a, 4), "challenger": round(b, 4), "tolerance": tolerance,
            "lower_is_better": lower, "passed": bool(ok)}


def run_gate(challenger: str | os.PathLike, deploy_dir: str | os.PathLike, data: str, *, split: str | None = None,
             alpha: float = 0.05, guard: str | None = None, guard_tolerance: float = 0.0, task: str | None = None,
             by: str | None = None, limit: int | None = None, lm_options: dict | None = None, threads: int = 64,
             progress: Callable[[str, int, int], None] | None = None) -> Outcome:
    """Run the gate (module docstring) and record its decision in the deployment."""
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be between 0 and 1, got {alpha}")
    if guard_tolerance < 0:
        raise ValueError(f"--guard-tolerance must be >= 0, got {guard_tolerance}")
    if split not in (None, "train", "dev", "test", "all"):
        raise ValueError(f"--split must be train, dev, test or all, got {split!r}")
    value, lower = guard_function(guard)
    champion_dir, version = deploy.champion(deploy_dir)
    challenger_dir = resolve_program_dir(challenger)
    if challenger_dir.resolve() == champion_dir.resolve():
        raise ValueError(f"the challenger {challenger} is the champion {version} itself")
    check_pair(champion_dir, challenger_dir)
    task_, examples, loaded, split, cfg = gate_examples(data, champion_dir, challenger_dir, split=split, task=task,
                                                        limit=limit)
    built: dict = {}
    options = {"cache": False, **(lm_options or {})}
    champion_program, _ = load_saved(champion_dir, task_, loaded, lm_options=options, lms=built)
    challenger_program, _ = load_saved(challenger_dir, task_, loaded, lm_options=options, lms=built)
    check_examples(examples, champion_program, f"--data {data}")
    lms = list({id(lm): lm for lm in (*champion_program.lms(), *challenger_program.lms())}.values())
    results: list[EvalResult] = []
    try:
        for lm in lms:
            lm.start()
        for label, program in (("champion", champion_program), ("challenger", challenger_program)):
            bar = (lambda d, t, label=label: progress(label, d, t)) if progress else None
            results.append(evaluate(program, examples, task_.metric, num_threads=threads, progress=bar))
    finally:
        for lm in lms:
            lm.close()
    c = comparison_of(results[0], results[1], f"champion {version}", f"challenger {challenger}")
    c.setting = {"task": cfg.task, "split": split, "data": str(data), "split_seed": cfg.split_seed(),
                 "model_a": model_label(champion_program), "model_b": model_label(challenger_program)}
    t = c.test
    better, significant = c.score_b > c.score_a, t.p_value < alpha
    guard_result = _guard_summary(value, lower, results[0], results[1], guard, guard_tolerance) if value else None
    promoted = better and significant and (guard_result is None or guard_result["passed"])
    if promoted:
        reason = f"the challenger is better at p = {t.p_value:.3g} < {alpha}"
    elif not better:
        reason = f"the challenger did not score higher ({c.score_b:.1f}% against {c.score_a:.1f}%)"
    elif not significant:
        reason = f"the difference is not significant at {alpha} (p = {t.p_value:.3g})"
    else:
        reason = (f"the challenger is worse on the guard {guard} ({guard_result['challenger']} against "
                  f"{guard_result['champion']}, tolerance {guard_tolerance})")
    examples_sha = hashlib.sha256(json.dumps([dict(ex) for ex in examples], sort_keys=True, default=str,
                                             ensure_ascii=False).encode()).hexdigest()
    record: dict[str, Any] = {
        "by": deploy.who(by), "time": deploy.now(), "challenger": str(Path(challenger).resolve()),
        "champion": version, "task": cfg.task, "data": str(Path(data).resolve()), "split": split, "n": c.n,
        "data_sha256": sha256_file(Path(data)), "examples_sha256": examples_sha,
        "scores": {"champion": {"score": round(c.score_a, 4), "ci95": [round(x, 4) for x in c.ci_a]},
                   "challenger": {"score": round(c.score_b, 4), "ci95": [round(x, 4) for x in c.ci_b]},
                   "interval": c.interval},
        "test": {"method": t.method, "p_value": t.p_value, "diff_points": round(-100 * t.diff, 4),
                 "ci95_points": [round(-100 * t.ci95[1], 4), round(-100 * t.ci95[0], 4)],
                 "challenger_better": t.b_better, "champion_better": t.a_better},
        "alpha": alpha, "guard": guard_result, "decision": "promoted" if promoted else "refused", "reason": reason,
    }
    if promoted:
        new_version = deploy.promote(deploy_dir, challenger_dir, record, expect=version)
        return Outcome(True, record, c, new_version)
    deploy.note_refusal(deploy_dir, record)
    return Outcome(False, record, c)
