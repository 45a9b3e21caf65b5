"""Signatures: the typed interface of one LM call.

A signature names input fields and output fields (each with a short
description) and carries the task instructions. Two ways to write one::

    sig = Signature.parse("question -> answer", "Answer in a few words.")

    class Classify(Signature):
        '''Classify the iris flower from its measurements.'''
        sepal_length: str = InputField(desc="in cm")
        species: Literal["setosa", "versicolor", "virginica"] = OutputField()

Output fields have a type: ``str`` (the default), ``int``, ``float`` or
``bool``; the parser turns the reply's text into that Python value, or fails
(``ParseError``, a counted failure). A ``Literal[...]`` annotation, or
``OutputField(choices=[...])``, gives the field a closed set of answers.
The class form reads the types from the annotations; the shorthand takes
them after a colon: ``"question -> answer: int, sure: bool"`` or
``"x -> label: Literal['cat', 'dog']"``. Input annotations are not read:
inputs are shown as text whatever their type.

Signatures are immutable values: ``with_instructions`` and ``prepend_output``
return new ones, so optimizers can edit prompts without touching the caller's.
"""

from __future__ import annotations

import ast
import re
import typing
from dataclasses import dataclass, replace
from typing import Any, Literal

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: The types an output field's text can be parsed into, by the name program.json saves.
TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


@dataclass(frozen=True)
class Field:
    name: str
    desc: str = ""
    is_input: bool = True
    # Output fields marked `multiline` keep every line up to the next field
    # label (reasoning); the others keep only their first line, because small
    # models often keep talking after the answer.
    multiline: bool = False
    # A closed set of answers (a classifier's labels): the prompt lists them and
    # the parser maps the reply to one of them, or fails (a counted failure).
    choices: tuple[str, ...] = ()
    # What the parser turns an output's text into: a name in TYPES. A typed
    # field with choices gets the matched choice converted to its type.
    type: str = "str"

    def __post_init__(self) -> None:
        if not isinstance(self.type, str):  # with_field("n", type=int)
            object.__setattr__(self, "type", type_name(self.type))
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.type not in TYPES:
            raise ValueError(f"field {self.name!r}: type {self.type!r} is not one of {list(TYPES)}")
        if not all(isinstance(c, str) for c in self.choices):
            raise ValueError(f"field {self.name!r}: choices are strings, got {list(self.choices)}")
        if self.type != "str":
            for c in self.choices:
                if parse_value(self.type, c) is None:
                    raise ValueError(f"field {self.name!r}: choice {c!r} is not of type {self.type}")

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").title()


def InputField(desc: str = "") -> Any:  # noqa: N802 - mirrors DSPy's vocabulary
    return Field(name="", desc=desc, is_input=True)


def OutputField(  # noqa: N802
    desc: str = "", multiline: bool = False, choices: "typing.Iterable[object]" = (), type: "type | str | None" = None,
) -> Any:
    """An output field; ``choices`` (strings, or ints, floats, bools that also set the type) close its answers.

    ``type`` (``int``, ``float``, ``bool``, ``str`` or its name) is usually
    given by the class form's annotation instead.
    """
    kind, values = choice_type(tuple(choices)) if choices else ("str", ())
    if type is not None:
        kind = type_name(type)
    return Field(name="", desc=desc, is_input=False, multiline=multiline, choices=values, type=kind)


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_value(kind: str, text: str) -> Any:
    """``text`` as a value of type ``kind`` (a name in TYPES), or None when it is not one.

    Lenient about what surrounds the value, strict about the value itself:
    quotes, ``**`` and a final period are dropped, and commas between digit
    groups (``1,234``); ``int`` takes ``42`` or ``42.0``, ``float`` any
    decimal number, ``bool`` true/false, yes/no or 1/0 (any case).
    ``"about 42"`` is no int.
    """
    if kind == "str":
        return text
    s = text.strip().strip("*\"'`").strip()
    s = re.sub(r"(?<=\d)\.$", "", s)
    if kind == "bool":
        return _BOOLS.get(s.rstrip(".").lower())
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    if not _NUMBER.fullmatch(s):
        return None
    if kind == "int" and s.lstrip("+-").isdigit():
        return int(s)  # exact, however long
    value = float(s)
    if kind == "float":
        return value
    return int(value) if value.is_integer() else None


def type_name(t: "type | str") -> str:
    """``int`` -> ``"int"``; a name in TYPES is returned as it is."""
    for name, cls in TYPES.items():
        if t is cls or t == name:
            return name
    raise TypeError(f"output type {t!r} is not supported; use str, int, float, bool or Literal[...]")


def choice_type(values: tuple) -> tuple[str, tuple[str, ...]]:
    """The type and the choices (as text) of ``Literal[...]`` values or ``choices=[...]``.

    Strings give ``str``; ints, floats or bools give that type. ``Literal[True, False]``
    is a plain ``bool`` (no choices), so ``yes``/``no`` replies parse too.
    """
    kinds = {type_name(type(v)) if isinstance(v, (str, int, float, bool)) else "?" for v in values}
    if len(kinds) != 1 or "?" in kinds:
        raise TypeError(f"choices {list(values)!r} must all be strings, or all ints, floats or bools")
    kind = kinds.pop()
    if kind == "bool" and set(values) == {True, False}:
        return kind, ()
    return kind, tuple(str(v) for v in values)


def annotation_type(annotation: Any) -> tuple[str, tuple[str, ...]]:
    """An output annotation as (type name, choices): ``int`` or ``Literal["a", "b"]``."""
    if typing.get_origin(annotation) is Literal:
        return choice_type(typing.get_args(annotation))
    return type_name(annotation), ()


