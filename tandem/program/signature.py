"""Signatures: the typed interface of one LM call.

A signature names input fields and output fields (each with a short
description) and carries the task instructions. Two ways to write one::

    sig = Signature.parse("question -> answer", "Answer in a few words.")

    class Classify(Signature):
        '''Classify the iris flower from its measurements.'''
        sepal_length: str = InputField(desc="in cm")
        species: str = OutputField(desc="setosa, versicolor or virginica")

Signatures are immutable values: ``with_instructions`` and ``prepend_output``
return new ones, so optimizers can edit prompts without touching the caller's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").title()


def InputField(desc: str = "") -> Any:  # noqa: N802 - mirrors DSPy's vocabulary
    return Field(name="", desc=desc, is_input=True)


def OutputField(desc: str = "", multiline: bool = False, choices: tuple[str, ...] = ()) -> Any:  # noqa: N802
    return Field(name="", desc=desc, is_input=False, multiline=multiline, choices=tuple(choices))


class _SignatureMeta(type):
    """Turns a class body of InputField/OutputField into a Signature value."""

    def __call__(cls, *args, **kwargs):
        if cls is Signature:
            return super().__call__(*args, **kwargs)
        fields = []
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Field):
                    fields.append(replace(value, name=name))
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
        """Parse ``"a, b -> c, d"`` shorthand."""
        if "->" not in spec:
            raise ValueError(f"signature shorthand needs '->': {spec!r}")
        left, right = spec.split("->", 1)
        names_in = [n.strip() for n in left.split(",") if n.strip()]
        names_out = [n.strip() for n in right.split(",") if n.strip()]
        fields = [Field(n, is_input=True) for n in names_in]
        fields += [Field(n, is_input=False) for n in names_out]
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
                 **({"choices": list(f.choices)} if f.choices else {})}
                for f in self.fields
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        fields = tuple(
            Field(x["name"], x.get("desc", ""), x["input"], x.get("multiline", False), tuple(x.get("choices", ())))
            for x in d["fields"]
        )
        return cls(fields, d.get("instructions", ""), name=d.get("name", "Signature"))

    def __repr__(self) -> str:
        ins = ", ".join(f.name for f in self.input_fields)
        outs = ", ".join(f.name for f in self.output_fields)
        return f"Signature({ins} -> {outs})"

