"""Signatures, prompt rendering/parsing, modules, traces: on the scripted FakeLM."""

from __future__ import annotations

import pytest

from tandem import ChainOfThought, InputField, Module, OutputField, ParseError, Predict, Signature, settings, trace
from tandem.lm import FakeLM
from tandem.program.render import NOT_GIVEN, complete_demo, parse_output


class QA(Signature):
    """Answer the question in a few words."""

    question: str = InputField(desc="a trivia question")
    answer: str = OutputField(desc="a short answer")


def test_signature_shorthand_and_class_form():
    s = Signature.parse("context, question -> answer", "Be brief.")
    assert [f.name for f in s.input_fields] == ["context", "question"]
    assert [f.name for f in s.output_fields] == ["answer"]
    assert s.instructions == "Be brief."
    c = QA()
    assert c.instructions == "Answer the question in a few words."
    assert c.input_fields[0].desc == "a trivia question"
    assert Signature.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("bad", ["question answer", "a, a -> b", "q -> ", "1x -> y"])
def test_bad_signatures_are_rejected(bad):
    with pytest.raises(ValueError):
        Signature.parse(bad)


def test_chain_of_thought_adds_reasoning_first():
    cot = ChainOfThought("question -> answer")
    assert [f.name for f in cot.signature.output_fields] == ["reasoning", "answer"]


def test_parse_labels_case_and_markdown_and_first_line():
    sig = ChainOfThought("question -> answer").signature
    out = parse_output(sig, "Reasoning: two plus two\nis four\n**Answer:** 4\nAnswer: 5\nmore text")
    assert out == {"reasoning": "two plus two\nis four", "answer": "4"}


def test_parse_error_names_missing_field():
    sig = ChainOfThought("question -> answer").signature
    with pytest.raises(ParseError) as err:
        parse_output(sig, "Reasoning: nothing else")
    assert err.value.missing == ["answer"]


def test_predict_renders_demos_and_parses():
    lm = FakeLM("Answer: Paris")
    p = Predict(QA, lm=lm)
    p.demos = [{"question": "Capital of Italy?", "answer": "Rome"}]
    pred = p(question="Capital of France?")
    assert pred.answer == "Paris"
    prompt = lm.prompts[0]
    assert "Question: Capital of Italy?" in prompt and "Answer: Rome" in prompt
    assert prompt.index("Capital of Italy") < prompt.index("Capital of France")
    assert prompt.endswith("<|assistant|>Answer:")


def test_a_labelled_demo_shows_the_reasoning_it_lacks_as_not_given():
    lm = FakeLM("Reasoning: far north\nAnswer: Oslo")
    cot = ChainOfThought(QA, lm=lm)
    cot.demos = [
        {"question": "Capital of Italy?", "answer": "Rome"},  # labelled: no reasoning
        {"question": "Capital of Spain?", "reasoning": "it is Madrid", "answer": "Madrid"},  # bootstrapped
    ]
    assert cot(question="Capital of Norway?").answer == "Oslo"
    prompt = lm.prompts[0]
    # every demo reply has the format the model is asked to write: Reasoning first, then Answer
    assert f"<|assistant|>Reasoning: {NOT_GIVEN}\nAnswer: Rome<|end|>" in prompt
    assert "<|assistant|>Reasoning: it is Madrid\nAnswer: Madrid<|end|>" in prompt
    assert cot.demos[0] == {"question": "Capital of Italy?", "answer": "Rome"}  # the demo itself is unchanged
    # a demo with no output field at all is not made into one
    assert complete_demo(cot.signature, {"question": "q"}) == {"question": "q"}


def test_completion_rendering_for_base_models():
    lm = FakeLM("4", chat=False)
    Predict("question -> answer", lm=lm)(question="2+2?")
    assert "<|" not in lm.prompts[0]
    assert lm.prompts[0].rstrip().endswith("Question: 2+2?\nAnswer:")


def test_missing_fields_are_asked_for_and_recorded_in_the_trace():
    def reply(text):
        return " blue" if text.endswith("Answer:") else " it is the sky"

    lm = FakeLM(reply)
    cot = ChainOfThought("question -> answer", lm=lm)
    with trace() as t:
        pred = cot(question="Colour of the sky?")
    assert pred.answer == "blue"
    assert len(lm.prompts) == 2  # the reply lacked Answer:, so it was asked for
    assert t[0].completion == " it is the sky\nAnswer: blue"
    assert t.usage.calls == 2


