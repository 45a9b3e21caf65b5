"""Prompt formats: how a signature, its demos and inputs become a prompt, and a reply becomes fields.

    Predict("question -> answer", format="markers")     # per predictor
    program.set_format("markers")                       # every predictor of a program
    get_format("fields")                                 # the format object

A format is anything with the ``PromptFormat`` methods; ``FORMATS`` names
the built-in ones:

- ``fields`` (``tandem.program.render``): plain ``Label: value`` lines, the
  reply started with the first output label.
- ``markers`` (``tandem.program.markers``): every field behind a
  ``[[ ## name ## ]]`` marker, in the spirit of DSPy's chat adapter, the
  reply started with the first output marker and ended by a
  ``[[ ## completed ## ]]`` marker.
- ``json`` (``tandem.program.json_format``): the reply is one JSON object
  with a key per output field, started with the first key.

The weight step renders its training prompts with each predictor's own
format, so a tuned model learns the format its program asks for.
Which is the default, and why, is in docs/design.md ("Prompt formats").
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tandem.lm.base import Prompt
from tandem.program import json_format, markers, render
from tandem.program.signature import Field, Signature


@runtime_checkable
class PromptFormat(Protocol):
    """What a predictor needs from a prompt format."""

    name: str

    def build_prompt(self, sig: Signature, demos: list[dict], inputs: dict, hint: dict | None = None) -> Prompt:
        """System message, demos as earlier turns, then ``inputs``; ``hint``: gold labels to show."""

    def parse(self, sig: Signature, text: str) -> dict:
        """The output fields of ``text`` (the prompt's prefix included); raises ParseError."""

    def opener(self, field: Field) -> str:
        """What to append to a reply to ask the model for ``field`` next."""


class FieldFormat:
    """``Label: value`` lines (``tandem.program.render``)."""

    name = "fields"
    _tandem_share = True  # stateless: Module.deepcopy shares it

    def build_prompt(self, sig: Signature, demos: list[dict], inputs: dict, hint: dict | None = None) -> Prompt:
        return render.build_prompt(sig, demos, inputs, hint=hint)

    def parse(self, sig: Signature, text: str) -> dict:
        return render.parse_output(sig, text)

    def opener(self, field: Field) -> str:
        return f"\n{field.label}:"


class MarkerFormat:
    """``[[ ## name ## ]]`` markers (``tandem.program.markers``)."""

    name = "markers"
    _tandem_share = True

    def build_prompt(self, sig: Signature, demos: list[dict], inputs: dict, hint: dict | None = None) -> Prompt:
        return markers.build_prompt(sig, demos, inputs, hint=hint)

    def parse(self, sig: Signature, text: str) -> dict:
        return markers.parse_output(sig, text)

    def opener(self, field: Field) -> str:
        return "\n\n" + markers.marker(field.name) + "\n"


class JSONFormat:
    """One JSON object, a key per output field (``tandem.program.json_format``)."""

    name = "json"
    _tandem_share = True

    def build_prompt(self, sig: Signature, demos: list[dict], inputs: dict, hint: dict | None = None) -> Prompt:
        return json_format.build_prompt(sig, demos, inputs, hint=hint)

    def parse(self, sig: Signature, text: str) -> dict:
        return json_format.parse_output(sig, text)

    def opener(self, field: Field) -> str:
        return '"' + json_format.opener(field.name)


FORMATS: dict[str, PromptFormat] = {f.name: f for f in (FieldFormat(), MarkerFormat(), JSONFormat())}
#: What the formats show for an output field a demo lacks (a labelled demo's reasoning).
PLACEHOLDERS = frozenset({render.NOT_GIVEN, markers.NOT_SUPPLIED})
#: The format a predictor uses unless told otherwise (docs/design.md, "Prompt formats").
DEFAULT_FORMAT = "fields"


def get_format(name: str | PromptFormat | None) -> PromptFormat:
    """The format called ``name`` (None: the default); a PromptFormat is returned as it is."""
    if name is None:
        name = DEFAULT_FORMAT
    if not isinstance(name, str):
        if isinstance(name, PromptFormat):
            return name
        raise TypeError(f"format: {name!r} is neither a format name nor a PromptFormat")
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"format: unknown prompt format {name!r}; known: {sorted(FORMATS)}") from None
