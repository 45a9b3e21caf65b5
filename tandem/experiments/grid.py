"""Experiments: tasks x models x strategies x data splits x seeds from one TOML file, as Table 1.

    # tandem experiment examples/iris_table.toml
    tasks = ["iris"]
    models = ["smollm2-135m"]
    strategies = ["zero-shot", "p", "w", "p -> w", "w -> p", "p -> w -> p"]
    data_seeds = [0, 1, 2, 3, 4]   # train/dev/test splits; or data_seed = 0 (one split)
    seeds = [0, 1, 2]              # optimizer seeds, on every split
    out = "runs/exp-iris"

    # Any `tandem optimize` setting applies to every run ...
    num_candidates = 9
    [lora]
    epochs = 5

    # ... and per task (wins over the above).
    [per_task.gsm8k]
    sizes = [200, 100, 200]

Each run (one task, model, strategy, data split and seed; "zero-shot" is the
program as it is) goes to ``<out>/<task>/<model>/<strategy>-s<seed>/``
(``<strategy>-d<data seed>-s<seed>/`` with more than one data seed) through
``run_cell``, exactly as ``tandem optimize`` would. Without ``data_seeds``
or ``data_seed`` each seed draws its own split (``RunConfig.split_seed``).
A run whose results.json exists is skipped; a killed one resumes from its
last finished step. One LM per model serves all of that model's runs and is
closed when they are done. After every run ``<out>/results.json`` (all runs,
and a ``statistics`` section: intervals over runs and paired tests, see
``tandem.experiments.table``) and ``<out>/table.md`` are rewritten, so a
long experiment can be read while it runs.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from tandem.experiments.config import STEP_LETTERS, RunConfig
from tandem.experiments.experiment_file import read_experiment
from tandem.experiments.paper import normalize_strategy
from tandem.experiments.run import RESULTS, is_zero_shot, read_json, run_cell, strategy_slug
from tandem.experiments.table import statistics_section, table_markdown
from tandem.fileio import write_json
from tandem.optimize.base import Progress

log = logging.getLogger(__name__)

__all__ = ["Cell", "Experiment", "load_experiment", "run_experiment", "load_results", "table_markdown"]


@dataclass
class Experiment:
    tasks: list[str]
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    strategies: list[str] = field(default_factory=lambda: ["zero-shot", "p", "w", "p -> w", "w -> p", "p -> w -> p"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_seeds: list[int] | None = None  # train/dev/test split seeds; None: each run's split_seed()
    out: Path = Path("runs/experiment")
    settings: dict = field(default_factory=dict)  # RunConfig settings for every run
    per_task: dict[str, dict] = field(default_factory=dict)  # task -> settings that win over `settings`
    source: str | None = None  # the TOML file

    def task_settings(self, task: str) -> dict:
        """The ``[per_task]`` settings of ``task``: its section by name (a task file's stem), then by path."""
        stem = Path(task).stem if task.endswith(".py") else task
        return _merge(self.per_task.get(stem, {}) if stem != task else {}, self.per_task.get(task, {}))

    def config(self, task: str, model: str, strategy: str, seed: int, data_seed: int | None = None) -> RunConfig:
        values = _merge(self.settings, self.task_settings(task))
        if data_seed is not None:
            values["data_seed"] = data_seed
        return RunConfig(task=task, model=model, strategy=strategy, seed=seed, **values)

    def cells(self) -> list["Cell"]:
        """Every run, model-major (one engine at a time), then task, then seed, then data seed, then
        strategy: partial results give every strategy a first seed on every split before a second."""
        out = []
        splits: list[int | None] = list(self.data_seeds) if self.data_seeds else [None]
        for model in self.models:
            for task in self.tasks:
                for seed in self.seeds:
                    for data_seed in splits:
                        tag = f"-d{data_seed}" if len(splits) > 1 else ""
                        for strategy in self.strategies:
                            cfg = self.config(task, model, strategy, seed, data_seed)
                            name = f"{strategy_slug(strategy)}{tag}-s{seed}"
                            run_dir = self.out / Path(task).stem / _slug(model) / name
                            cfg.run_dir = str(run_dir)
                            out.append(Cell(task, model, strategy, seed, cfg, run_dir, self.out, data_seed))
        return out

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "models": self.models, "strategies": self.strategies, "seeds": self.seeds,
                "data_seeds": self.data_seeds, "out": str(self.out), "settings": self.settings,
                "per_task": self.per_task, "source": self.source}