def test_fill_missing_off_raises_parse_error():
    cot = ChainOfThought("question -> answer", lm=FakeLM(" rambling"), fill_missing=False)
    with pytest.raises(ParseError):
        cot(question="?")


class TwoStep(Module):
    def __init__(self):
        self.hops = [ChainOfThought("question -> query"), ChainOfThought("question -> query")]
        self.answer = Predict("question, notes -> answer")

    def forward(self, question):
        notes = []
        for hop in self.hops:
            notes.append(hop(question=question).query)
        notes.append(self.hops[0](question=question + "!").query)
        return self.answer(question=question, notes=notes)


def _two_step_lm():
    def reply(text):
        if "Notes:" in text:
            return " done"
        return " thinking\nQuery: q"

    return FakeLM(reply)


def test_named_predictors_and_trace_call_indices():
    prog = TwoStep().set_lm(_two_step_lm())
    assert [n for n, _ in prog.named_predictors()] == ["hops[0]", "hops[1]", "answer"]
    with trace() as t:
        out = prog(question="why?")
    assert out.answer == "done"
    assert [(e.predictor, e.call_index) for e in t] == [
        ("hops[0]", 0), ("hops[1]", 0), ("hops[0]", 1), ("answer", 0)
    ]
    assert t[3].inputs["notes"] == ["q", "q", "q"]
    assert "[1] q" in t[3].prompt  # lists are rendered as numbered passages


def test_deepcopy_copies_prompts_but_shares_the_lm():
    lm = _two_step_lm()
    prog = TwoStep().set_lm(lm)
    prog.answer.demos = [{"question": "a", "notes": "b", "answer": "c"}]
    new = prog.deepcopy()
    new.answer.demos.clear()
    new.answer.instructions = "changed"
    assert prog.answer.demos and prog.answer.instructions == ""
    assert new.answer.lm is lm
    assert prog.reset_copy().answer.demos == []


def test_state_round_trip_and_unknown_predictor():
    prog = TwoStep()
    prog.answer.demos = [{"question": "a", "notes": "b", "answer": "c"}]
    prog.hops[1].instructions = "Search wisely."
    state = prog.dump_state()
    other = TwoStep().load_state(state)
    assert other.dump_state() == state
    with pytest.raises(ValueError, match="lacks"):
        TwoStep().load_state({"nope": state["answer"]})


def test_settings_default_lm_and_clear_error_without_one():
    p = Predict("question -> answer")
    with pytest.raises(RuntimeError, match="no LM"):
        p(question="?")
    settings.configure(lm=FakeLM("Answer: ok"))
    assert p(question="?").answer == "ok"


def test_missing_input_is_an_error():
    with pytest.raises(ValueError, match="missing input"):
        Predict("question -> answer", lm=FakeLM("Answer: x"))(wrong="?")


def test_choice_fields_are_listed_and_matched():
    sig = ChainOfThought("x -> label").signature.with_field("label", choices=("cat", "dog"))
    from tandem.program.render import system_message

    assert "one of" not in system_message(sig)  # small models copy the format line verbatim
    assert parse_output(sig, "Reasoning: r\nLabel: Dog.")["label"] == "dog"
    assert parse_output(sig, "Reasoning: r\nLabel: I think it is a cat")["label"] == "cat"
    assert parse_output(sig, "Reasoning: r\nLabel: ...\nLabel: cat")["label"] == "cat"
    with pytest.raises(ParseError, match="not one of"):
        parse_output(sig, "Reasoning: r\nLabel: a bird")
    assert Signature.from_dict(sig.to_dict()) == sig


def test_invalid_choice_is_asked_for_again():
    lm = FakeLM(lambda t: " cat" if t.endswith("Label:") else " hmm\nLabel: ...")
    cot = ChainOfThought("x -> label", lm=lm)
    cot.signature = cot.signature.with_field("label", choices=("cat", "dog"))
    assert cot(x="1").label == "cat"


def test_a_reply_naming_several_choices_is_no_answer():
    sig = Predict("x -> label").signature.with_field("label", choices=("cat", "dog"))
    with pytest.raises(ParseError):
        parse_output(sig, "Label: one of: cat, dog")
