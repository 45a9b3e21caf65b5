"""The program.json format: writing a program's state, reading and checking the file.

    save_program(program, "out/")        # out/program.json, out/adapters/<name>/
    doc = read_program_file("out/")      # the checked document

``program.json`` holds the program's class (``module:QualName``), each
predictor's instructions, demos and sampling settings, and each predictor's
model reference (``lm_reference``: backend, model, adapter folder relative to
the save directory), plus the seed and package versions that made it. A
program whose class is defined in a task file (``tandem.experiments.config``)
also records the file's absolute path (``program_file``). No pickle:
everything is plain JSON and PEFT folders. Rebuilding a program from the
file, with its class, models and adapters, is ``tandem.persist.load_program``
(it needs the backends and task files, which sit above this layer).

``resolve_program_dir`` finds the program of a saved program folder, a run
directory (its ``final/``) or a program.json path.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.fileio import write_json
from tandem.versions import package_versions

if TYPE_CHECKING:
    from tandem.program.module import Module

FORMAT = "tandem.program"
FORMAT_VERSION = 1


class ProgramFileError(ValueError):
    """program.json is missing, corrupt, or from a newer tandem."""


def lm_reference(lm) -> dict | None:
    if lm is None:
        return None
    return dict(lm.spec())


def save_program(program: "Module", directory: str | os.PathLike, *, seed: int | None = None, extra: dict | None = None) -> Path:
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
    task_file = getattr(sys.modules.get(cls.__module__), "__tandem_task_file__", None)  # see import_task_module
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "program": f"{cls.__module__}:{cls.__qualname__}",
        **({"program_file": task_file} if task_file else {}),
        "predictors": predictors,
        "seed": seed,
        "versions": package_versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **({"extra": extra} if extra else {}),
    }
    write_json(directory / "program.json", doc)
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
    check_program_doc(doc, path)
    return doc


def check_program_doc(doc: dict, path: str | os.PathLike) -> None:
    """Check the structure of a program.json document; a ProgramFileError names the file, predictor and field.

    The program class is a ``module:QualName`` string (``program_file``, when
    present, the task file that defines it); ``predictors`` maps each
    predictor's name to its state (``_check_predictor``).
    """
    if not isinstance(doc.get("program"), str) or ":" not in doc["program"]:
        raise ProgramFileError(f"{path}: `program` must be a class path 'module:QualName', "
                               f"got {_kind(doc.get('program', _MISSING))}")
    if "program_file" in doc and not (isinstance(doc["program_file"], str) and doc["program_file"]):
        raise ProgramFileError(f"{path}: `program_file` must be the path of the task file that defines the "
                               f"program's class, got {_kind(doc['program_file'])}")
    preds = doc.get("predictors", _MISSING)
    if not isinstance(preds, dict):
        raise ProgramFileError(f"{path}: `predictors` must be an object (predictor name -> state), got {_kind(preds)}")
    for name, state in preds.items():
        _check_predictor(path, name, state)


def _check_predictor(path: str | os.PathLike, name: str, state: Any) -> None:
    """One predictor's saved state: an object with ``signature`` (an object whose ``fields`` are
    objects with a ``name`` and an ``input`` flag), ``demos`` (a list of objects), and optionally
    ``max_tokens`` (an integer >= 1), ``temperature`` (a number >= 0), ``format`` (a prompt
    format's name, or null: the default) and ``lm`` (null, or an object with ``backend`` and
    ``model`` strings and an optional ``adapter`` folder)."""

    def bad(field: str, expected: str, got: Any) -> ProgramFileError:
        return ProgramFileError(f"{path}: predictor {name!r}: `{field}` must be {expected}, got {_kind(got)}")

    if not isinstance(state, dict):
        raise ProgramFileError(f"{path}: predictor {name!r} must be an object (its saved state), got {_kind(state)}")
    sig = state.get("signature", _MISSING)
    if not isinstance(sig, dict):
        raise bad("signature", "an object", sig)
    fields = sig.get("fields", _MISSING)
    if not isinstance(fields, list) or not fields:
        raise bad("signature.fields", "a non-empty list of field objects", fields)
    for i, f in enumerate(fields):
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("input"), bool)):
            raise bad(f"signature.fields[{i}]", "an object with a string `name` and a boolean `input`", f)
    if not isinstance(sig.get("instructions", ""), str):
        raise bad("signature.instructions", "a string", sig["instructions"])
    demos = state.get("demos", _MISSING)
    if not isinstance(demos, list):
        raise bad("demos", "a list of objects", demos)
    for i, d in enumerate(demos):
        if not isinstance(d, dict):
            raise bad(f"demos[{i}]", "an object (field name -> value)", d)
    mt = state.get("max_tokens", 1)
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise bad("max_tokens", "an integer >= 1", mt)
    t = state.get("temperature", 0.0)
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
        raise bad("temperature", "a number >= 0", t)
    fmt = state.get("format")
    if fmt is not None:
        from tandem.program.formats import FORMATS, get_format

        try:
            if not isinstance(fmt, str):
                raise ValueError(fmt)
            get_format(fmt)
        except ValueError:
            raise bad("format", f"a prompt format's name, one of {sorted(FORMATS)}", fmt) from None
    ref = state.get("lm")
    if ref is not None:  # absent or null: the caller sets the program's LM
        if not isinstance(ref, dict):
            raise bad("lm", "an object (backend, model, adapter) or null", ref)
        for key in ("backend", "model"):
            if not isinstance(ref.get(key), str) or not ref[key]:
                raise bad(f"lm.{key}", "a non-empty string", ref.get(key, _MISSING))
        if not isinstance(ref.get("adapter") or "", str):
            raise bad("lm.adapter", "a folder path (a string) or null", ref["adapter"])


_MISSING = object()  # a field that is not in the file


def _kind(value: Any) -> str:
    """``value`` for an error message: its JSON type and (shortened) its JSON text; or that it is missing."""
    if value is _MISSING:
        return "nothing (the field is missing)"
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    text = json.dumps(value, default=str, ensure_ascii=False)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{kinds.get(type(value), type(value).__name__)} {text}"


def resolve_program_dir(path: str | os.PathLike) -> Path:
    """A program directory (program.json), a run directory (its final/), or a program.json file."""
    p = Path(path)
    if p.is_file() and p.name == "program.json":
        return p.parent
    if (p / "program.json").is_file():
        return p
    if (p / "final" / "program.json").is_file():
        return p / "final"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    hint = " (a run that has not finished has no final/ yet)" if (p / "plan.json").exists() else ""
    raise ProgramFileError(f"{p} holds neither program.json nor final/program.json{hint}")
