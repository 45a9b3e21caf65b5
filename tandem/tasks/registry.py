"""Tasks by name, for the CLI and experiment grids.

A task bundles a loader that returns train/dev/test splits for a seed, a
program factory and a metric. Users add their own through config files
(tandem.experiments.config) rather than by editing this table, or from a
package of their own through the ``tandem.tasks`` entry point group.

    task = get_task("hotpotqa")
    data = task.load(data=None, seed=0)          # None: ../shared/data/hotpotqa if present
    program = task.make_program(data)            # MultiHopQA over data's BM25 retriever

Some programs need the loaded data (HotPotQA's retriever indexes the
loaded questions' paragraphs): such a task sets ``program_takes_data`` and
its ``program`` factory receives the object ``load`` returned. A task with a
``read`` reads every example of one data file, unsplit (``tandem eval
--split all``).

A task file (the contract is in ``tandem.experiments.config``) becomes a
Task through ``task_from_file``; ``import_task_module`` imports it under a
name unique to its path and records the path on the module
(``__tandem_task_file__``), which ``save_program`` writes to program.json so
that ``load_program`` can import the file again from any directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from tandem.program import Example, Module
from tandem.tasks.errors import DataError


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[..., dict[str, list[Example]]]  # (data=None, seed=0, sizes=None) -> splits
    program: Callable[..., Module]  # () -> program, or (loaded data) -> program with program_takes_data
    metric: Callable
    sizes: tuple[int, int, int]  # paper's train/dev/test sizes
    # Prompt-optimization subsample sizes (train, val) from the paper.
    prompt_sizes: tuple[int, int] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    program_takes_data: bool = False  # program(data): it needs what load returned (a retriever's corpus)
    read: Callable[..., list[Example]] | None = None  # (data=None) -> every example of the data, unsplit

    def make_program(self, data=None) -> Module:
        """A fresh program; ``data`` is what ``load`` returned (needed when ``program_takes_data``)."""
        if self.program_takes_data:
            if data is None:
                raise ValueError(f"task {self.name!r} builds its program from the loaded data; pass task.load(...)'s result")
            return self.program(data)
        return self.program()


def shared_data_candidates(name: str) -> list[Path]:
    """Where a task's data is looked for when none is given: ``$TANDEM_DATA/<name>``, then
    ``../shared/data/<name>`` relative to the current directory and to the tandem checkout."""
    out = []
    if os.environ.get("TANDEM_DATA"):
        out.append(Path(os.environ["TANDEM_DATA"]) / name)
    out.append(Path.cwd().parent / "shared" / "data" / name)
    repo = Path(__file__).resolve().parents[2]
    out.append(repo.parent / "shared" / "data" / name)
    seen, uniq = set(), []
    for p in out:
        key = str(p.resolve()) if p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def default_data(name: str, data=None):
    """``data`` if given, else the first existing default folder, else a DataError saying what to pass."""
    if data is not None:
        return data
    for p in shared_data_candidates(name):
        if p.exists():
            return p
    looked = ", ".join(str(p) for p in shared_data_candidates(name))
    raise DataError(
        f"no data given for task {name!r} and none found (looked in {looked}); pass the data folder or file: "
        f"`--data PATH` on the command line, `data = \"PATH\"` in a config, or set TANDEM_DATA to a folder "
        f"holding {name}/"
    )


def _sizes(sizes, default: tuple[int, int, int]) -> tuple[int, int, int]:
    if sizes is None:
        return default
    sizes = tuple(sizes)
    if len(sizes) != 3:
        raise ValueError(f"sizes are train,dev,test: three numbers, got {sizes}")
    return sizes


def _iris() -> Task:
    from tandem.tasks.data import data_file, naming_file
    from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris

    def read(data=None):
        """Every row: of scikit-learn's copy (None), a CSV file, or a folder's iris.csv (else its only CSV)."""
        if data is None:
            return load_iris()
        path = data_file(data, "iris.csv", "*.csv")
        with naming_file(path):
            return load_iris(path)

    def load(data=None, seed=0, sizes=None):
        return split_iris(read(data), seed=seed, sizes=_sizes(sizes, (50, 50, 50)))

    return Task("iris", load, IrisClassifier, iris_metric, (50, 50, 50), (15, 35), read=read)


# GSM8K: the paper's 1000 / 500 / 1319; the local copy is the official train file only,
# so test is cut from it first (fixed when train/dev sizes change). Prompt steps: 100 / 250.
GSM8K_SIZES = (1000, 500, 1319)


def _gsm8k() -> Task:
    from tandem.tasks.gsm8k import GSM8KSolver, gsm8k_file, gsm8k_metric, load_gsm8k, read_gsm8k

    def load(data=None, seed=0, sizes=None):
        train, dev, test = _sizes(sizes, GSM8K_SIZES)
        return load_gsm8k(default_data("gsm8k", data), train=train, dev=dev, test=test, seed=seed)

    def read(data=None):
        return read_gsm8k(gsm8k_file(default_data("gsm8k", data), "train.jsonl"))

    return Task("gsm8k", load, GSM8KSolver, gsm8k_metric, GSM8K_SIZES, (100, 250),
                notes="test is cut from the train file (the official test split is not local)", read=read)


# HotPotQA: the paper's 1000 / 500 / 1500 does not fit the 600 + 300 local questions:
# train and dev come from train.jsonl (400 + 200), test is dev.jsonl (300). Prompt steps:
# the paper's 100 / 250, which fit the 400 training questions.
HOTPOTQA_SIZES = (400, 200, 300)


def _hotpotqa() -> Task:
    from tandem.tasks.hotpotqa import MultiHopQA, hotpotqa_em, load_hotpotqa

    def load(data=None, seed=0, sizes=None):
        train, dev, test = _sizes(sizes, HOTPOTQA_SIZES)
        return load_hotpotqa(default_data("hotpotqa", data), train=train, dev=dev, test=test, seed=seed)

    def program(data) -> Module:
        return MultiHopQA(data.retriever())

    return Task("hotpotqa", load, program, hotpotqa_em, HOTPOTQA_SIZES, (100, 250),
                notes="sizes scaled to the local 600 + 300 questions; BM25 over the pooled paragraphs",
                program_takes_data=True)


_FACTORIES: dict[str, Callable[[], Task]] = {"iris": _iris, "gsm8k": _gsm8k, "hotpotqa": _hotpotqa}

#: Tasks from other packages: ``[project.entry-points."tandem.tasks"] name = "pkg.module:factory"``,
#: a factory ``() -> Task``, loaded the first time its name is asked for.
ENTRY_POINT_GROUP = "tandem.tasks"


def register_task(name: str, factory: Callable[[], Task]) -> None:
    _FACTORIES[name] = factory


def _from_entry_point(name: str) -> Callable[[], Task] | None:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        return None
    try:
        factory = found[0].load()
    except Exception as exc:  # noqa: BLE001 - one line naming the entry point
        raise ImportError(f"task {name!r} ({found[0].value}, entry point group {ENTRY_POINT_GROUP}) "
                          f"does not load: {type(exc).__name__}: {exc}") from exc
    register_task(name, factory)
    return factory


class UnknownTaskError(KeyError):
    """No task by that name. A KeyError whose ``str`` is the message itself, not its repr in quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_task(name: str) -> Task:
    if name not in _FACTORIES and _from_entry_point(name) is None:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {task_names()}")
    return _FACTORIES[name]()


