"""The ``markers`` prompt format: every field behind a ``[[ ## name ## ]]`` marker.

    [[ ## reasoning ## ]]
    The petals are short ...

    [[ ## species ## ]]
    setosa

    [[ ## completed ## ]]

The system message lists the fields, shows the structure of one exchange
and ends with the instructions; the user turn holds the inputs behind their
markers and says which markers to write; the reply is started with the
first output marker. The idea is DSPy's chat adapter's (the wording here is
tandem's own); docs/design.md, "Prompt formats", has the measurements.
"""

from __future__ import annotations

import re

from tandem.lm.base import Prompt
from tandem.program.render import check_inputs, format_value, resolve_values, split_hint
from tandem.program.signature import Field, Signature

COMPLETED = "completed"
#: What a demo shows for an output field it lacks.
NOT_SUPPLIED = "Not supplied for this example."
_MARKER = re.compile(r"\[\[\s*#+\s*(\w+)\s*#+\s*\]\]")


def marker(name: str) -> str:
    return f"[[ ## {name} ## ]]"


def _describe(f: Field) -> str:
    parts = [f.desc] if f.desc else []
    if f.choices:
        parts.append("one of: " + ", ".join(f.choices))
    return f"`{f.name}`" + (f" ({'; '.join(parts)})" if parts else "")


def system_message(sig: Signature, answers: dict | None = None) -> str:
    """Fields, the structure of one exchange, then the instructions; ``answers`` fill outputs' slots."""
    answers = answers or {}
    lines = ["Your inputs: " + ", ".join(_describe(f) for f in sig.input_fields) + ".",
             "Your outputs: " + ", ".join(_describe(f) for f in sig.output_fields) + ".",
             "", "Every exchange has this structure:", ""]
    for f in (*sig.input_fields, *sig.output_fields):
        lines += [marker(f.name), str(answers.get(f.name) or "{" + f.name + "}"), ""]
    lines.append(marker(COMPLETED))
    if sig.instructions:
        lines += ["", "Your task: " + sig.instructions.strip()]
    return "\n".join(lines)


def _fields(fields: tuple[Field, ...], values: dict) -> str:
    return "\n\n".join(f"{marker(f.name)}\n{format_value(values[f.name])}" for f in fields
                       if values.get(f.name) is not None)


def reply_text(sig: Signature, values: dict) -> str:
    """An assistant turn: the output fields behind their markers, then the completed marker."""
    return _fields(sig.output_fields, values) + "\n\n" + marker(COMPLETED)


def _request_line(sig: Signature) -> str:
    names = [f"`{marker(f.name)}`" for f in sig.output_fields] + [f"`{marker(COMPLETED)}`"]
    return "Reply with " + ", then ".join(names) + "."


def build_prompt(sig: Signature, demos: list[dict], inputs: dict, hint: dict | None = None) -> Prompt:
    """System message, demos as earlier turns, then ``inputs`` (``hint`` as in the fields format)."""
    check_inputs(sig, inputs)
    answers, hint_text = split_hint(sig, hint)
    messages: list[tuple[str, str]] = [("system", system_message(sig, answers))]
    for demo in demos:
        shown = [f for f in sig.output_fields if demo.get(f.name) is not None]
        user = _fields(sig.input_fields, demo)
        if not user or not shown:
            continue
        values = {f.name: demo[f.name] if demo.get(f.name) is not None else NOT_SUPPLIED for f in sig.output_fields}
        messages.append(("user", user))
        messages.append(("assistant", reply_text(sig, values)))
    user = _fields(sig.input_fields, inputs)
    user += hint_text
    messages.append(("user", user + "\n\n" + _request_line(sig)))
    return Prompt(tuple(messages), prefix=marker(sig.output_fields[0].name) + "\n")


def parse_output(sig: Signature, text: str) -> dict:
    """Split ``text`` (prefix included) at its markers into the signature's output fields."""
    index = {f.name.lower(): i for i, f in enumerate(sig.output_fields)}
    marks = list(_MARKER.finditer(text))
    values: dict[int, list[str]] = {}
    for k, m in enumerate(marks):
        name = m.group(1).lower()
        if name == COMPLETED:
            break
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        if name in index:
            values.setdefault(index[name], []).append(text[m.end():end].strip())
    return resolve_values(sig, values, text)
