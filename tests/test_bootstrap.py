"""Bootstrapping for the weight step: several samples, several traces, hints, balance (FakeLM)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from fakes import Mod3, data, fake_trainer, metric, read_x as _x
from tandem import Example
from tandem.lm import FakeLM
from tandem.optimize import BootstrapFinetune, bootstrap
from tandem.optimize.balance import answer_key, balance_runs, is_categorical
from tandem.program.render import build_prompt



def greedy_wrong_samples_right(text, params):
    """Greedy always wrong; every sample right, with a reply that names its seed."""
    x = _x(text)
    if params.temperature > 0:
        return f" sample {params.seed}\nY: {x % 3}"
    return f" greedy\nY: {(x + 1) % 3}"


def test_samples_stop_once_enough_distinct_traces_pass():
    lm = FakeLM(greedy_wrong_samples_right)
    boot = bootstrap(Mod3().set_lm(lm), data(4), metric, attempts=9, traces_per_example=2, seed=5)
    assert boot.sources == {"greedy": 0, "sampled": 4, "hint": 0, "none": 0}
    assert len(boot.passed) == 8  # two per example
    # greedy, then one wave of 2 samples: 3 runs per example, not 9
    assert boot.attempts == 12 and boot.usage.calls == 12
    for ex in data(4):
        kept = [r for r in boot.passed if r.example["x"] == ex["x"]]
        assert [r.entries[0].completion.split("\n")[0] for r in kept] == [" sample 5001", " sample 5002"]


def test_duplicate_passing_samples_count_once():
    def reply(text, params):  # every run gives the same right reply
        return f" same\nY: {_x(text) % 3}"

    boot = bootstrap(Mod3().set_lm(FakeLM(reply)), data(3), metric, attempts=5, traces_per_example=3)
    # greedy passes, then samples repeat it: all 5 attempts spent, 1 distinct trace kept
    assert len(boot.passed) == 3 and boot.attempts == 15
    assert boot.sources["greedy"] == 3


def test_hint_rationalizes_examples_no_sample_passes():
    def reply(text, params):
        x = _x(text)
        m = re.search(r"format:\nReasoning: [^\n]*\nY: (\d)", text)  # the hint fills Y's format line
        if m and x == 3:  # the model gives away that it saw the hint
            return f" the hint says {m.group(1)}\nY: {m.group(1)}"
        if m:
            return f" because {x} mod 3\nY: {m.group(1)}"
        return f" guess\nY: {(x + 1) % 3 if x % 2 else x % 3}"

    prog = Mod3().set_lm(FakeLM(reply))
    boot = bootstrap(prog, data(6), metric, attempts=2, hint_attempts=2)
    assert boot.sources == {"greedy": 3, "sampled": 0, "hint": 2, "none": 1}
    hinted = [r for r in boot.passed if r.hinted]
    assert sorted(r.example["x"] for r in hinted) == ["1", "5"]
    for r in hinted:  # the trace records the inputs, never the hint
        assert r.entries[0].inputs == {"x": r.example["x"]}
        assert f"Y: {r.example['y']}<" in r.entries[0].prompt
    failed = [r for r in boot.runs if not r.passed]
    assert [(r.example["x"], r.failure, r.hinted) for r in failed] == [("3", "hint_leak", True)]


def test_a_hint_fills_the_format_line_of_a_field_the_predictor_writes_and_names_the_rest():
    sig = Mod3().solve.signature
    plain = build_prompt(sig, [], {"x": "4"})
    hinted = build_prompt(sig, [], {"x": "4"}, hint={"y": "1", "kind": "mod"})
    system, user = hinted.messages[0][1], hinted.messages[-1][1]
    assert "\nY: 1" in system and "\nY: 1" not in plain.messages[0][1]
    assert user == "X: 4\n\nHint: the correct Kind is mod."
    assert build_prompt(sig, [], {"x": "4"}, hint={}) == plain


@pytest.mark.parametrize("kw, word", [
    ({"attempts": 0}, "attempts"), ({"traces_per_example": 0}, "traces_per_example"),
    ({"temperature": -0.1}, "temperature"), ({"hint_attempts": -1}, "hint_attempts"),
])
def test_bad_bootstrap_settings_name_the_setting(kw, word):
    prog = Mod3().set_lm(FakeLM(" a\nY: 0"))
    with pytest.raises(ValueError, match=word):
        bootstrap(prog, data(2), metric, **kw)
    with pytest.raises(ValueError, match=word):
        BootstrapFinetune(metric, **kw)
    with pytest.raises(ValueError, match="balance"):
        BootstrapFinetune(metric, balance="yes")


def test_a_metric_returning_a_non_number_is_a_counted_failure():
    prog = Mod3().set_lm(FakeLM(" a\nY: 0"))
    boot = bootstrap(prog, data(3), lambda ex, pred, trace=None: "yes", attempts=2)
    assert len(boot.passed) == 0 and boot.sources["none"] == 3
    assert all(r.failure == "metric" for r in boot.runs)


class _Run:
    def __init__(self, example):
        self.example = example


def test_balance_repeats_rarer_answers_to_the_most_common_count():
    train = data(30)
    assert is_categorical(train)  # 3 answers in 30 examples
    runs = [_Run(ex) for ex in train if ex["y"] == "0"] + [_Run(train[1]), _Run(train[4]), _Run(train[2])]
    out, record = balance_runs(runs, train)
    assert record["balanced"] and record["before"] == {"y=0": 10, "y=1": 2, "y=2": 1}
    assert record["after"] == {"y=0": 10, "y=1": 10, "y=2": 10}
    assert Counter(answer_key(r.example) for r in out) == Counter({"y=0": 10, "y=1": 10, "y=2": 10})
    same, rec = balance_runs(runs, train, balance=False)
    assert same == runs and not rec["balanced"]


def test_distinct_answers_are_not_balanced_by_default():
    train = [Example(x=str(i), y=str(i)).with_inputs("x") for i in range(30)]
    assert not is_categorical(train)
    runs = [_Run(ex) for ex in train[:5]]
    out, record = balance_runs(runs, train)
    assert out == runs and not record["balanced"]


def test_weight_step_records_sources_and_answer_balance(tmp_path):
    def reply(text, params):
        m = re.search(r"format:\nReasoning: [^\n]*\nY: (\d)", text)
        if m:
            return f" because\nY: {m.group(1)}"
        return " zero\nY: 0"  # answers one class: only y=0 passes without the hint

    lm = FakeLM(reply)
    lm.model_dir = tmp_path
    calls = []
    step = BootstrapFinetune(metric, trainer=fake_trainer(calls), attempts=1, hint_attempts=1)
    res = step.compile(Mod3().set_lm(lm), trainset=data(12), valset=data(6, 100), out_dir=tmp_path / "a")
    rec = res.history[-1]
    assert rec.extra["bootstrap"]["greedy"] == 4 and rec.extra["bootstrap"]["hint"] == 8
    assert rec.extra["answers"]["after"] == {"y=0": 4, "y=1": 4, "y=2": 4}
    assert len(calls[0]) == 12
    assert all(re.search(r"format:\nReasoning: [^\n]*\nY: \.\.\.", ex.prompt) for ex in calls[0])
    assert "4 greedily" in rec.detail and "8 with the answer as a hint" in rec.detail


def test_the_weight_steps_teacher_drops_labelled_demos_and_the_sft_set_is_saved(tmp_path):
    import json

    seen = []

    def reply(text, params):
        seen.append(text)
        return " because\nY: 0"

    lm = FakeLM(reply)
    lm.model_dir = tmp_path
    prog = Mod3().set_lm(lm)
    pred = prog.predictors()[0]
    pred.demos = [{"x": "1", "y": "1"},                                  # labelled: no reasoning
                  {"x": "77", "reasoning": "Not given for this example.", "y": "2"},  # copied placeholder
                  {"x": "2", "reasoning": "two mod three", "y": "2"}]    # complete (bootstrapped)
    step = BootstrapFinetune(metric, trainer=fake_trainer([]), attempts=1, hint_attempts=0)
    step.compile(prog, trainset=data(6), valset=data(3, 100), out_dir=tmp_path / "a")
    teacher_prompts = seen[:6]
    assert all("two mod three" in t and "Not given" not in t and "X: 77" not in t for t in teacher_prompts)
    rows = [json.loads(line) for line in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    assert rows and all(r["completion"].endswith("Y: 0") and "two mod three" not in r["prompt"] for r in rows)
    assert pred.demos[0] == {"x": "1", "y": "1"}  # the incoming program is unchanged

    seen.clear()
    BootstrapFinetune(metric, trainer=fake_trainer([]), attempts=1, hint_attempts=0, teacher_demos="all").compile(
        prog, trainset=data(6), valset=data(3, 100), out_dir=tmp_path / "b")
    assert all("Not given" in t for t in seen[:6])
    with pytest.raises(ValueError, match="teacher_demos must be one of"):
        BootstrapFinetune(metric, teacher_demos="some")


def test_one_thread_runs_a_wave_of_samples_one_after_another():
    """num_threads=1: one request at a time (batches of 1), so the engine sees the same batches every run."""
    lm = FakeLM(greedy_wrong_samples_right)
    one = bootstrap(Mod3().set_lm(lm), data(3), metric, attempts=9, traces_per_example=2, seed=5, num_threads=1)
    assert one.attempts == 9 and lm.batches == [1] * 9  # greedy, then the wave of 2, for each of 3 examples
    lm = FakeLM(greedy_wrong_samples_right)
    many = bootstrap(Mod3().set_lm(lm), data(3), metric, attempts=9, traces_per_example=2, seed=5)
    assert max(lm.batches) > 1  # the default: examples and a wave's samples at once
    assert [r.entries[0].completion for r in one.runs] == [r.entries[0].completion for r in many.runs]
