"""One run: a task, a model, a strategy and a seed, into one run directory.

    lm = get_lm("smollm2-135m"); lm.start()
    summary = run_cell(load_config(task="iris", strategy="p -> w"), lm)
    summary["test_score"], summary["history"]

``tandem optimize`` runs one of these; ``tandem experiment`` runs a grid of
them on shared engines. The strategy ``"zero-shot"`` evaluates the task's
program as it is. The caller owns the LM: ``run_cell`` neither starts nor
closes it, so one engine serves many runs.

Run directory (besides BetterTogether's plan.json, history.json, steps/, final/):

- ``config.json``: the settings, with the sizes actually used;
- ``test_records.json``: the returned program on the test split, one record
  per example (example, prediction, score, failure, error);
- ``baseline_records.json``: the same for the unoptimized (zero-shot)
  program, so a report can show which examples the optimization fixed and
  which it broke;
- ``results.json``: the summary, written last: a run directory with it is
  finished, one without it resumes from its last finished step.

Resuming (``resume=True``, ``--resume``, every run of a grid) reuses
finished steps only under the same settings: BetterTogether's plan.json
records everything that changes a step's result, and ``run_cell`` adds the
task, the data path, the split seed, the train and dev sizes and the model.
A mismatch is a ``ResumeMismatch`` (one line, ``setting: was X, now Y``)
raised before config.json or any other file is written and before the model
runs. The test size is not among them: the steps never see the test split
(if another test size changes the train or dev examples, their hashes
differ). ``threads`` does not count. The summary's ``reused_steps`` lists the
history indices that came from the run directory; ``info`` is told which.

The summary's ``history`` is BetterTogether's: ``history[0]`` is the start
(the given program on dev, ``kind="start"``), the strategy's steps are
``history[1..n]``; ``best_step`` is a history index (0: every step scored
lower than the start, and the given program was returned), ``None`` for a
zero-shot run; ``start_dev_score`` is the given program's dev score.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from tandem.evaluate import evaluate
from tandem.evaluate.evaluate import EvalResult
from tandem.experiments.config import ZERO_SHOT, RunConfig, is_zero_shot, resolve_task
from tandem.fileio import write_json
from tandem.log_examples import check_examples, examples_splits, is_examples_file
from tandem.optimize.base import Progress
from tandem.tasks.registry import Task

log = logging.getLogger(__name__)

RESULTS = "results.json"
TEST_RECORDS = "test_records.json"
BASELINE_RECORDS = "baseline_records.json"


def strategy_slug(strategy: str) -> str:
    """``"p -> w -> p"`` -> ``"pwp"``; ``"zero-shot"`` stays (the names of run directories)."""
    if is_zero_shot(strategy):
        return ZERO_SHOT
    return strategy.replace(" ", "").replace("->", "")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def load_data(cfg: RunConfig, task: Task | None = None, cache: dict | None = None):
    """``(task, data)``: the task and what its loader returned for ``cfg`` (reused from ``cache``).

    ``cfg.data`` may be an examples file of ``tandem data from-log`` (``tandem.log_examples``):
    its splits, checked against the task's program, instead of the task's loader."""
    task = task or resolve_task(cfg)
    key = ("data", cfg.task, cfg.data, cfg.split_seed(), cfg.sizes)  # cfg.task: a task file's whole path
    if cache is not None and key in cache:
        return task, cache[key]
    if is_examples_file(cfg.data):
        data = _log_examples(cfg, task)
    else:
        data = task.load(data=cfg.data, seed=cfg.split_seed(), **({"sizes": cfg.sizes} if cfg.sizes else {}))
    if cache is not None:
        cache[key] = data
    return task, data


def _log_examples(cfg: RunConfig, task: Task) -> dict:
    if task.program_takes_data:
        raise ValueError(f"task {task.name} builds its program from its own data (a retriever); it cannot run on "
                         f"the examples of {cfg.data}")
    data = examples_splits(cfg.data, seed=cfg.split_seed(), sizes=cfg.sizes)
    check_examples([ex for rows in data.values() for ex in rows], task.make_program(), str(cfg.data))
    return data


def check_program_from(cfg: RunConfig, task: Task, data: Any, model: str | None = None) -> Path | None:
    """The folder of ``cfg.program_from``'s saved program, checked: the task's program class, on the run's
    model (``model``, ``backend:model``; default ``cfg.model``); a one-line ValueError otherwise. None without one."""
    if not cfg.program_from:
        return None
    from tandem.deploy import program_source
    from tandem.lm.registry import split_spec
    from tandem.program.program_file import read_program_file

    program_dir = program_source(cfg.program_from)
    doc = read_program_file(program_dir)
    cls = type(task.make_program(data))
    if doc["program"] != f"{cls.__module__}:{cls.__qualname__}":
        raise ValueError(f"{program_dir} holds a {doc['program']} program; task {task.name}'s program is "
                         f"{cls.__module__}:{cls.__qualname__}")
    model = model or ":".join(split_spec(cfg.model))
    for name, state in doc["predictors"].items():
        ref = state.get("lm") or {}
        if ref and f"{ref['backend']}:{ref['model']}" != model:
            raise ValueError(f"{program_dir}: predictor {name} runs on {ref['backend']}:{ref['model']}, this "
                             f"run's model is {model}; pass --model {ref['backend']}:{ref['model']}")
    return program_dir


def start_program(cfg: RunConfig, task: Task, data: Any, lm):
    """The program a run starts from: the task's on ``lm``, or the saved one of ``cfg.program_from`` (its
    prompts, demos and adapter, on ``lm``'s model; it must be the task's program class and that model)."""
    program = task.make_program(data)
    spec = lm.spec()
    model = f"{spec['backend']}:{spec['model']}"
    program_dir = check_program_from(cfg, task, data, model)
    if program_dir is not None:
        from tandem.persist import load_program

        program = load_program(program_dir, program=program, lms={model: lm})
        for _, pred in program.named_predictors():
            pred.lm = pred.lm or lm
    else:
        program.set_lm(lm)
    return program.set_format(cfg.format) if cfg.format is not None else program


def prompt_sizes(task: Task, cfg: RunConfig, n_train: int) -> tuple[int | None, int | None, str]:
    """The prompt step's (bootstrap, selection) sizes and a note when they were scaled down.

    Explicit ``prompt_train`` / ``prompt_val`` win. Otherwise the task's (paper's)
    sizes; when the training split is smaller than they need (``--set sizes=...``
    for a quick run), they keep their ratio and fill the training split.
    """
    if cfg.prompt_train is not None or cfg.prompt_val is not None or not task.prompt_sizes:
        return cfg.prompt_train, cfg.prompt_val, ""
    ptrain, pval = task.prompt_sizes
    if ptrain + pval <= n_train:
        return ptrain, pval, ""
    scaled = max(1, round(n_train * ptrain / (ptrain + pval)))
    note = (f"prompt-step sizes {ptrain}/{pval} scaled to {scaled}/{n_train - scaled} "
            f"for a training split of {n_train}")
    return scaled, n_train - scaled, note


def records_of(result: EvalResult) -> list[dict]:
    """Per-example records without traces or usage: what reports compare."""
    return [{"index": r.index, "example": r.example, "prediction": r.prediction, "score": r.score,
             "failure": r.failure, "error": r.error} for r in result.records]


def compare_records(baseline: list[dict], final: list[dict]) -> dict[str, list[int]]:
    """Indices of test examples the optimization fixed (score went up) and broke (went down)."""
    base = {r["index"]: r for r in baseline}
    fixed, broken = [], []
    for r in final:
        b = base.get(r["index"])
        if b is None or _inputs(b["example"]) != _inputs(r["example"]):
            continue
        if r["score"] > b["score"]:
            fixed.append(r["index"])
        elif r["score"] < b["score"]:
            broken.append(r["index"])
    return {"fixed": fixed, "broken": broken}


def paired_against_baseline(baseline: list[dict], final: list[dict]) -> dict | None:
    """The returned program against the baseline on the same test examples: the paired test
    (exact McNemar for 0/1 scores, paired bootstrap otherwise), in points; None without pairs."""
    from tandem.experiments.stats import paired_test

    base = {r["index"]: r for r in baseline}
    pairs = [(r["score"], base[r["index"]]["score"]) for r in final
             if r["index"] in base and _inputs(base[r["index"]]["example"]) == _inputs(r["example"])]
    if not pairs:
        return None
    t = paired_test([a for a, _ in pairs], [b for _, b in pairs])
    return {"method": t.method, "p_value": t.p_value, "n": t.n, "diff": round(100 * t.diff, 2),
            "ci95": [round(100 * t.ci95[0], 2), round(100 * t.ci95[1], 2)]}


def _inputs(example: dict) -> Any:
    return json.dumps(example, sort_keys=True, default=str)


def run_cell(
    cfg: RunConfig,
    lm,
    progress: Progress | None = None,
    *,
    resume: bool = True,
    run_dir: str | Path | None = None,
    shared: dict | None = None,
    trainer: Callable | None = None,
    info: Callable[[str], None] | None = None,
) -> dict:
    """Run ``cfg`` (optimize, then test) with ``lm`` and return the summary written to results.json.

    ``shared``: a dict the caller keeps across runs, so loaded data and the
    zero-shot baseline on test are computed once per (task, split, model).
    ``trainer``: a stand-in for the LoRA trainer (tests). ``info``: called
    with one-line notes for the user (scaled sizes, reused baselines).
    """
    from tandem.optimize import GRPO, BetterTogether, BootstrapFinetune, RandomSearch, SplitPlan

    cfg.check()  # bad settings are one-line errors before data loads or the run directory exists
    say = info or (lambda msg: log.info("%s", msg))
    run_dir = Path(run_dir) if run_dir is not None else cfg.default_run_dir()
    task, data = load_data(cfg, cache=shared)
    splits = {name: data[name] for name in ("train", "dev", "test")}
    sizes = {name: len(rows) for name, rows in splits.items()}
    zero_shot = is_zero_shot(cfg.strategy)
    ptrain, pval, note = prompt_sizes(task, cfg, sizes["train"])
    program = start_program(cfg, task, data, lm)
    start_id = _program_id(cfg.program_from) if cfg.program_from else None
    if not zero_shot:
        bt = BetterTogether(
            task.metric, strategy=cfg.strategy,
            prompt_optimizer=RandomSearch(task.metric, num_candidates=cfg.num_candidates, max_demos=cfg.max_demos,
                                          num_threads=cfg.threads),
            weight_optimizer=BootstrapFinetune(task.metric, config=cfg.lora_config(), num_threads=cfg.threads,
                                               **cfg.weight_step_options(),
                                               **({"trainer": trainer} if trainer is not None else {})),
            rl_optimizer=GRPO(task.metric, cfg.rl_settings(), num_threads=cfg.threads),
            splits=SplitPlan(ptrain, pval), run_dir=run_dir, num_threads=cfg.threads,
        )
        # What changes a step's result beyond what BetterTogether sees (test size: see the docstring).
        step_settings = {"task": cfg.task, "data": cfg.data, "split_seed": cfg.split_seed(),
                         "sizes": {"train": sizes["train"], "dev": sizes["dev"]}, "model": cfg.model}
        # A resume with other settings is refused here, before config.json is overwritten.
        bt.check_run_dir(program, trainset=splits["train"], valset=splits["dev"], seed=cfg.seed, resume=resume,
                         settings=step_settings)
        if note:
            say(note)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / RESULTS).unlink(missing_ok=True)  # starting over: this run is not finished until it writes one
    write_json(run_dir / "config.json", {**asdict(cfg), "run_dir": str(run_dir), "resolved": {
        "sizes": sizes, "prompt_sizes": [ptrain, pval], "split_seed": cfg.split_seed(), "note": note}})

    t0 = time.perf_counter()

    def bar(label: str) -> Callable[[int, int], None] | None:
        return (lambda d, t: progress(label, d, t)) if progress else None

    def baseline() -> tuple[list[dict], float, dict]:
        """The unoptimized program on test: from this run dir, from ``shared``, or evaluated now."""
        key = ["baseline", cfg.task, cfg.data, cfg.split_seed(), sizes, _fingerprint(lm)]
        if cfg.program_from:  # the start program is a saved one, not the task's
            key.append({"program_from": cfg.program_from, "start": start_id})
        saved = read_json(run_dir / BASELINE_RECORDS)
        if saved is not None and saved.get("key") != json.loads(json.dumps(key, default=str)):
            saved = None  # from another split or model: evaluate again
        if saved is None and shared is not None and _k(key) in shared:
            saved = shared[_k(key)]
            say("zero-shot test records reused from an earlier run")
        if saved is None:
            res = evaluate(program, splits["test"], task.metric, num_threads=cfg.threads,
                           progress=bar("zero-shot test"))
            saved = {"key": json.loads(json.dumps(key, default=str)), "score": res.score, "n": res.n,
                     "failures": res.failures, "usage": res.usage.to_dict(), "wall_s": round(res.wall_s, 2),
                     "records": records_of(res)}
        if shared is not None:
            shared[_k(key)] = saved
        write_json(run_dir / BASELINE_RECORDS, saved)
        return saved["records"], saved["score"], saved

    history: list[dict] = []
    if zero_shot:
        from tandem.program.program_file import save_program

        dev = evaluate(program, splits["dev"], task.metric, num_threads=cfg.threads, progress=bar("zero-shot dev"))
        base_records, base_score, base = baseline()
        final_records, test_score = base_records, base_score
        test_failures, test_usage, test_wall = base["failures"], base["usage"], base["wall_s"]
        dev_score, best, start_dev, reused = dev.score, None, dev.score, []
        save_program(program, run_dir / "final", seed=cfg.seed, extra={"strategy": ZERO_SHOT})
        usage_total = _add(dev.usage.to_dict(), test_usage)
    else:
        result = bt.compile(program, trainset=splits["train"], valset=splits["dev"], seed=cfg.seed,
                            resume=resume, progress=progress, settings=step_settings, info=say)
        test = evaluate(result.program, splits["test"], task.metric, num_threads=cfg.threads, progress=bar("test"))
        final_records, test_score = records_of(test), test.score
        test_failures, test_usage, test_wall = test.failures, test.usage.to_dict(), round(test.wall_s, 2)
        write_json(run_dir / TEST_RECORDS, final_records)
        base_records, base_score, _ = baseline()
        dev_score, best = result.score, result.extra["best_step"]
        reused = result.extra["reused_steps"]
        history = [r.to_dict() for r in result.history]
        start_dev = history[0]["val_score"]
        usage_total = test_usage
        for r in history:
            usage_total = _add(usage_total, r.get("usage") or {})
    if zero_shot:
        write_json(run_dir / TEST_RECORDS, final_records)
    changed = compare_records(base_records, final_records)
    summary = {
        "task": task.name, "model": cfg.model, "strategy": ZERO_SHOT if zero_shot else cfg.strategy,
        "seed": cfg.seed, "split_seed": cfg.split_seed(), "status": "ok",
        "sizes": sizes, "prompt_sizes": None if zero_shot else [ptrain, pval],
        "best_step": best, "reused_steps": reused, "dev_score": dev_score, "start_dev_score": start_dev,
        "test_score": test_score, "test_n": sizes["test"],
        "test_failures": test_failures, "zero_shot_test_score": base_score,
        "fixed": len(changed["fixed"]), "broken": len(changed["broken"]),
        "test_vs_baseline": None if zero_shot else paired_against_baseline(base_records, final_records),
        # wall_s: this process (a resumed run counts only what it redid); optimize_s: the
        # steps' own wall times (validation, and the start's, included), the same however
        # often the run resumed.
        "wall_s": round(time.perf_counter() - t0, 1),
        "optimize_s": round(sum(r.get("wall_s") or 0.0 for r in history), 1), "test_wall_s": test_wall,
        "test_usage": test_usage, "usage": usage_total, "history": history,
        "run_dir": str(run_dir), "notes": [note] if note and not zero_shot else [],
        "program_from": cfg.program_from,
    }
    write_json(run_dir / RESULTS, summary)
    return summary


def _program_id(path: str) -> str:
    """The sha256 of the saved start program's program.json (a deployment's champion changes)."""
    import hashlib

    from tandem.deploy import program_source

    return hashlib.sha256((program_source(path) / "program.json").read_bytes()).hexdigest()[:16]


def _k(key: list) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def _fingerprint(lm) -> str:
    try:
        return lm.fingerprint()
    except Exception:  # noqa: BLE001 - a key for reuse only
        return repr(lm)


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}
