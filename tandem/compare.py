"""Saved programs on a task's data: ``tandem eval --program`` and ``tandem compare``.

    cfg = eval_config(["runs/iris-pwp-s0"])          # the task, data, sizes and split seed the run used
    task, examples, loaded = eval_examples(cfg, "test")
    program, program_dir = load_saved("runs/iris-pwp-s0", task, loaded)
    c = compare_saved("runs/iris-p-s0", "runs/iris-pwp-s0", split="test")
    c.score_a, c.ci_a, c.b_fixed, c.b_broke, c.test.p_value, c.to_dict()

A saved program is a folder with program.json, or a run directory (its
``final/``, as ``tandem serve`` finds it). Which data: the task, ``data``,
``sizes`` and split seed recorded in the run's config.json when there is one
(the first program's, else the second's), then a ``--config`` file, then
``--set`` overrides, then the task, ``--data`` and ``--seed`` given; a task
given that is not the recorded one drops the recorded settings. ``split``
is train, dev, test, or ``all``: every example of the data (the task's
``read`` when it has one, else its three splits together).

``compare_programs`` runs both programs on the same examples and pairs their
per-example scores: each score with a 95% interval over examples (Wilson's
for 0/1 outcomes, else a bootstrap of the mean), the examples where B scored
higher than A (``b_fixed``) and lower (``b_broke``), and
``tandem.experiments.stats.paired_test`` (exact McNemar for 0/1 outcomes,
paired bootstrap otherwise; its ``diff`` is mean A - B in 0..1 units).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from scipy import stats as _sps

from tandem.deploy import program_source
from tandem.evaluate import EvalResult, evaluate
from tandem.experiments.config import RunConfig, load_config, resolve_path, resolve_task
from tandem.experiments.run import load_data, records_of
from tandem.experiments.stats import PairedTest, bootstrap_diff, is_binary, paired_test
from tandem.log_examples import check_examples, is_examples_file, read_examples
from tandem.persist import load_program
from tandem.program import Example, Module
from tandem.tasks.registry import Task

SPLITS = ("train", "dev", "test", "all")


# -- which data -----------------------------------------------------------------------------------
def run_settings(program_dir: str | os.PathLike) -> dict[str, Any]:
    """The data settings of the run that saved ``program_dir`` (a run's ``final/``): task, data, sizes and
    split seed from its config.json; ``{}`` for a program saved elsewhere."""
    program_dir = Path(program_dir)
    path = program_dir.parent / "config.json" if program_dir.name == "final" else program_dir / "config.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
        return {}
    resolved = doc.get("resolved") if isinstance(doc.get("resolved"), dict) else {}
    seed = resolved.get("split_seed", doc["seed"] if doc.get("data_seed") is None else doc["data_seed"])
    out = {"task": doc["task"], "data": doc.get("data"), "sizes": doc.get("sizes"), "data_seed": seed}
    out = {k: v for k, v in out.items() if v is not None}
    if isinstance(out.get("sizes"), list):
        out["sizes"] = tuple(out["sizes"])
    return out


def eval_config(program_dirs: Sequence[str | os.PathLike] = (), *, config: str | None = None,
                overrides: list[str] | None = None, task: str | None = None, data: str | None = None,
                seed: int | None = None, model: str | None = None, notes: list[str] | None = None) -> RunConfig:
    """The settings that pick the examples (module docstring: the order they win in).

    ``seed`` is the split seed. ``notes`` receives a line when the programs'
    runs recorded different data (the first one's is used). No task anywhere:
    a ValueError saying how to give one.
    """
    recorded = [r for r in (run_settings(d) for d in program_dirs) if r]
    base = recorded[0] if recorded else {}
    if notes is not None and len(recorded) > 1 and recorded[0] != recorded[1]:
        notes.append(f"the two runs used different data settings; both are evaluated on the first's: {base}")
    if task is not None and base and (resolve_path(task) if task.endswith(".py") else task) != base["task"]:
        base = {}

    def build(defaults: dict) -> RunConfig:
        return load_config(config, overrides, defaults={"task": None, **defaults}, task=task, data=data,
                           data_seed=seed, model=model)

    cfg = build(base)
    if base and cfg.task != base["task"]:  # the config file or --set named another task
        cfg = build({})
    if not cfg.task:
        raise ValueError("which task? name it (iris, gsm8k, hotpotqa, or a task .py file), give a --config that "
                         "sets it, or a run directory whose config.json records it")
    return cfg


def eval_examples(cfg: RunConfig, split: str, limit: int | None = None) -> tuple[Task, list[Example], Any]:
    """``(task, examples, loaded)``: ``split``'s examples (the first ``limit``) and what the task's load
    returned (None when ``split == "all"`` was read with the task's ``read`` or from every line of an examples
    file of ``tandem data from-log``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    task = resolve_task(cfg)
    if split == "all" and is_examples_file(cfg.data) and not task.program_takes_data:
        examples, loaded = [ex for ex, _ in read_examples(cfg.data)], None  # every line, whatever its split
        check_examples(examples, task.make_program(), str(cfg.data))
    elif split == "all" and task.read is not None and not task.program_takes_data:
        examples, loaded = list(task.read(cfg.data)), None
    else:
        task, loaded = load_data(cfg, task=task)
        examples = [*loaded["train"], *loaded["dev"], *loaded["test"]] if split == "all" else list(loaded[split])
    return task, examples[:limit] if limit is not None else examples, loaded


def load_saved(path: str | os.PathLike, task: Task, loaded: Any = None, *, lm_options: dict | None = None,
               lms: dict | None = None) -> tuple[Module, Path]:
    """``(program, its folder)`` from a saved program or run directory, with its saved models; a task that
    builds its program from the data (a retriever) gets ``task.make_program(loaded)`` as the base."""
    program_dir = program_source(path)
    base = task.make_program(loaded) if task.program_takes_data else None
    return load_program(program_dir, program=base, lm_options=lm_options, lms=lms), program_dir


def program_to_eval(cfg: RunConfig, task: Task, loaded: Any, program_dir: str | os.PathLike | None = None, *,
                    no_cache: bool = False) -> Module:
    """The saved program at ``program_dir`` with its models, or else the task's program on ``cfg.model``
    (with ``cfg.format`` and ``cfg.backend_options``); the LMs are built, not started."""
    options = {"cache": False} if no_cache else {}
    if program_dir is not None:
        return load_saved(program_dir, task, loaded, lm_options=options)[0]
    from tandem.lm.registry import get_lm

    program = task.make_program(loaded).set_lm(get_lm(cfg.model, **{**cfg.backend_options, **options}))
    return program.set_format(cfg.format) if cfg.format is not None else program


def model_label(program: Module) -> str:
    """The program's models, as ``backend:model[+adapter]``, comma-separated (``none`` without any)."""
    names = []
    for lm in program.lms():
        ref = lm.spec()
        label = f"{ref.get('backend')}:{ref.get('model')}" + (f"+{Path(ref['adapter']).name}" if ref.get("adapter") else "")
        if label not in names:
            names.append(label)
    return ", ".join(names) or "none"


# -- comparing --------------------------------------------------------------------------------------
def wilson_interval(k: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``k / n``, in percent."""
    if n <= 0:
        raise ValueError("an interval needs at least one example")
    z = float(_sps.norm.ppf((1 + level) / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def bootstrap_ci(outcomes: Sequence[float]) -> tuple[float, float]:
    """The bootstrap percentile interval of the mean (10,000 seeded resamples), in percent."""
    lo, hi, _ = bootstrap_diff(outcomes)
    return 100 * lo, 100 * hi


@dataclass
class Comparison:
    """Programs A and B on the same ``n`` examples (scores in percent, example indices from 0)."""

    a: str
    b: str
    n: int
    score_a: float
    score_b: float
    ci_a: tuple[float, float]
    ci_b: tuple[float, float]
    interval: str  # "wilson" or "bootstrap"
    b_fixed: list[int]  # examples B scored higher on than A (A wrong, B right for 0/1)
    b_broke: list[int]  # examples B scored lower on
    test: PairedTest  # A against B: diff = mean(A - B), p_value, method
    failures_a: dict[str, int] = field(default_factory=dict)
    failures_b: dict[str, int] = field(default_factory=dict)
    setting: dict = field(default_factory=dict)  # task, split, data, split seed, sizes, models
    notes: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # per example: example, and A's and B's prediction/score

    def to_dict(self) -> dict:
        out = asdict(self)
        out["test"] = {**asdict(self.test), "diff_b_minus_a_points": round(-100 * self.test.diff, 2)}
        return out


def comparison_of(result_a: EvalResult, result_b: EvalResult, a: str = "A", b: str = "B") -> Comparison:
    """Pair two evaluations of the same examples (same order) into a Comparison."""
    if result_a.n != result_b.n or not result_a.n:
        raise ValueError(f"a comparison needs the same examples, at least one: got {result_a.n} and {result_b.n}")
    xs = [r.score for r in result_a.records]
    ys = [r.score for r in result_b.records]
    kind = "wilson" if is_binary(xs, ys) else "bootstrap"  # one kind for both, so they read alike
    ci_a, ci_b = ((wilson_interval(sum(v), len(v)) if kind == "wilson" else bootstrap_ci(v)) for v in (xs, ys))
    records = [{"index": ra["index"], "example": ra["example"],
                "a": {k: ra[k] for k in ("prediction", "score", "failure", "error")},
                "b": {k: rb[k] for k in ("prediction", "score", "failure", "error")}}
               for ra, rb in zip(records_of(result_a), records_of(result_b))]
    return Comparison(
        a=a, b=b, n=result_a.n, score_a=result_a.score, score_b=result_b.score, ci_a=ci_a, ci_b=ci_b,
        interval=kind, b_fixed=[i for i, (x, y) in enumerate(zip(xs, ys)) if y > x],
        b_broke=[i for i, (x, y) in enumerate(zip(xs, ys)) if y < x], test=paired_test(xs, ys),
        failures_a=dict(result_a.failures), failures_b=dict(result_b.failures), records=records)


def compare_programs(program_a: Module, program_b: Module, examples: Sequence[Example], metric: Callable, *,
                     a: str = "A", b: str = "B", threads: int = 64,
                     progress: Callable[[str, int, int], None] | None = None) -> Comparison:
    """Evaluate both programs (their LMs already set and started) on ``examples`` and compare them.

    ``progress(label, done, total)`` is called with label ``"A"`` and then ``"B"``.
    """
    results = []
    for label, program in (("A", program_a), ("B", program_b)):
        bar = (lambda d, t, label=label: progress(label, d, t)) if progress else None
        results.append(evaluate(program, examples, metric, num_threads=threads, progress=bar))
    return comparison_of(results[0], results[1], a, b)


def compare_saved(path_a: str | os.PathLike, path_b: str | os.PathLike, *, task: str | None = None,
                  split: str = "test", data: str | None = None, seed: int | None = None,
                  config: str | None = None, overrides: list[str] | None = None, limit: int | None = None,
                  lm_options: dict | None = None, threads: int = 64,
                  progress: Callable[[str, int, int], None] | None = None) -> Comparison:
    """Two saved programs (or run directories) on the same data (module docstring); builds, starts and
    closes their LMs (one engine per model for both)."""
    dirs = [program_source(p) for p in (path_a, path_b)]
    notes: list[str] = []
    cfg = eval_config(dirs, config=config, overrides=overrides, task=task, data=data, seed=seed, notes=notes)
    task_, examples, loaded = eval_examples(cfg, split, limit)
    if not examples:
        raise ValueError(f"the {split} split of {task_.name} has no examples")
    built: dict = {}
    program_a, _ = load_saved(dirs[0], task_, loaded, lm_options=lm_options, lms=built)
    program_b, _ = load_saved(dirs[1], task_, loaded, lm_options=lm_options, lms=built)
    lms = list({id(lm): lm for lm in (*program_a.lms(), *program_b.lms())}.values())
    try:
        for lm in lms:
            lm.start()
        c = compare_programs(program_a, program_b, examples, task_.metric, a=str(path_a), b=str(path_b),
                             threads=threads, progress=progress)
    finally:
        for lm in lms:
            lm.close()
    c.setting = {"task": cfg.task, "split": split, "data": cfg.data, "split_seed": cfg.split_seed(),
                 "sizes": list(cfg.sizes) if cfg.sizes else None, "limit": limit,
                 "model_a": model_label(program_a), "model_b": model_label(program_b)}
    c.notes = notes
    return c


def summary_lines(c: Comparison) -> list[str]:
    """What ``tandem compare`` prints: both scores with intervals, fixed/broken counts, the paired test."""
    kind = "Wilson" if c.interval == "wilson" else "bootstrap"

    def line(name: str, path: str, score: float, ci: tuple[float, float], failures: dict, model: str) -> str:
        failed = sum(failures.values())
        return (f"{name} {path} ({model}): {score:.1f}% [95% {kind} interval {ci[0]:.1f}, {ci[1]:.1f}]"
                + (f", {failed} failed" if failed else ""))

    t = c.test
    # the interval of B - A; + 0.0 turns -0.0 (no difference) into 0.0
    diff, lo, hi = -100 * t.diff + 0.0, -100 * t.ci95[1] + 0.0, -100 * t.ci95[0] + 0.0
    better = "scored higher" if c.interval != "wilson" else "got right"
    s = c.setting
    return [
        f"{s.get('task')} / {s.get('split')} split (split seed {s.get('split_seed')}): {c.n} examples",
        line("A", c.a, c.score_a, c.ci_a, c.failures_a, c.setting.get("model_a", "?")),
        line("B", c.b, c.score_b, c.ci_b, c.failures_b, c.setting.get("model_b", "?")),
        f"on {c.n} examples, B fixed {len(c.b_fixed)} (B {better}, A not) and broke {len(c.b_broke)} (the reverse)",
        f"B - A: {diff:+.1f} points [95% interval {lo:+.1f}, {hi:+.1f}]; "
        f"{'exact McNemar' if t.method == 'mcnemar-exact' else 'paired bootstrap'} p = {t.p_value:.3g}",
    ]
