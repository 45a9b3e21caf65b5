"""What a request to ``tandem serve`` must hold: the pydantic models that check request bodies
against the program's input fields, validation errors in this API's words, and
``check_feedback`` for ``/v1/feedback`` bodies (labels of ``program_label_fields``).

``tandem.program.fields.program_input_fields(program)`` finds the fields;
``request_models(fields, max_batch_items)`` builds the body models of ``/v1/predict`` and ``/v1/predict_batch`` from them;
``describe_validation_error`` turns one pydantic error into a ``(field, message)`` pair.
"""

import math
from typing import Annotated, Any, Union

try:
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, create_model
    from pydantic_core import PydanticCustomError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"tandem serve needs fastapi and uvicorn: pip install 'tandem[serve]' ({exc})") from exc

from tandem.program.fields import InputSpec, LabelSpec

# The key of each endpoint's body: /v1/predict takes {"inputs": {...}}, /v1/predict_batch {"items": [{...}]}.
BODY_KEYS = {"/v1/predict": "inputs", "/v1/predict_batch": "items"}


def _scalar(value: Any) -> Any:
    """A string or a finite number; anything else is a ``scalar_type`` error."""
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        kind = {bool: "a boolean", type(None): "null", dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
        raise PydanticCustomError("scalar_type", "must be a string or a number, not {kind}", {"kind": kind})
    if isinstance(value, float) and not math.isfinite(value):
        # JSON's NaN, Infinity and -Infinity (and numbers too large for a float, such as 1e999)
        shown = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        raise PydanticCustomError("scalar_type", "must be a finite number, not {value}", {"value": shown})
    return value


# A field value: a string or a finite number (passed to the program as is; prompts show str(value)).
Scalar = Annotated[Union[StrictStr, StrictInt, StrictFloat], BeforeValidator(_scalar)]


def inputs_model(fields: list[InputSpec]) -> type[BaseModel]:
    """A pydantic model of the inputs. Python names are ``f0, f1, ...`` with the field names as
    aliases, so that a field may be called ``json`` or ``model_config`` without clashing."""
    spec = {
        f"f{i}": (Scalar, Field(... if f.required else None, alias=f.name, description=f.desc or None))
        for i, f in enumerate(fields)
    }
    return create_model("ProgramInputs", __config__=ConfigDict(extra="forbid"), **spec)


def request_models(fields: list[InputSpec], max_batch_items: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """The body models of ``/v1/predict`` (``{"inputs": {...}}``) and ``/v1/predict_batch``
    (``{"items": [{...}, ...]}``, 1 to ``max_batch_items`` items)."""
    inputs = inputs_model(fields)
    predict = create_model("PredictRequest", __config__=ConfigDict(extra="forbid"), inputs=(inputs, ...))
    batch = create_model(
        "PredictBatchRequest", __config__=ConfigDict(extra="forbid"),
        items=(list[inputs], Field(..., min_length=1, max_length=max_batch_items)))
    return predict, batch


def expected_value(key: str, fields: list[InputSpec]) -> str:
    """What ``key`` of a body must hold, naming the input fields: ``an object of the input
    fields question, style (optional)``."""
    names = ", ".join(f.name if f.required else f"{f.name} (optional)" for f in fields)
    if key == "items":
        return f"a list of objects of the input fields {names}"
    return f"an object of the input fields {names}"


def describe_validation_error(err: dict, fields: list[InputSpec], key: str | None) -> tuple[str, str]:
    """(field, message) for one pydantic error, in the words of this API.

    ``key`` is the body's top-level key at the endpoint that failed (``inputs`` or ``items``),
    used to say what an empty body should have held."""
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "", f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
    if kind == "missing":
        if not loc:  # no body at all (or JSON null)
            if key is None:
                return "", "the body is empty or null; send a JSON object"
            return "", (f"the body is empty or null; send a JSON object with {key!r}: "
                        f"{expected_value(key, fields)}")
        if len(loc) == 1:
            hint = f": {expected_value(where, fields)}" if where in BODY_KEYS.values() else ""
            return where, f"missing {where!r} in the body{hint}"
        return where, f"missing input field {loc[-1]!r}"
    if kind == "extra_forbidden":
        if len(loc) <= 1:
            return where, f"unknown key {where!r} in the body"
        return where, f"unknown input field {loc[-1]!r}"
    if kind == "scalar_type":
        return where, f"input field {loc[-1]!r} {err.get('msg')}"
    if kind in ("model_attributes_type", "dict_type") and len(loc) <= 1:
        return where, (f"{where} must be a JSON object" if where else
                       "the body must be a JSON object, sent with content-type application/json")
    return where, f"{where or 'body'}: {err.get('msg')}"


# -- feedback ---------------------------------------------------------------------------------
FEEDBACK_KEYS = ("request_id", "label", "score", "comment")


def _label_value(name: str, value: Any, spec: LabelSpec) -> Any:
    try:
        value = _scalar(value)
    except PydanticCustomError as exc:
        raise ValueError(f"label {name!r} {exc.message()}") from None
    if spec.choices:
        match = [c for c in spec.choices if c.lower() == str(value).strip().lower()]
        if not match:
            raise ValueError(f"label {name!r} must be one of {', '.join(spec.choices)}, got {value!r}")
        return match[0]
    return value


def check_feedback(body: Any, labels: list[LabelSpec]) -> dict:
    """A ``/v1/feedback`` body checked: ``{"request_id", "label", "score", "comment"}`` with the label as an
    object of label fields; a ValueError with one line saying what is wrong otherwise.

    ``label``: a string or number (the value of the only label field) or an object of label
    fields; a field with choices takes one of them (case does not matter). ``score``: a number
    from 0 to 1. At least one of the two; ``comment``: optional text."""
    names = ", ".join(s.name for s in labels) or "(none)"
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object with 'request_id' and a 'label' or a 'score'")
    unknown = [k for k in body if k not in FEEDBACK_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in the body; feedback takes {', '.join(FEEDBACK_KEYS)}")
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > 100:
        raise ValueError("'request_id' must be the request id a /v1/predict reply gave (a string)")
    label, score, comment = body.get("label"), body.get("score"), body.get("comment")
    if label is None and score is None:
        raise ValueError(f"give a 'label' (the right value of {names}) or a 'score' (0 to 1), or both")
    by_name = {s.name: s for s in labels}
    if label is not None:
        if isinstance(label, dict):
            if not label:
                raise ValueError(f"'label' is an empty object; name the label fields {names}")
            bad = [k for k in label if k not in by_name]
            if bad:
                raise ValueError(f"unknown label field {bad[0]!r}; the label fields are {names}")
            label = {k: _label_value(k, v, by_name[k]) for k, v in label.items()}
        elif isinstance(label, (str, int, float)) and not isinstance(label, bool):
            if len(labels) != 1:
                raise ValueError(f"'label' must be an object of the label fields {names}")
            label = {labels[0].name: _label_value(labels[0].name, label, labels[0])}
        else:
            kind = {bool: "a boolean", list: "a list"}.get(type(label), type(label).__name__)
            raise ValueError(f"'label' must be a string, a number or an object of the label fields {names}, "
                             f"not {kind}")
    if score is not None:
        if (isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)
                or not 0 <= score <= 1):
            raise ValueError(f"'score' must be a number from 0 to 1, got {json_text(score)}")
        score = float(score)
    if comment is not None and (not isinstance(comment, str) or len(comment) > 2000):
        raise ValueError("'comment' must be text of at most 2000 characters")
    return {"request_id": rid, "label": label, "score": score, "comment": comment}


def json_text(value: Any) -> str:
    import json

    try:
        return json.dumps(value)[:60]
    except (TypeError, ValueError):
        return repr(value)[:60]
