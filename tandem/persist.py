"""Saving and loading optimized programs: a versioned JSON file and adapter folders.

    save_program(program, "out/")        # out/program.json, out/adapters/<name>/
    program = load_program("out/")       # same prompts, same model, same adapter

The file's format, writing and checks are ``tandem.program.program_file``;
this module rebuilds a program from it, which needs the layers above the
program: the program's class (imported again from the task file that defines
it, when ``program_file`` names one, so the program loads from any directory
while the file stays where it was), its models (``tandem.lm.registry``) and
its adapters (checked against their base model, ``tandem.lm.identity``). A
program whose constructor needs arguments (a retriever, say) is rebuilt by
the caller and passed in: ``load_program(dir, program=MultiHopQA(retriever))``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from tandem.lm.identity import check_adapter_base
from tandem.lm.protocol import TrainableLM
from tandem.lm.registry import get_lm
from tandem.program.module import Module
from tandem.program.program_file import (
    FORMAT, FORMAT_VERSION, ProgramFileError, lm_reference, read_program_file, resolve_program_dir, save_program,
)
from tandem.tasks.registry import TASK_FILE_ATTR, TaskFileError, import_task_module

__all__ = [
    "FORMAT", "FORMAT_VERSION", "ProgramFileError", "load_program", "lm_reference", "read_program_file",
    "resolve_program_dir", "save_program",
]


def load_program(directory: str | os.PathLike, *, program: Module | None = None, lm_options: dict | None = None,
                 lms: dict | None = None) -> Module:
    """Restore a saved program: its prompts, its model and its adapter.

    ``lms`` maps a reference key to an already built LM, to share engines;
    ``lm_options`` are passed to backends built here.
    """
    directory = Path(directory)
    doc = read_program_file(directory)
    if program is None:
        if doc.get("program_file"):
            _import_program_file(doc["program"], doc["program_file"], directory / "program.json")
        program = _instantiate(doc["program"])
    else:
        program = program.deepcopy()
    state = {name: {k: v for k, v in s.items() if k != "lm"} for name, s in doc["predictors"].items()}
    program.load_state(state)
    built: dict[str, Any] = {} if lms is None else lms
    preds = dict(program.named_predictors())
    for name, s in doc["predictors"].items():
        ref = s.get("lm")
        if not ref:
            continue
        preds[name].lm = _build_lm(ref, directory, built, lm_options or {})
    return program


def _import_program_file(path: str, task_file: str, where: Path) -> None:
    """Make module ``path``'s module name the task file ``task_file`` (imported now unless it already is)."""
    mod_name, _, qual = path.partition(":")
    if getattr(sys.modules.get(mod_name), TASK_FILE_ATTR, None) == task_file:
        return
    if not Path(task_file).is_file():
        raise ProgramFileError(
            f"{where}: the program's class {qual} is defined in task file {task_file}, which does not exist "
            "(moved or deleted); put it back there, or build the program yourself and pass it: "
            "load_program(dir, program=MyProgram())")
    try:
        import_task_module(task_file, mod_name)
    except TaskFileError as exc:
        raise ProgramFileError(f"{where}: {exc}") from None


def _instantiate(path: str) -> Module:
    mod_name, _, qual = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj()
    except Exception as exc:  # noqa: BLE001 - turned into advice
        raise ProgramFileError(
            f"cannot rebuild program class {path} ({type(exc).__name__}: {exc}); "
            "build the program yourself and pass it: load_program(dir, program=MyProgram(...))"
        ) from None


def _build_lm(ref: dict, directory: Path, built: dict, options: dict):
    spec = f"{ref['backend']}:{ref['model']}"
    # What the backend recorded besides its model (a server's base_url, endpoint
    # and local checkpoint) rebuilds it as saved; lm_options win over it.
    saved = {k: v for k, v in ref.items() if k not in ("backend", "model", "adapter") and v is not None}
    base_key = spec
    if base_key not in built:
        built[base_key] = get_lm(spec, **{**saved, **options})
    lm = built[base_key]
    adapter = ref.get("adapter")
    if adapter:
        apath = (directory / adapter) if not os.path.isabs(adapter) else Path(adapter)
        if not apath.exists():
            raise ProgramFileError(f"adapter folder {apath} named in program.json is missing")
        key = f"{base_key}+{apath.resolve()}"
        if key not in built:
            if not isinstance(lm, TrainableLM):
                raise ProgramFileError(f"program.json gives {spec} the adapter {apath}, but that backend serves "
                                       "no adapters (it is not a tandem.lm.protocol.TrainableLM)")
            if lm.model_dir is not None and (Path(lm.model_dir) / "config.json").exists():
                check_adapter_base(apath, lm.model_dir)
            built[key] = lm.with_adapter(apath)
        lm = built[key]
    return lm
