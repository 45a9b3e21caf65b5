"""The one ``KEY=VALUE`` parser: ``--set`` of optimize, experiment, eval and compare; serve's ``--model-options``.

    parse_override("lora.rank=32", RunConfig)           # (("lora", "rank"), 32)
    parse_override("seeds=0,1,2", ExperimentFile)        # (("seeds",), [0, 1, 2])
    parse_override("strategies=p,p -> w -> p", ...)      # (("strategies",), ["p", "p -> w -> p"])
    parse_override('per_task."my_task.py".sizes=[6, 6, 9]', ...)

KEY is a TOML key: dotted keys reach into tables (``lora.rank``,
``per_task.gsm8k.sizes``), quoted parts may hold dots. VALUE is read as a
TOML value (``32``, ``3e-4``, ``true``, ``"0"``, ``[1, 2]``, ``{a = 1}``), else
as JSON (``{"top_k": 1}``), else it is the text as written; ``True`` and
``FALSE`` are booleans too. The setting's type, when known, decides the
rest: a string setting takes the text as written (``data=2024.csv``,
``strategy=p -> w``); a list setting also takes comma-separated items
(``seeds=0,1,2``, ``sizes=50,50,50``, ``tasks=iris``), each read as above.
Whether the value then has the right type is checked with the rest of the
configuration (``tandem.experiments.typed.validate``), so one message format
covers files and the command line.
"""

from __future__ import annotations

import json
import tomllib
import typing
from typing import Any, Iterable, Literal

from tandem.experiments.typed import annotation_at, unwrap

__all__ = ["parse_options", "parse_override", "parse_overrides", "parse_value", "put"]

Path = tuple[str, ...]


def _key(item: str, key: str, option: str) -> Path:
    """A TOML key (``lora.rank``, ``per_task."a.py".sizes``) as its parts."""
    bad = ValueError(f"{option} {item!r}: {key.strip()!r} is not a setting name (write KEY=VALUE, e.g. lora.rank=16)")
    if not key.strip() or "\n" in key:
        raise bad
    try:
        doc = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        raise bad from None
    parts: list[str] = []
    while isinstance(doc, dict):
        ((name, doc),) = doc.items()
        parts.append(name)
    return tuple(parts)


def _literal(raw: str) -> Any:
    """A TOML value, else a JSON one, else a case-insensitive true/false, else the text."""
    text = raw.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return raw


def _quoted(raw: str) -> str | None:
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        value = _literal(text)
        if isinstance(value, str):
            return value
    return None


def parse_value(raw: str, tp: Any = Any) -> Any:
    """``raw`` (the text after ``=``) as a value for a setting of type ``tp`` (module docstring)."""
    base, _ = unwrap(tp)
    if base is str or (typing.get_origin(base) is Literal and all(isinstance(a, str) for a in typing.get_args(base))):
        quoted = _quoted(raw)
        return quoted if quoted is not None else raw.strip()
    if typing.get_origin(base) in (list, tuple):
        value = _literal(raw)
        if isinstance(value, list):
            return value
        args = typing.get_args(base)
        item = args[0] if args else Any
        return [parse_value(part, item) for part in raw.split(",") if part.strip()]
    return _literal(raw)


def parse_override(item: str, model: Any = None, option: str = "--set") -> tuple[Path, Any]:
    """``KEY=VALUE`` as ``(key path, value)``; ``model`` (a config type) gives the key's type, if known;
    ``option`` names the command-line option in errors."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"{option} {item!r}: expected KEY=VALUE (e.g. sizes=50,50,50 or lora.rank=16)")
    path = _key(item, key, option)
    return path, parse_value(raw, annotation_at(model, path) if model is not None else Any)


def parse_overrides(items: Iterable[str] | None, model: Any = None, option: str = "--set") -> list[tuple[Path, Any]]:
    return [parse_override(item, model, option) for item in items or []]


def parse_options(items: Iterable[str] | None, option: str) -> dict[str, Any]:
    """Untyped ``KEY=VALUE`` items (serve's ``--model-options``) as a dict; dotted keys make tables."""
    out: dict[str, Any] = {}
    for path, value in parse_overrides(items, None, option):
        put(out, path, value)
    return out


def put(doc: dict, path: Path, value: Any) -> None:
    """``doc[path[0]][path[1]]... = value``, making the tables on the way; a key that holds a value other
    than a table is a one-line error."""
    for i, key in enumerate(path[:-1]):
        inner = doc.setdefault(key, {})
        if not isinstance(inner, dict):
            shown = ".".join(path[:i + 1])
            raise ValueError(f"{'.'.join(path)}=...: `{shown}` is {json.dumps(inner, default=str)}, "
                             "not a table of settings")
        doc = inner
    doc[path[-1]] = value
