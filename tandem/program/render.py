"""Prompt rendering and output parsing for predictors.

The format is plain labelled lines, the easiest for small models to follow::

    Reasoning: the petals are long, so ...
    Species: virginica

The reply starts already written with the first output label (the prompt's
``prefix``), demos are earlier user/assistant turns, and parsing looks for
each output label at the start of a line.
"""

from __future__ import annotations

import re

from tandem.lm.base import Prompt
from tandem.program.signature import Field, Signature, parse_value


class ParseError(ValueError):
    """The model's reply lacks an output field. Callers count these as failures."""

    def __init__(self, message: str, completion: str, missing: list[str]) -> None:
        super().__init__(message)
        self.completion = completion
        self.missing = missing


def format_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(f"[{i + 1}] {v}" for i, v in enumerate(value))
    return str(value).strip()


def format_fields(fields: tuple[Field, ...], values: dict) -> str:
    lines = []
    for f in fields:
        if f.name in values and values[f.name] is not None:
            value = format_value(values[f.name])
            sep = "\n" if "\n" in value else " "
            lines.append(f"{f.label}:{sep}{value}")
    return "\n".join(lines)


def system_message(sig: Signature, answers: dict | None = None) -> str:
    """Instructions, the inputs' names and the reply format; ``answers`` fill an output's format line."""
    parts = []
    if sig.instructions:
        parts.append(sig.instructions.strip())
    ins = ", ".join(f.label for f in sig.input_fields)
    parts.append(f"You are given: {ins}.")
    answers = answers or {}
    fmt = "\n".join(f"{f.label}: {answers.get(f.name) or _describe(f)}" for f in sig.output_fields)
    parts.append("Reply in exactly this format:\n" + fmt)
    return "\n\n".join(parts)


def _describe(f: Field) -> str:
    # Choices are not spelled out here: small models copy this line verbatim
    # ("Species: one of: a, b, c"), which names no answer. Say them in the
    # instructions or the field's description instead.
    return f.desc or "..."


def match_choice(f: Field, value: str) -> str | None:
    """The choice that ``value`` names: exact (case-insensitive), else the only one it mentions."""
    low = value.lower().strip(" .\"'")
    for c in f.choices:
        if low == c.lower():
            return c
    hits = [c for c in f.choices if re.search(r"\b" + re.escape(c.lower()) + r"\b", low)]
    # Naming several choices ("one of: a, b, c") is no answer.
    return hits[0] if len(hits) == 1 else None


#: What a demo shows for an output field it lacks (a labelled example has the
#: answer, not the reasoning). With every field shown, each demo's reply has the
#: format the model is asked to write (``Reasoning:`` first), so small models
#: keep to it, answer in one reply, and copy this short line instead of
#: rambling. DSPy's chat adapter fills such fields in the same spirit. The
#: measurements are in docs/benchmarks.md and docs/design.md.
NOT_GIVEN = "Not given for this example."


def complete_demo(sig: Signature, demo: dict) -> dict:
    """``demo`` with any output field it lacks shown as NOT_GIVEN (when it has at least one)."""
    present = [f for f in sig.output_fields if demo.get(f.name) is not None]
    if not present or len(present) == len(sig.output_fields):
        return demo
    return {**demo, **{f.name: NOT_GIVEN for f in sig.output_fields if demo.get(f.name) is None}}


def build_prompt(sig: Signature, demos: list[dict], inputs: dict, hint: dict | None = None) -> Prompt:
    """System message, demos as earlier turns, then ``inputs``.

    ``hint``: gold labels to show (rationalization). A label this predictor
    writes replaces its field's description in the reply format (small
    models copy that line, so the answer lands where it is parsed); the
    others are named in a ``Hint:`` line below the inputs.
    """
    check_inputs(sig, inputs)
    answers, hint_text = split_hint(sig, hint)
    messages: list[tuple[str, str]] = [("system", system_message(sig, answers))]
    for demo in demos:
        user = format_fields(sig.input_fields, demo)
        reply = format_fields(sig.output_fields, complete_demo(sig, demo))
        if user and reply:
            messages.append(("user", user))
            messages.append(("assistant", reply))
    messages.append(("user", format_fields(sig.input_fields, inputs) + hint_text))
    return Prompt(tuple(messages), prefix=sig.output_fields[0].label + ":")


