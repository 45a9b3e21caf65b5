"""The ``json`` prompt format: the reply is one JSON object, a key per output field.

    {"reasoning": "The petals are short ...", "species": "setosa"}

The system message gives the instructions, the inputs' names and the
object's template; inputs are labelled lines as in the fields format; demo
replies are JSON objects; the reply is started with the first key. Parsing
reads the first JSON object in the reply, and falls back to reading each
``"key": "value"`` pair on its own when the object is cut short or broken.
docs/design.md, "Prompt formats", has the measurements.
"""

from __future__ import annotations

import json
import re

from tandem.lm.base import Prompt
from tandem.program.render import NOT_GIVEN, check_inputs, format_fields, resolve_values, split_hint
from tandem.program.signature import Signature


def _template(sig: Signature, answers: dict) -> str:
    return json.dumps({f.name: str(answers.get(f.name) or f.desc or "...") for f in sig.output_fields})


def system_message(sig: Signature, answers: dict | None = None) -> str:
    parts = [sig.instructions.strip()] if sig.instructions else []
    parts.append("You are given: " + ", ".join(f.label for f in sig.input_fields) + ".")
    parts.append("Reply with one JSON object in exactly this format:\n" + _template(sig, answers or {}))
    return "\n\n".join(parts)


def reply_text(sig: Signature, values: dict) -> str:
    return json.dumps({f.name: str(values[f.name]) for f in sig.output_fields if values.get(f.name) is not None})


def build_prompt(sig: Signature, demos: list[dict], inputs: dict, hint: dict | None = None) -> Prompt:
    """System message, demos as earlier turns, then ``inputs`` (``hint`` as in the fields format)."""
    check_inputs(sig, inputs)
    answers, hint_text = split_hint(sig, hint)
    messages: list[tuple[str, str]] = [("system", system_message(sig, answers))]
    for demo in demos:
        user = format_fields(sig.input_fields, demo)
        if not user or not any(demo.get(f.name) is not None for f in sig.output_fields):
            continue
        values = {f.name: demo[f.name] if demo.get(f.name) is not None else NOT_GIVEN for f in sig.output_fields}
        messages += [("user", user), ("assistant", reply_text(sig, values))]
    user = format_fields(sig.input_fields, inputs)
    user += hint_text
    messages.append(("user", user))
    return Prompt(tuple(messages), prefix=opener(sig.output_fields[0].name, first=True))


def opener(name: str, first: bool = False) -> str:
    """The text that starts the value of key ``name`` (the object's first key when ``first``)."""
    return ("{" if first else ", ") + json.dumps(name) + ': "'


def parse_output(sig: Signature, text: str) -> dict:
    """The output fields of the first JSON object in ``text`` (prefix included), key by key if it is broken."""
    names = {f.name.lower(): i for i, f in enumerate(sig.output_fields)}
    values: dict[int, list[str]] = {}
    obj = _first_object(text)
    if obj is not None:
        for k, v in obj.items():
            if str(k).lower() in names and v is not None:
                values.setdefault(names[str(k).lower()], []).append(str(v).strip())
    else:
        for m in re.finditer(r'"(\w+)"\s*:\s*"((?:[^"\\]|\\.)*)("|$)', text, re.DOTALL):
            if m.group(1).lower() in names:
                try:
                    value = json.loads('"' + m.group(2) + '"')
                except json.JSONDecodeError:
                    value = m.group(2)
                values.setdefault(names[m.group(1).lower()], []).append(value.strip())
    return resolve_values(sig, values, text)


def _first_object(text: str) -> dict | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _end = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