@dataclass
class Cell:
    task: str
    model: str
    strategy: str
    seed: int
    cfg: RunConfig
    run_dir: Path
    cfg_out: Path | None = None
    data_seed: int | None = None  # set when the experiment has data_seeds

    @property
    def label(self) -> str:
        split = "" if self.data_seed is None else f" / data seed {self.data_seed}"
        return f"{Path(self.task).stem} / {self.model} / {self.strategy}{split} / seed {self.seed}"

    @property
    def path(self) -> str:
        """The run directory relative to the experiment's ``out`` (what reports resolve)."""
        return str(self.run_dir.relative_to(self.cfg_out)) if self.cfg_out else str(self.run_dir)

    def done(self) -> bool:
        return (self.run_dir / RESULTS).exists()

    def stale(self) -> bool:
        """Finished, but with other settings than the experiment's now (it is still skipped)."""
        saved = read_json(self.run_dir / "config.json")
        if not saved or not self.done():
            return False
        now = json.loads(json.dumps(asdict(self.cfg), default=list))
        return any(saved.get(k) != v for k, v in now.items() if k != "run_dir")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> Experiment:
    """The experiment in a TOML file, with ``key=value`` overrides (``--set``) applied last, typed and
    checked before anything runs (``tandem.experiments.experiment_file``): every key, every strategy,
    and every run's settings (``RunConfig.check``).

    Overrides: ``seeds=0,1``, ``data_seeds=0,1,2`` or ``tasks=iris,gsm8k`` (grid keys,
    comma-separated), ``sizes=50,50,50`` or ``lora.epochs=1`` (every run),
    ``per_task.gsm8k.sizes=...`` (one task's runs). ``data_seed = n`` (file or
    override) is ``data_seeds = [n]``: one split for every run.
    """
    doc = read_experiment(path, overrides, **values)
    grid = doc["grid"]
    exp = Experiment(settings=doc["settings"], per_task=doc["per_task"], source=doc["source"],
                     **{k: v for k, v in grid.items() if k != "out"})
    exp.out = Path(grid.get("out", "runs/experiment"))
    from tandem.optimize.better_together import parse_strategy

    for s in exp.strategies:
        if not is_zero_shot(s):
            parse_strategy(s, set(STEP_LETTERS))
    checked: set[tuple] = set()
    for cell in exp.cells():  # settings errors now, not after the first model has loaded
        key = (cell.task, cell.strategy)
        if key not in checked:
            checked.add(key)
            cell.cfg.check()
    return exp