def check_inputs(sig: Signature, inputs: dict) -> None:
    """Every input field of ``sig`` is in ``inputs``; a ValueError naming the missing ones otherwise."""
    missing = [f.name for f in sig.input_fields if f.name not in inputs]
    if missing:
        raise ValueError(f"{sig.name}: missing input field(s) {missing}")


def split_hint(sig: Signature, hint: dict | None) -> tuple[dict, str]:
    """Gold labels for a prompt (every format): those ``sig`` writes, and a ``Hint:`` line naming the rest.

    The first go into the reply's structure (small models copy it, so the
    answer lands where it is parsed); the line ("" when none) goes below the inputs.
    """
    hint = hint or {}
    outputs = {f.name for f in sig.output_fields}
    others = [f"{k.replace('_', ' ').title()} is {v}" for k, v in hint.items() if k not in outputs]
    line = "\n\nHint: the correct " + "; the correct ".join(others) + "." if others else ""
    return {k: v for k, v in hint.items() if k in outputs}, line


def _label_pattern(f: Field) -> str:
    names = {re.escape(f.label), re.escape(f.name), re.escape(f.name.replace("_", " "))}
    return "|".join(sorted(names, key=len, reverse=True))


def parse_output(sig: Signature, text: str) -> dict:
    """Split ``text`` (prefix included) into the signature's output fields."""
    outs = sig.output_fields
    pattern = re.compile(
        r"^[ \t*#>\-]*(?:" + "|".join(f"(?P<f{i}>{_label_pattern(f)})" for i, f in enumerate(outs)) + r")[ \t*]*:",
        re.IGNORECASE | re.MULTILINE,
    )
    marks = []  # (field index, label start, value start), in text order
    for m in pattern.finditer(text):
        idx = next(i for i in range(len(outs)) if m.group(f"f{i}") is not None)
        marks.append((idx, m.start(), m.end()))
    values: dict[int, list[str]] = {}
    for k, (idx, _start, vstart) in enumerate(marks):
        end = marks[k + 1][1] if k + 1 < len(marks) else len(text)
        value = text[vstart:end].strip()
        # "Answer: Answer: 4": the model repeated the label we had written for it.
        value = re.sub(r"^(?:" + _label_pattern(outs[idx]) + r")[ \t*]*:[ \t]*", "", value, flags=re.IGNORECASE)
        values.setdefault(idx, []).append(value)
    return resolve_values(sig, values, text)


def resolve_values(sig: Signature, values: dict[int, list[str]], text: str) -> dict:
    """Each output field's value from its occurrences in a reply (``values``: field index -> texts).

    Shared by every prompt format: a single-line field keeps its first
    non-empty line; the first non-empty occurrence wins (repeats are the
    model rambling on); a field with choices or a type other than ``str``
    takes the first occurrence that names a choice and parses, then is
    converted to its type (``int``, ``float``, ``bool``). Raises ParseError
    for a missing or empty field, a value outside the choices, or one that
    is not of the field's type.
    """
    outs = sig.output_fields
    values = {i: [_first_line(v) if not outs[i].multiline else v for v in vs] for i, vs in values.items()}
    missing = [outs[i].name for i in range(len(outs)) if i not in values]
    if missing:
        raise ParseError(f"{sig.name}: reply has no {', '.join(missing)} field", text, missing)
    result = {}
    for i, f in enumerate(outs):
        value = next((v for v in values[i] if v), "")
        if f.choices or f.type != "str":  # a later occurrence may be the valid one (the label was asked for again)
            value = next((v for v in values[i] if _typed_value(f, v) is not None), value)
        if not f.multiline and not value:
            raise ParseError(f"{sig.name}: field {f.name} is empty", text, [f.name])
        if f.choices and match_choice(f, value) is None:
            raise ParseError(f"{sig.name}: field {f.name} is {value[:40]!r}, not one of {list(f.choices)}",
                             text, [f.name])
        typed = _typed_value(f, value)
        if typed is None:
            raise ParseError(f"{sig.name}: field {f.name} is {value[:40]!r}, not of type {f.type}", text, [f.name])
        result[f.name] = typed
    return result


def _typed_value(f: Field, value: str) -> object | None:
    """``value`` as field ``f`` holds it: its choice, converted to its type; None if it is neither."""
    if f.choices:
        value = match_choice(f, value)
        if value is None:
            return None
    return parse_value(f.type, value)


def _first_line(value: str) -> str:
    line = next((ln.strip() for ln in value.splitlines() if ln.strip()), "")
    return line.strip("*").strip()
