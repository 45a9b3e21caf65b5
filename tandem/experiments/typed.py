"""Typed settings: validate a config document against its types (pydantic, strict), one-line errors.

The run configuration (``tandem.experiments.config.RunConfig``) and an
experiment file (``tandem.experiments.experiment_file``) are described by
type annotations: dataclass fields and TypedDict tables with constraints
from ``annotated_types`` (``Annotated[int, Ge(1)]``). ``validate`` checks a
document against one of them and returns the typed value; a bad document is
a ValueError of one line that names the key, the value and what it must be::

    seed: expected an integer, got "0"
    sizes: expected 3 positive integers, got [50, 50]
    [lora] rank: expected an integer, got "abc"
    [lora] rnak: unknown setting (got 32); known: alpha, attention, ...

Strict: ``"8"`` is not an integer and ``true`` is not a number, so a value
that TOML or ``--set`` typed differently from what the setting needs is an
error before anything slow starts, not a crash (or a silent coercion) later.
An integer is accepted where a number is expected, and a list where a tuple
is. Values are checked as JSON would carry them (the document goes through
``json.dumps``): TOML's types are JSON's, bar dates (then text).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from functools import lru_cache
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict, is_typeddict

__all__ = ["Expected", "annotation_at", "describe", "key_text", "message", "table", "table_of", "unwrap", "validate"]

_FORBID = ConfigDict(extra="forbid", strict=True)


@dataclasses.dataclass(frozen=True)
class Expected:
    """``Annotated[T, Expected("a strategy like 'p -> w'")]``: how an error message describes T."""

    text: str


def table(name: str, fields: dict[str, Any]) -> type:
    """A TOML table type: a TypedDict of optional keys ``fields``, unknown keys refused."""
    cls = TypedDict(name, fields, total=False)  # type: ignore[operator]
    cls.__pydantic_config__ = _FORBID
    return cls


def table_of(cls: type, name: str, exclude: tuple[str, ...] = ()) -> type:
    """``table`` of a dataclass's fields (their annotations, constraints included), less ``exclude``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return table(name, {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in exclude})


# -- what a type is, in words ------------------------------------------------------------------------
def unwrap(tp: Any) -> tuple[Any, list]:
    """``(type, its Annotated metadata)``: Annotated and Optional removed."""
    meta: list = []
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            meta.extend(tp.__metadata__)
            tp = tp.__origin__
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]
            continue
        return tp, meta


def _bounds(meta: list) -> str:
    words = []
    for m in meta:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(m, getattr(at, attr.capitalize())):
                words.append(f"{op} {getattr(m, attr)}")
    return (" " + " and ".join(words)) if words else ""


def _literal(value: Any) -> str:
    return json.dumps(value)


def describe(tp: Any, plural: bool = False) -> str:
    """What a value of ``tp`` is, for an error message: ``an integer >= 1``, ``3 positive integers``,
    ``a non-empty list of strings``, ``a table``; ``plural``: ``integers >= 1``."""
    tp, meta = unwrap(tp)
    for m in meta:
        if isinstance(m, Expected):
            return m.text
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    non_empty = any(isinstance(m, at.MinLen) and m.min_length >= 1 for m in meta)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a, plural) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(_literal(a) for a in args) if len(args) > 1 else _literal(args[0])
    if tp is bool:
        return "true or false"
    if tp in (int, float, str):
        noun = {int: "integer", float: "number", str: "string"}[tp]
        bounds = _bounds(meta)
        if bounds == " > 0" and tp is int:
            return "positive integers" if plural else "a positive integer"
        if non_empty and tp is str:
            return "non-empty strings" if plural else "a non-empty string"
        return f"{noun}s{bounds}" if plural else f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}{bounds}"
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"{len(args)} {describe(args[0], plural=True)}"
            return f"{len(args)} values ({', '.join(describe(a) for a in args)})"
        item = describe(args[0], plural=True) if args else "values"
        return f"{'non-empty lists' if plural else 'a non-empty list'} of {item}" if non_empty else \
            f"{'lists' if plural else 'a list'} of {item}"
    if tp is dict or origin is dict or is_typeddict(tp) or dataclasses.is_dataclass(tp):
        return "tables" if plural else "a table"
    return "values" if plural else "a value"


# -- where a key is --------------------------------------------------------------------------------
def _members(tp: Any) -> dict[str, Any] | None:
    """The keys of a table type and their types (a TypedDict or a dataclass); None for other types."""
    tp, _ = unwrap(tp)
    if is_typeddict(tp) or dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        if dataclasses.is_dataclass(tp):
            return {f.name: hints[f.name] for f in dataclasses.fields(tp)}
        return hints
    return None


def annotation_at(tp: Any, path: tuple[str, ...]) -> Any:
    """The type of the key ``path`` (``("lora", "rank")``) under ``tp``; ``Any`` where it is not known."""
    for key in path:
        members = _members(tp)
        if members is not None:
            if key not in members:
                return Any
            tp = members[key]
            continue
        base, _ = unwrap(tp)
        if typing.get_origin(base) is dict and len(typing.get_args(base)) == 2:
            tp = typing.get_args(base)[1]
            continue
        return Any
    return tp


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def key_text(path: tuple[str, ...]) -> str:
    """``("lora", "rank")`` -> ``[lora] rank``; ``("seed",)`` -> ``seed``; keys quoted as TOML needs."""
    parts = [p if _BARE_KEY.match(p) else json.dumps(p) for p in path]
    return parts[-1] if len(parts) == 1 else f"[{'.'.join(parts[:-1])}] {parts[-1]}"


def _shown(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # a circular structure: nothing a config file can hold
        return repr(value)


# -- validation ----------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _adapter(tp: Any) -> TypeAdapter:
    if dataclasses.is_dataclass(tp) and not hasattr(tp, "__pydantic_config__"):
        raise TypeError(f"{tp.__name__} needs __pydantic_config__ (tandem.experiments.typed._FORBID)")
    return TypeAdapter(tp)


def message(tp: Any, doc: Any, error: dict, where: tuple[str, ...] = ()) -> str:
    """One line for one pydantic error of ``doc`` (a value of ``tp``, found at the key path ``where``)."""
    loc = tuple(error["loc"])
    keys: list[str] = []
    node = doc
    for part in loc:  # the setting: the keys of the document down to a list index or a union member's tag
        if not (isinstance(part, str) and isinstance(node, dict) and part in node):
            break
        keys.append(part)
        node = node[part]
    path = tuple(keys)
    value = node
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        known = _members(annotation_at(tp, path[:-1])) or {}
        return (f"{key_text(where + path)}: unknown setting (got {_shown(value)}); "
                f"known: {', '.join(sorted(known))}")
    if not path:
        return f"{key_text(where) if where else 'the settings'}: expected {describe(tp)}, got {_shown(value)}"
    return f"{key_text(where + path)}: expected {describe(annotation_at(tp, path))}, got {_shown(value)}"


def validate(tp: Any, doc: Any, where: tuple[str, ...] = ()) -> Any:
    """``doc`` checked against ``tp`` and converted to it (a dataclass instance, a dict of a table);
    a ValueError of one line (``message``) for the first thing wrong. ``where``: the key path of
    ``doc`` in its file, for the message (``("lora",)`` for a ``[lora]`` table)."""
    try:
        return _adapter(tp).validate_json(json.dumps(doc, default=str), strict=True)
    except ValidationError as exc:
        errors = exc.errors()
        first = next((e for e in errors if e["type"] in ("extra_forbidden", "unexpected_keyword_argument")),
                     errors[0])
        raise ValueError(message(tp, doc, first, where)) from None
