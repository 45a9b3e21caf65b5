"""A program's input fields and label fields: what a request to it, and an example of it, must hold.

    fields, source = program_input_fields(program)   # [InputSpec("question", True, "...")], "forward"
    labels = program_label_fields(program)           # [LabelSpec("species", ("setosa", ...))]
    inputs, labels = program_fields(program)         # names only: required inputs, label fields
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from tandem.program.module import Module
from tandem.program.predict import Predict


@dataclass(frozen=True)
class InputSpec:
    name: str
    required: bool = True
    desc: str = ""


def program_input_fields(program: Module) -> tuple[list[InputSpec], str]:
    """The fields a request's ``inputs`` must hold, and where they came from.

    In this order:

    1. ``"declared"``: the program (class or instance) has ``input_fields = ("question", ...)``;
    2. ``"forward"``: ``forward`` names its parameters (``def forward(self, question, k=3)``)
       and takes no ``*args``/``**kwargs``; parameters with a default are optional;
    3. ``"predictor"``: the input fields of the only predictor, or of the first one
       (``named_predictors`` order) when there are several.

    Descriptions come from the predictors' fields of the same name.
    """
    preds = program.named_predictors()
    descs: dict[str, str] = {}
    for _, p in reversed(preds):
        descs.update({f.name: f.desc for f in p.signature.input_fields if f.desc})

    declared = getattr(program, "input_fields", None)
    if declared is not None:
        if isinstance(declared, str) or not all(isinstance(n, str) and n.isidentifier() for n in declared):
            raise TypeError(f"{type(program).__name__}.input_fields must be a tuple of field names, not {declared!r}")
        return [InputSpec(n, True, descs.get(n, "")) for n in declared], "declared"

    forward = type(program).forward
    if forward is not Module.forward and forward is not Predict.forward:
        params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
        kinds = {p.kind for p in params}
        if params and not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            return [InputSpec(p.name, p.default is inspect.Parameter.empty, descs.get(p.name, ""))
                    for p in params], "forward"

    if not preds:
        raise TypeError(
            f"{type(program).__name__} has no predictors and declares no input_fields; "
            "set input_fields = ('name', ...) on the class"
        )
    return [InputSpec(f.name, True, f.desc) for f in preds[0][1].signature.input_fields], "predictor"


# -- what a program's examples hold ---------------------------------------------------------------
@dataclass(frozen=True)
class LabelSpec:
    name: str
    choices: tuple[str, ...] = ()


def program_label_fields(program: Module) -> list[LabelSpec]:
    """The fields a label names: the program's ``label_fields`` when it declares them, else the
    output fields of its last predictor (``named_predictors`` order) less ``reasoning``."""
    declared = getattr(program, "label_fields", None)
    preds = program.named_predictors()
    outputs = {f.name: f for _, p in preds for f in p.signature.output_fields}
    if declared is not None:
        return [LabelSpec(n, tuple(str(c) for c in outputs[n].choices) if n in outputs else ()) for n in declared]
    if not preds:
        return []
    fields = [f for f in preds[-1][1].signature.output_fields if f.name != "reasoning"]
    return [LabelSpec(f.name, tuple(str(c) for c in f.choices)) for f in fields]


def program_fields(program: Module) -> tuple[list[str], list[str]]:
    """(required input fields, label fields) of ``program``: what each of its examples must hold."""
    inputs = [f.name for f in program_input_fields(program)[0] if f.required]
    return inputs, [s.name for s in program_label_fields(program)]
