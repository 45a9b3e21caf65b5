"""An experiment file (``tandem experiment``) and its ``--set`` overrides, typed and checked.

The file's keys (``tandem.experiments.grid`` has an example): the grid
(``tasks``, ``models``, ``strategies``, ``seeds``, ``data_seeds`` or
``data_seed``, ``out``), any run setting of ``RunConfig`` but the run's own
``task``, ``model``, ``strategy``, ``seed`` and ``run_dir`` (for every run),
and ``[per_task.<task>]`` tables of run settings (for one task's runs; a
task file's table by its stem or its path). ``ExperimentFile`` is their
type: an unknown key or a wrong type is one line naming it
(``tandem.experiments.typed``), e.g. ``seeds: expected a non-empty list of
integers, got [0, "x"]`` or ``[per_task.gsm8k] sizes: expected 3 positive
integers, got [100, 50]``.

Overrides (``tandem.experiments.overrides``): ``seeds=0,1``, ``tasks=iris,gsm8k``,
``strategies=p,p -> w -> p``, ``sizes=50,50,50`` or ``lora.epochs=1`` (every
run, winning over the ``[per_task]`` tables too), ``per_task.gsm8k.sizes=...``
(one task's runs), ``data_seed=n`` (one split; wins over ``data_seeds``).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any

from annotated_types import MinLen

from tandem.experiments.config import RunConfig, check_format, read_toml, resolve_path
from tandem.experiments.overrides import parse_overrides, put
from tandem.experiments.typed import table, validate

__all__ = ["GRID_KEYS", "RUN_KEYS", "ExperimentFile", "RunSettings", "read_experiment"]

GRID_KEYS = ("tasks", "models", "strategies", "seeds", "data_seeds", "out")
#: The run settings an experiment sets (for every run, or per task).
RUN_KEYS = tuple(k for k in typing.get_type_hints(RunConfig, include_extras=True)
                 if k not in ("task", "model", "strategy", "seed", "run_dir"))
_RUN_HINTS = typing.get_type_hints(RunConfig, include_extras=True)
RunSettings = table("RunSettings", {k: _RUN_HINTS[k] for k in RUN_KEYS})
ExperimentFile = table("ExperimentFile", {
    "tasks": Annotated[list[str], MinLen(1)],
    "models": Annotated[list[str], MinLen(1)],
    "strategies": Annotated[list[str], MinLen(1)],
    "seeds": Annotated[list[int], MinLen(1)],
    "data_seeds": Annotated[list[int], MinLen(1)],
    "out": str,
    "per_task": dict[str, RunSettings],
    **{k: _RUN_HINTS[k] for k in RUN_KEYS},
})


def _task_path(task: Any, base: Path | None) -> Any:
    """A task file's path made absolute (``resolve_path``); a built-in task's name as it is."""
    return resolve_path(task, base) if isinstance(task, str) and task.endswith(".py") else task


def _resolve_file_paths(doc: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """Task files, ``data`` (top level and per task) and task-file ``[per_task]`` keys made absolute against
    ``base`` (the experiment file's folder; None: the current directory), as in ``tandem optimize --config``."""
    if isinstance(doc.get("tasks"), list):
        doc["tasks"] = [_task_path(t, base) for t in doc["tasks"]]
    sections = doc.get("per_task")
    if isinstance(sections, dict):
        sections = doc["per_task"] = {_task_path(k, base): v for k, v in sections.items()}
    tables = sections.values() if isinstance(sections, dict) else ()
    for values in (doc, *(v for v in tables if isinstance(v, dict))):
        if isinstance(values.get("data"), str) and values["data"]:
            values["data"] = resolve_path(values["data"], base)
    return doc


def _drop(doc: Any, path: tuple[str, ...]) -> None:
    """Remove the key ``path`` from ``doc`` (nested tables), if it is there."""
    for key in path[:-1]:
        doc = doc.get(key) if isinstance(doc, dict) else None
    if isinstance(doc, dict):
        doc.pop(path[-1], None)


def _apply(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """One ``--set`` override, its paths against the current directory."""
    if path[-1] == "data" and isinstance(value, str) and value:
        value = resolve_path(value)
    if path == ("tasks",) and isinstance(value, list):
        value = [_task_path(t, None) for t in value]
    per_task = doc.get("per_task") if isinstance(doc.get("per_task"), dict) else {}
    if path[0] == "per_task":
        if len(path) < 3:
            raise ValueError(f"--set {'.'.join(path)}=...: write per_task.<task>.<setting>=value")
        path = ("per_task", _task_path(path[1], None), *path[2:])
    elif path == ("data_seed",):  # one split for every run: wins over data_seeds, the file's and per task
        doc.pop("data_seeds", None)
        for values in per_task.values():
            _drop(values, path)
    elif path == ("data_seeds",):
        doc.pop("data_seed", None)
    elif path[0] not in GRID_KEYS:  # a setting for every run also wins over the [per_task] tables
        for values in per_task.values():
            _drop(values, path)
    put(doc, path, value)


def _distinct(key: str, values: list[int] | None) -> None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"{key}: repeats a value: {values}")


def read_experiment(path: str | Path | None = None, overrides: list[str] | None = None,
                    **values: Any) -> dict[str, Any]:
    """The experiment in a TOML file, ``values`` and ``--set`` ``overrides`` on top, typed and checked:
    ``{"grid": {tasks, models, ...}, "settings": {...}, "per_task": {task: {...}}, "source": path}``.
    ``data_seed = n`` becomes ``data_seeds = [n]``."""
    doc: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        doc = _resolve_file_paths(read_toml(path, "experiment file"), path.parent)
    doc.update(_resolve_file_paths(dict(values), None))
    if "data_seed" in doc and "data_seeds" in doc:
        raise ValueError("give `data_seed` (one split) or `data_seeds` (several), not both")
    listed = list(doc["tasks"]) if isinstance(doc.get("tasks"), list) else []  # before --set tasks=
    for key, value in parse_overrides(overrides, ExperimentFile):
        _apply(doc, key, value)
    doc = validate(ExperimentFile, doc)
    if "tasks" not in doc:
        raise ValueError('an experiment needs `tasks = [...]` (e.g. tasks = ["iris"])')
    for key in ("seeds", "data_seeds"):
        _distinct(key, doc.get(key))
    per_task = {task: dict(v) for task, v in doc.pop("per_task", {}).items()}
    grid = {k: doc.pop(k) for k in GRID_KEYS if k in doc}
    if "data_seed" in doc:
        grid["data_seeds"] = [doc.pop("data_seed")]
    settings = dict(doc)
    _check_format(settings, str(path or "experiment"))
    from tandem.tasks.registry import task_names

    # A section for a task left out (e.g. by --set tasks=...) is unused; one that names no built-in task
    # and no task in the file's or the final list (by path or stem) is a typo.
    named = {*grid["tasks"], *listed}
    named |= {Path(t).stem for t in named if isinstance(t, str) and t.endswith(".py")}
    for task, values_ in per_task.items():
        _check_format(values_, f"[per_task.{task}]")
        if task not in named and task not in set(task_names()):
            raise ValueError(f"[per_task.{task}]: {task!r} is not in tasks {grid['tasks']}")
        if "data_seed" in values_ and "data_seeds" in grid:
            raise ValueError(f"[per_task.{task}]: data_seed conflicts with the experiment's data_seeds "
                             f"{grid['data_seeds']}; set the splits once, in data_seeds")
    return {"grid": grid, "settings": settings, "per_task": per_task, "source": str(path) if path else None}


def _check_format(values: dict, where: str) -> None:
    try:
        check_format(values.get("format"))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