# -- running ------------------------------------------------------------------------------
def run_experiment(
    exp: Experiment,
    *,
    lm_factory: Callable[..., Any] | None = None,
    trainer: Callable | None = None,
    progress_for: Callable[[Cell], ContextManager[Progress | None]] | None = None,
    info: Callable[[str], None] | None = None,
    on_cell: Callable[[Cell, dict], None] | None = None,
) -> dict:
    """Run every unfinished cell; return (and write) ``<out>/results.json``.

    ``lm_factory(model, **backend_options)`` builds an LM (default
    ``tandem.lm.registry.get_lm``); each model's LM is built once, when its
    first unfinished cell runs, and closed after its last. A cell that raises
    is recorded as failed and the grid goes on; it runs again next time.
    """
    if lm_factory is None:
        from tandem.lm.registry import get_lm as lm_factory
    say = info or (lambda msg: log.info("%s", msg))
    exp.out.mkdir(parents=True, exist_ok=True)
    cells = exp.cells()
    shared: dict = {}
    errors: dict[str, str] = {}
    load_s: dict[str, float] = {}
    by_model: dict[str, list[Cell]] = {}
    for c in cells:
        by_model.setdefault(c.model, []).append(c)
    _write(exp, cells, errors, load_s)
    for model, group in by_model.items():
        todo = [c for c in group if not c.done()]
        if len(todo) < len(group):
            say(f"{model}: {len(group) - len(todo)} of {len(group)} run(s) already finished")
        stale = [c for c in group if c.stale()]
        if stale:
            say(f"{len(stale)} finished run(s) used other settings than this experiment now has "
                f"(first: {stale[0].run_dir}); they are kept: delete them, or use another `out`, to run them again")
        if not todo:
            continue
        options = dict(todo[0].cfg.backend_options)
        say(f"loading {model} for {len(todo)} run(s)")
        t0 = time.perf_counter()
        lm = lm_factory(model, **options)
        lm.start()
        load_s[model] = round(time.perf_counter() - t0, 1)
        say(f"{model} ready in {load_s[model]:.0f} s")
        try:
            for cell in todo:
                if cell.cfg.backend_options != options:
                    raise ValueError(f"{cell.label}: backend_options differ between runs of model {model}; "
                                     "one engine serves them all")
                errors.pop(cell.label, None)
                ctx = progress_for(cell) if progress_for else nullcontext(None)
                try:
                    with ctx as progress:
                        summary = run_cell(cell.cfg, lm, progress, resume=True, run_dir=cell.run_dir,
                                           shared=shared, trainer=trainer, info=say)
                except Exception as exc:  # noqa: BLE001 - recorded; the other cells go on
                    log.exception("%s failed", cell.label)
                    errors[cell.label] = f"{type(exc).__name__}: {exc}"
                    summary = {"status": "failed", "error": errors[cell.label]}
                if on_cell:
                    on_cell(cell, summary)
                _write(exp, cells, errors, load_s)
        finally:
            lm.close()
    return _write(exp, cells, errors, load_s)


def cell_entry(cell: Cell, errors: dict[str, str] | None = None) -> dict:
    base = {"task": Path(cell.task).stem, "model": cell.model, "strategy": normalize_strategy(cell.strategy),
            "seed": cell.seed, "split_seed": cell.cfg.split_seed(), "run_dir": str(cell.run_dir), "path": cell.path}
    res = read_json(cell.run_dir / RESULTS)
    if res is not None:
        return {**res, **base, "status": res.get("status", "ok")}
    if errors and cell.label in errors:
        return {**base, "status": "failed", "error": errors[cell.label]}
    started = (cell.run_dir / "history.json").exists()
    return {**base, "status": "partial" if started else "pending"}


def _write(exp: Experiment, cells: list[Cell], errors: dict, load_s: dict) -> dict:
    doc = {"experiment": exp.to_dict(), "model_load_s": load_s,
           "cells": [cell_entry(c, errors) for c in cells]}
    doc["statistics"] = statistics_section(doc)
    write_json(exp.out / "results.json", doc)
    (exp.out / "table.md").write_text(table_markdown(doc))
    return doc


def load_results(out: str | Path) -> dict:
    """``<out>/results.json`` of an experiment, refreshed from its cells' run directories (statistics too)."""
    out = Path(out)
    doc = read_json(out / "results.json")
    if doc is None or "cells" not in doc:
        raise ValueError(f"{out} holds no experiment (no results.json with cells)")
    fresh = []
    for e in doc["cells"]:
        run_dir = out / e["path"] if e.get("path") else Path(e["run_dir"])
        e = {**e, "run_dir": str(run_dir)}
        res = read_json(run_dir / RESULTS)
        keep = {k: e[k] for k in ("task", "model", "strategy", "seed", "split_seed", "run_dir", "path") if k in e}
        fresh.append({**res, **keep, "status": res.get("status", "ok")} if res is not None else e)
    doc["cells"] = fresh
    doc["statistics"] = statistics_section(doc)
    return doc

