"""Prompt formats: the markers format's prompts and parsing, choosing a format, saving it (FakeLM)."""

from __future__ import annotations

import pytest

import tandem
from tandem import ChainOfThought, Module, ParseError, Predict
from tandem.lm import FakeLM
from tandem.program.formats import FORMATS, get_format
from tandem.program.markers import NOT_SUPPLIED, parse_output
from tandem.program.predict import hint_override


def cot_sig():
    sig = ChainOfThought("question -> answer").signature
    return sig.with_field("answer", choices=("yes", "no"))


def test_markers_parse_fields_case_spacing_and_stop_at_completed():
    out = parse_output(cot_sig(), "[[ ## reasoning ## ]]\nit rains\n\n[[## Answer ##]]\n Yes.\n\n"
                                  "[[ ## completed ## ]]\n[[ ## answer ## ]]\nno")
    assert out == {"reasoning": "it rains", "answer": "yes"}


def test_markers_missing_or_invalid_field_is_a_parse_error():
    with pytest.raises(ParseError) as err:
        parse_output(cot_sig(), "[[ ## reasoning ## ]]\nhmm")
    assert err.value.missing == ["answer"]
    with pytest.raises(ParseError, match="not one of"):
        parse_output(cot_sig(), "[[ ## reasoning ## ]]\nhmm\n[[ ## answer ## ]]\nmaybe")


def test_markers_prompt_demos_hint_and_reply_prefix():
    lm = FakeLM("it is\n\n[[ ## answer ## ]]\nno\n\n[[ ## completed ## ]]")
    cot = ChainOfThought("question -> answer", lm=lm, format="markers")
    cot.demos = [{"question": "Is ice cold?", "answer": "yes"}]  # labelled: no reasoning
    assert cot(question="Is fire cold?").answer == "no"
    prompt = lm.prompts[0]
    assert f"[[ ## reasoning ## ]]\n{NOT_SUPPLIED}\n\n[[ ## answer ## ]]\nyes\n\n[[ ## completed ## ]]" in prompt
    assert "[[ ## question ## ]]\nIs fire cold?" in prompt
    assert prompt.endswith("[[ ## reasoning ## ]]\n")  # the reply starts at the first output marker
    with hint_override({"answer": "no"}):
        hinted = cot.request({"question": "Is fire cold?"}, lm).text
    assert "[[ ## answer ## ]]\nno\n" in hinted.split("<|user|>")[0]  # the gold answer fills the structure's slot


def test_markers_fill_missing_asks_with_the_fields_marker():
    lm = FakeLM(lambda p: "no" if p.endswith("[[ ## answer ## ]]\n") else "thinking")
    cot = ChainOfThought("question -> answer", lm=lm, format="markers")
    assert cot(question="q?").answer == "no"


def test_format_is_chosen_per_program_saved_and_loaded(tmp_path):
    class Two(Module):
        def __init__(self):
            self.a = Predict("x -> y")
            self.b = Predict("y -> z", format="markers")

    prog = Two()
    assert (prog.a.format.name, prog.b.format.name) == ("fields", "markers")
    prog.set_format("markers")
    assert {p.format.name for p in prog.predictors()} == {"markers"}
    assert prog.deepcopy().a.format is FORMATS["markers"]
    state = prog.dump_state()
    assert state["a"]["format"] == "markers"
    fresh = Two().load_state(state)
    assert fresh.a.format.name == "markers"
    lm = FakeLM("Y: 1")
    prog.set_lm(lm).save(tmp_path / "p")
    assert tandem.load(tmp_path / "p", program=Two(), lms={"fake:fake": lm}).a.format.name == "markers"


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown prompt format 'chat'"):
        Predict("x -> y", format="chat")
    with pytest.raises(ValueError, match="unknown prompt format"):
        Predict("x -> y").load_state({**Predict("x -> y").dump_state(), "format": "nope"})
    assert get_format(None) is FORMATS["fields"]  # None: the default format


def test_json_format_prompt_parse_and_broken_objects():
    from tandem.program.json_format import parse_output as parse_json

    lm = FakeLM('it burns", "answer": "no"}')
    cot = ChainOfThought("question -> answer", lm=lm, format="json")
    cot.demos = [{"question": "Is ice cold?", "answer": "yes"}]
    assert cot(question="Is fire cold?").answer == "no"
    prompt = lm.prompts[0]
    assert '{"reasoning": "Not given for this example.", "answer": "yes"}' in prompt
    assert prompt.endswith('{"reasoning": "')
    sig = cot_sig()
    assert parse_json(sig, '{"reasoning": "a \\"b\\"", "answer": "No."} trailing') == {"reasoning": 'a "b"', "answer": "no"}
    assert parse_json(sig, '{"reasoning": "cut short", "answer": "yes') == {"reasoning": "cut short", "answer": "yes"}
    with pytest.raises(ParseError):
        parse_json(sig, '{"reasoning": "no answer"}')


def test_json_fill_missing_continues_the_object():
    lm = FakeLM(lambda p: 'no"}' if p.endswith('", "answer": "') else "thinking")
    cot = ChainOfThought("question -> answer", lm=lm, format="json")
    assert cot(question="q?").answer == "no"