def _typed(f: Field, annotation: Any) -> Field:
    """``f`` (an output field of the class form) with the type and choices of its annotation."""
    kind, choices = annotation_type(annotation)
    if choices and f.choices and set(choices) != set(f.choices):
        raise ValueError(f"field {f.name!r}: its annotation's choices {list(choices)} differ from "
                         f"OutputField(choices={list(f.choices)})")
    if f.type != "str" and kind != f.type:
        raise ValueError(f"field {f.name!r}: annotated {kind}, declared {f.type}")
    return replace(f, type=kind, choices=f.choices or choices)


def _annotations(klass: type) -> dict[str, Any]:
    """The class's own annotations, resolved (``from __future__ import annotations`` leaves strings)."""
    own = vars(klass).get("__annotations__", {})
    try:
        hints = typing.get_type_hints(klass)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is read as written, below
        hints = {}
    out = {}
    for name, ann in own.items():
        ann = hints.get(name, ann)
        out[name] = _eval_annotation(ann) if isinstance(ann, str) else ann
    return out


def _eval_annotation(text: str) -> Any:
    """``"int"`` or ``"Literal['a', 'b']"`` (shorthand, or an annotation left as text) as a type."""
    text = text.strip()
    m = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text, re.DOTALL)
    if m:
        try:
            values = ast.literal_eval("(" + m.group(1) + ",)")
        except (ValueError, SyntaxError):
            raise TypeError(f"cannot read the choices of {text!r}") from None
        return Literal[values]
    if text in TYPES:
        return TYPES[text]
    raise TypeError(f"output type {text!r} is not supported; use str, int, float, bool or Literal[...]")


class _SignatureMeta(type):
    """Turns a class body of InputField/OutputField into a Signature value."""

    def __call__(cls, *args, **kwargs):
        if cls is Signature:
            return super().__call__(*args, **kwargs)
        fields = []
        for klass in reversed(cls.__mro__):
            annotations = None
            for name, value in vars(klass).items():
                if isinstance(value, Field):
                    f = replace(value, name=name)
                    if not f.is_input:
                        annotations = _annotations(klass) if annotations is None else annotations
                        if name in annotations:
                            f = _typed(f, annotations[name])
                    fields.append(f)
        doc = (cls.__doc__ or "").strip()
        return Signature(tuple(fields), kwargs.get("instructions", doc), name=cls.__name__)


@dataclass(frozen=True)
class Signature(metaclass=_SignatureMeta):
    fields: tuple[Field, ...]
    instructions: str = ""
    name: str = "Signature"

    def __post_init__(self) -> None:
        seen = set()
        for f in self.fields:
            if not _NAME.match(f.name):
                raise ValueError(f"invalid field name {f.name!r} in signature {self.name}")
            if f.name in seen:
                raise ValueError(f"duplicate field {f.name!r} in signature {self.name}")
            seen.add(f.name)
        if not self.output_fields:
            raise ValueError(f"signature {self.name} has no output fields")

    @classmethod
    def parse(cls, spec: str, instructions: str = "") -> "Signature":
        """Parse ``"a, b -> c, d"`` shorthand; an output may be typed: ``"c: int"``, ``"d: Literal['x', 'y']"``."""
        if "->" not in spec:
            raise ValueError(f"signature shorthand needs '->': {spec!r}")
        left, right = spec.split("->", 1)
        fields = [Field(n.partition(":")[0].strip(), is_input=True) for n in _split(left)]
        for item in _split(right):
            name, colon, ann = item.partition(":")
            f = Field(name.strip(), is_input=False)
            fields.append(_typed(f, _eval_annotation(ann)) if colon else f)
        return cls(tuple(fields), instructions)

    @classmethod
    def ensure(cls, spec: "Signature | str | type") -> "Signature":
        if isinstance(spec, Signature):
            return spec
        if isinstance(spec, str):
            return cls.parse(spec)
        if isinstance(spec, type) and issubclass(spec, Signature):
            return spec()
        raise TypeError(f"not a signature: {spec!r}")

    @property
    def input_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.is_input)

    @property
    def output_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.is_input)

    def with_field(self, name: str, **changes: Any) -> "Signature":
        """A copy with field ``name`` changed, e.g. ``with_field("species", choices=(...))``."""
        if name not in {f.name for f in self.fields}:
            raise KeyError(f"{self.name} has no field {name!r}")
        return replace(self, fields=tuple(replace(f, **changes) if f.name == name else f for f in self.fields))

    def with_instructions(self, instructions: str) -> "Signature":
        return replace(self, instructions=instructions)

    def prepend_output(self, f: Field) -> "Signature":
        inputs = self.input_fields
        return replace(self, fields=inputs + (f,) + self.output_fields)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "instructions": self.instructions,
            "fields": [
                {"name": f.name, "desc": f.desc, "input": f.is_input, "multiline": f.multiline,
                 **({"choices": list(f.choices)} if f.choices else {}),
                 **({"type": f.type} if f.type != "str" else {})}
                for f in self.fields
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        fields = tuple(
            Field(x["name"], x.get("desc", ""), x["input"], x.get("multiline", False), tuple(x.get("choices", ())),
                  x.get("type", "str"))  # files written before typed fields have no type: str
            for x in d["fields"]
        )
        return cls(fields, d.get("instructions", ""), name=d.get("name", "Signature"))

    def __repr__(self) -> str:
        ins = ", ".join(f.name for f in self.input_fields)
        outs = ", ".join(f.name + (f": {f.type}" if f.type != "str" else "") for f in self.output_fields)
        return f"Signature({ins} -> {outs})"


def _split(side: str) -> list[str]:
    """The comma-separated items of one side of the shorthand, commas inside brackets or quotes kept."""
    items, depth, quote, cur = [], 0, "", ""
    for ch in side:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        cur += ch
    items.append(cur)
    return [i.strip() for i in items if i.strip()]