def task_names() -> list[str]:
    """Built-in and registered tasks, and those of installed packages' ``tandem.tasks`` entry points."""
    from importlib.metadata import entry_points

    return sorted(set(_FACTORIES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


# -- task files ---------------------------------------------------------------------------------
TASK_MODULE_PREFIX = "tandem_user_task_"
TASK_FILE_ATTR = "__tandem_task_file__"  # the absolute path a task module was imported from
CONTRACT = ("a task file defines program(), metric(example, prediction, trace=None) and "
            "load(data, seed, sizes) (see tandem.experiments.config)")


class TaskFileError(ValueError):
    """A task file is missing, does not import, lacks a function, or its load failed; the message names it."""


def task_module_name(path: str | os.PathLike) -> str:
    """``tandem_user_task_<stem>_<8 hex digits of the absolute path>``: two files with one stem don't collide."""
    path = Path(os.path.abspath(path))
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{TASK_MODULE_PREFIX}{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"


def import_task_module(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import the task file at ``path`` afresh as module ``name`` (default ``task_module_name(path)``).

    The module is registered in ``sys.modules`` (so its classes can be named)
    and also as ``tandem_user_task_<stem>``, the name older program.json files
    recorded; its absolute path is stored as ``__tandem_task_file__``. A missing
    file or an exception while importing is a one-line TaskFileError naming the file.
    """
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist")
    name = name or task_module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskFileError(f"task file {path} is not a Python file")
    mod = importlib.util.module_from_spec(spec)
    setattr(mod, TASK_FILE_ATTR, str(path))
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:  # noqa: BLE001 - reported with the file's name
        sys.modules.pop(name, None)
        raise TaskFileError(f"task file {path} failed to import: {type(exc).__name__}: {exc}") from None
    sys.modules[TASK_MODULE_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", path.stem)] = mod
    return mod


def _takes_sizes(fn: Callable) -> bool:
    """Whether ``fn`` accepts a third argument (``sizes``): by name, position, or ``*args``/``**kwargs``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "sizes" for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


def _check_splits(path: Path, out: Any) -> Any:
    """``out`` (what the file's load returned) has train, dev and test lists of Examples, else a TaskFileError."""
    for name in ("train", "dev", "test"):
        try:
            rows = out[name]
        except (KeyError, TypeError, IndexError):
            raise TaskFileError(
                f"task file {path}: load returned {type(out).__name__} without a {name!r} split; it must return "
                "{'train': [...], 'dev': [...], 'test': [...]} of tandem.Example") from None
        _check_examples(path, f"load's {name!r} split", rows)
    return out


def _check_examples(path: Path, what: str, rows: Any) -> None:
    if not isinstance(rows, (list, tuple)):
        raise TaskFileError(f"task file {path}: {what} is {type(rows).__name__}, not a list of tandem.Example")
    for i, ex in enumerate(rows):
        if not isinstance(ex, Example) or not ex.input_keys:
            got = type(ex).__name__ if not isinstance(ex, Example) else "an Example without inputs"
            raise TaskFileError(f"task file {path}: {what}[{i}] is {got}; build each with "
                                "tandem.Example(...).with_inputs(<input field names>)")


def _sizes_text(sizes) -> str:
    return ",".join(map(str, sizes))


def task_from_file(path: str | os.PathLike) -> Task:
    """The Task defined by a task file (contract: ``tandem.experiments.config``); errors name the file.

    ``load(data, seed, sizes)`` gets the ``sizes`` that were set (None: the
    file's defaults); a ``load(data, seed)`` without that parameter is an
    error when sizes were set. What load raises, and a result that is not
    train/dev/test lists of Examples, is a TaskFileError naming the file.
    """
    path = Path(os.path.abspath(path))
    mod = import_task_module(path)
    missing = [n for n in ("program", "metric", "load") if not callable(getattr(mod, n, None))]
    if missing:
        raise TaskFileError(f"task file {path} has no {' and no '.join(missing)}: {CONTRACT}")
    takes_sizes = _takes_sizes(mod.load)
    default_sizes = getattr(mod, "SIZES", (50, 50, 50))
    if not (isinstance(default_sizes, (tuple, list)) and len(default_sizes) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in default_sizes)):
        raise TaskFileError(f"task file {path}: SIZES must be three positive integers train, dev, test, "
                            f"got {default_sizes!r}")

    def load(data=None, seed=0, sizes=None):
        if sizes is not None and not takes_sizes:
            raise TaskFileError(f"task file {path}: sizes {_sizes_text(sizes)} were set, but its load(data, seed) "
                                "takes no sizes; define load(data, seed, sizes=None)")
        args = (data, seed, None if sizes is None else tuple(sizes)) if takes_sizes else (data, seed)
        try:
            out = mod.load(*args)
        except Exception as exc:  # noqa: BLE001 - reported with the file's name
            shown = f"data={data!r}, seed={seed}" + (f", sizes={_sizes_text(sizes)}" if sizes else "")
            raise TaskFileError(f"task file {path}: load({shown}) failed: {type(exc).__name__}: {exc}") from None
        return _check_splits(path, out)

    def program(*args) -> Module:
        made = mod.program(*args)
        if not isinstance(made, Module):
            raise TaskFileError(f"task file {path}: program() returned {type(made).__name__}, not a tandem.Module")
        return made

    reader = getattr(mod, "read", None)

    def read(data=None) -> list[Example]:
        try:
            rows = list(reader(data))
        except Exception as exc:  # noqa: BLE001 - reported with the file's name
            raise TaskFileError(f"task file {path}: read(data={data!r}) failed: {type(exc).__name__}: {exc}") from None
        _check_examples(path, "read's result", rows)
        return rows

    return Task(path.stem, load, program, mod.metric, tuple(default_sizes), getattr(mod, "PROMPT_SIZES", None),
                notes=f"task file {path}", extra={"file": str(path)},
                program_takes_data=bool(getattr(mod, "PROGRAM_TAKES_DATA", False)),
                read=read if callable(reader) else None)
