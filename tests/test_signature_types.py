"""Typed output fields: Literal choices, int/float/bool parsing, saved types (FakeLM)."""

from __future__ import annotations

from typing import Literal

import pytest

from tandem import ChainOfThought, Example, InputField, Module, OutputField, ParseError, Predict, Signature, evaluate
from tandem.lm import FakeLM
from tandem.persist import load_program
from tandem.program.signature import Field, parse_value
from tandem.program.render import parse_output

FORMATS = {
    "fields": lambda v: f"Species: {v['species']}\nPetals: {v['petals']}\nLength: {v['length']}\nSure: {v['sure']}",
    "markers": lambda v: "\n".join(f"[[ ## {k} ## ]]\n{x}\n" for k, x in v.items()) + "[[ ## completed ## ]]",
    "json": lambda v: "{" + ", ".join(f'"{k}": "{x}"' for k, x in v.items()) + "}",
}


class Flower(Signature):
    """Classify the iris flower."""

    measurements: str = InputField()
    species: Literal["setosa", "versicolor", "virginica"] = OutputField()
    petals: int = OutputField(desc="how many")
    length: float = OutputField()
    sure: bool = OutputField()


class Classifier(Module):
    def __init__(self, sig):
        self.classify = Predict(sig)

    def forward(self, measurements):
        return self.classify(measurements=measurements)


def reply_for(fmt, **values):
    """A reply in ``fmt`` without the prefix the prompt writes (the format's first label or key)."""
    full = FORMATS[fmt](values)
    prefix = {"fields": "Species:", "markers": "[[ ## species ## ]]\n", "json": '{"species": "'}[fmt]
    return full[len(prefix):]


def test_class_form_reads_types_and_literal_choices():
    sig = Flower()
    species, petals, length, sure = sig.output_fields
    assert species.choices == ("setosa", "versicolor", "virginica") and species.type == "str"
    assert (petals.type, petals.desc, length.type, sure.type) == ("int", "how many", "float", "bool")
    assert sig.input_fields[0].type == "str"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_parses_typed_values(fmt):
    lm = FakeLM(reply_for(fmt, species="Virginica", petals="42", length="3.5", sure="yes"))
    pred = Predict(Flower, lm=lm, format=fmt)(measurements="5.1, 3.5, 1.4, 0.2")
    assert (pred.species, pred.petals, pred.length, pred.sure) == ("virginica", 42, 3.5, True)
    assert type(pred.petals) is int and type(pred.length) is float and type(pred.sure) is bool


@pytest.mark.parametrize("kind, text, value", [
    ("int", "42", 42), ("int", " -7. ", -7), ("int", "**1,234**", 1234), ("int", "42.0", 42), ("int", "3.5", None),
    ("int", "about 42", None), ("int", "forty", None), ("int", "12345678901234567890", 12345678901234567890),
    ("float", "3.5", 3.5), ("float", "-.5", -0.5), ("float", "2", 2.0), ("float", "1e-3", 0.001),
    ("float", "3.5 cm", None), ("bool", "yes", True), ("bool", "True", True), ("bool", "no", False),
    ("bool", "false.", False), ("bool", "1", True), ("bool", "maybe", None), ("str", " x ", " x "),
])
def test_parse_value(kind, text, value):
    assert parse_value(kind, text) == value


def test_a_bad_value_is_a_parse_error_and_a_counted_parse_failure():
    sig = Signature.parse("question -> answer: int")
    with pytest.raises(ParseError, match="not of type int") as err:
        parse_output(sig, "Answer: many")
    assert err.value.missing == ["answer"]
    # a later occurrence that parses is taken (the label was asked for again)
    assert parse_output(sig, "Answer: many\nAnswer: 7") == {"answer": 7}

    lm = FakeLM(lambda t: " many" if "Q7" in t else " 7")
    prog = Predict("question -> answer: int", lm=lm, fill_missing=False)
    devset = [Example(question=q, answer=7).with_inputs("question") for q in ("Q1", "Q7", "Q3")]
    result = evaluate(prog, devset, lambda ex, pred: ex.answer == pred.answer, num_threads=2)
    assert result.failures == {"parse": 1} and result.correct == 2
    assert "not of type int" in result.records[1].error


def test_shorthand_types_and_choices():
    sig = Signature.parse("q, context -> n: int, label: Literal['a, b', \"c\"], ok: bool, note")
    assert [(f.name, f.type, f.choices) for f in sig.output_fields] == [
        ("n", "int", ()), ("label", "str", ("a, b", "c")), ("ok", "bool", ()), ("note", "str", ())]
    assert parse_output(sig, "N: 3\nLabel: c\nOk: no\nNote: fine") == {"n": 3, "label": "c", "ok": False,
                                                                      "note": "fine"}
    with pytest.raises(TypeError, match="not supported"):
        Signature.parse("q -> a: list")


def test_choices_when_declared_and_typed_choices():
    class Pick(Signature):
        x: str = InputField()
        label: str = OutputField(choices=["cat", "dog"])
        level: int = OutputField(choices=[1, 2, 3])
        grade: Literal[1, 2] = OutputField()
        flag: Literal[True, False] = OutputField()

    label, level, grade, flag = Pick().output_fields
    assert (label.choices, level.choices, level.type) == (("cat", "dog"), ("1", "2", "3"), "int")
    assert (grade.choices, grade.type, flag.choices, flag.type) == (("1", "2"), "int", (), "bool")
    out = parse_output(Pick(), "Label: a dog\nLevel: 2\nGrade: level 1\nFlag: yes")
    assert out == {"label": "dog", "level": 2, "grade": 1, "flag": True}
    with pytest.raises(ParseError, match="not one of"):
        parse_output(Pick(), "Label: dog\nLevel: 4\nGrade: 1\nFlag: yes")
    with pytest.raises(ValueError, match="differ"):
        class Clash(Signature):
            x: str = InputField()
            y: Literal["a", "b"] = OutputField(choices=["a", "c"])

        Clash()
    with pytest.raises(TypeError, match="not supported"):
        class Listy(Signature):
            x: str = InputField()
            y: list[str] = OutputField()

        Listy()
    with pytest.raises(ValueError, match="is not of type int"):
        Field("y", is_input=False, choices=("a",), type="int")


def test_types_round_trip_and_old_files_load(tmp_path):
    sig = ChainOfThought(Flower).signature
    d = sig.to_dict()
    by_name = {f["name"]: f for f in d["fields"]}
    assert by_name["petals"]["type"] == "int" and by_name["sure"]["type"] == "bool"
    assert "type" not in by_name["species"] and "type" not in by_name["reasoning"]  # str is not written
    assert by_name["species"]["choices"] == ["setosa", "versicolor", "virginica"]
    assert Signature.from_dict(d) == sig
    # a signature saved before fields had types: every field is text
    old = {"name": "QA", "fields": [{"name": "q", "desc": "", "input": True, "multiline": False},
                                    {"name": "a", "desc": "", "input": False, "multiline": False}]}
    assert [f.type for f in Signature.from_dict(old).fields] == ["str", "str"]
    # through program.json: the loaded predictor parses into the saved types
    lm = FakeLM(reply_for("fields", species="setosa", petals="5", length="1.5", sure="no"))
    prog = Classifier(Flower).set_lm(lm)
    prog.save(tmp_path / "p")
    again = load_program(tmp_path / "p", program=Classifier("measurements -> species"), lms={"fake:fake": lm})
    assert again.classify.signature == prog.classify.signature
    assert dict(again(measurements="?")) == {"species": "setosa", "petals": 5, "length": 1.5, "sure": False}
