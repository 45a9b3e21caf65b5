"""Nested modules (attributes, lists, dicts) and metric calls, on the scripted FakeLM.

A predictor has one name, the one ``named_predictors()`` gives it in the
top-level program; traces, demos, SFT data and program.json all use it.
"""

from __future__ import annotations

import json
import threading

import pytest

import tandem
from fakes import data, fake_trainer, metric, read_x as _x
from tandem import ChainOfThought, Module, trace
from tandem.evaluate import evaluate
from tandem.lm import FakeLM
from tandem.optimize import BootstrapFinetune, RandomSearch, bootstrap
from tandem.optimize.bootstrap import BootstrapFewShot


def reply(text):
    """Right for x < 10 always; right for the rest only when the prompt has demos."""
    x = _x(text)
    y = x % 3 if (x < 10 or text.count("X: ") > 1) else (x + 1) % 3
    return f" x is {x}\nY: {y}"


def cot():
    return ChainOfThought("x -> y")


class Inner(Module):
    """A list of predictors and one more predictor."""

    def __init__(self):
        self.hops = [cot(), cot()]
        self.p = cot()

    def forward(self, x):
        for hop in self.hops:
            hop(x=x)
        return self.p(x=x)


class Outer(Module):
    """A predictor, a sub-module (called as a module) and a dict of predictors."""

    def __init__(self):
        self.first = cot()
        self.sub = Inner()
        self.tools = {"check": cot()}

    def forward(self, x):
        self.first(x=x)
        out = self.sub(x=x)
        self.tools["check"](x=x)
        return out


class Flat(Module):
    """Outer's predictors as top-level attributes, called in the same order."""

    def __init__(self):
        self.first, self.hop0, self.hop1, self.p, self.check = (cot() for _ in range(5))

    def forward(self, x):
        self.first(x=x)
        self.hop0(x=x)
        self.hop1(x=x)
        out = self.p(x=x)
        self.check(x=x)
        return out


NAMES = ["first", "sub.hops[0]", "sub.hops[1]", "sub.p", "tools['check']"]


def make_lm(tmp_path=None):
    lm = FakeLM(reply)
    lm.model_dir = tmp_path
    return lm


# -- names ---------------------------------------------------------------------------------------
def test_one_name_per_predictor_in_named_predictors_and_traces():
    prog = Outer().set_lm(make_lm())
    assert [n for n, _ in prog.named_predictors()] == NAMES
    with trace() as t:
        assert prog(x="4").y == "1"
    assert [e.predictor for e in t] == NAMES
    assert [e.call_index for e in t] == [0] * 5


def test_a_sub_module_called_on_its_own_is_named_by_the_program_of_its_trace():
    prog = Outer().set_lm(make_lm())
    with trace(prog) as t:
        prog.sub(x="2")
    assert [e.predictor for e in t] == ["sub.hops[0]", "sub.hops[1]", "sub.p"]
    with trace() as t:  # no program: the sub-module is the program, as in its own named_predictors()
        prog.sub(x="2")
    assert [e.predictor for e in t] == [n for n, _ in prog.sub.named_predictors()] == ["hops[0]", "hops[1]", "p"]
    with trace() as t:  # and calling it alone left nothing behind
        prog(x="2")
    assert [e.predictor for e in t] == NAMES
    assert prog.sub.p.name == "self"  # outside any call it is a bare predictor


def test_concurrent_calls_of_a_program_and_its_sub_module_keep_their_names():
    prog = Outer().set_lm(make_lm())
    got, errors = {}, []

    def run(i):
        try:
            with trace() as t:
                (prog if i % 2 else prog.sub)(x=str(i))
            got[i] = [e.predictor for e in t]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert all(got[i] == (NAMES if i % 2 else ["hops[0]", "hops[1]", "p"]) for i in range(16))


class Deep(Module):
    """Outer inside a dict of lists, three modules down."""

    def __init__(self):
        self.experts = {"a": [Outer()]}

    def forward(self, x):
        return self.experts["a"][0](x=x)


def test_names_at_any_depth_of_modules_and_containers():
    prog = Deep().set_lm(make_lm())
    names = [n for n, _ in prog.named_predictors()]
    assert names == [f"experts['a'][0].{n}" for n in NAMES]
    with trace() as t:
        prog(x="5")
    assert [e.predictor for e in t] == names
    assert set(prog.dump_state()) == set(names)


# -- bootstrapping and the prompt step ---------------------------------------------------------------
def test_bootstrap_gives_nested_predictors_as_many_demos_as_the_flat_program():
    fs = BootstrapFewShot(metric, max_bootstrapped_demos=3, max_labeled_demos=3, attempts=1, num_threads=4)
    nested = fs.compile(Outer().set_lm(make_lm()), trainset=data(6)).program
    flat = fs.compile(Flat().set_lm(make_lm()), trainset=data(6)).program
    counts = [len(p.demos) for p in nested.predictors()]
    assert counts == [len(p.demos) for p in flat.predictors()] == [3] * 5
    for name, pred in nested.named_predictors():  # bootstrapped: the model's own reasoning, from traces
        assert all(set(d) == {"x", "reasoning", "y"} for d in pred.demos), name
    assert [d["x"] for d in nested.sub.p.demos] == [d["x"] for d in flat.p.demos]


def test_bootstrap_calls_are_found_under_the_programs_names():
    boot = bootstrap(Outer().set_lm(make_lm()), data(4), metric, num_threads=4)
    assert len(boot.passed) == 4
    for name in NAMES:
        assert [e.inputs["x"] for e in boot.calls(name)] == ["0", "1", "2", "3"], name


def test_random_search_assembles_demos_for_nested_predictors():
    prog = Outer().set_lm(make_lm())
    res = RandomSearch(metric, num_candidates=4, num_threads=4).compile(
        prog, trainset=data(6), valset=data(4, 10), seed=1)
    cands = {c["candidate"]: c for c in res.history[0].extra["candidates"]}
    assert cands["zero-shot"]["demos"] == [0] * 5 and cands["zero-shot"]["score"] == 0.0
    assert cands["bootstrapped"]["demos"] == [3] * 5 and cands["bootstrapped"]["score"] == 100.0
    assert res.score == 100.0
    assert all(p.demos for p in res.program.predictors())
    assert prog.sub.p.demos == []  # the input program is untouched


# -- the weight step ------------------------------------------------------------------------------------
def test_sft_examples_include_nested_predictors_calls(tmp_path):
    prog = Outer().set_lm(make_lm(tmp_path))
    w = BootstrapFinetune(metric, trainer=fake_trainer([]), num_threads=4)
    boot = bootstrap(prog, data(3), metric, num_threads=4)
    groups = w.sft_examples(prog, boot.passed)
    (examples,) = groups.values()  # one LM: one multi-task group
    assert sorted({ex.module for ex in examples}) == sorted(NAMES)
    assert len(examples) == 3 * len(NAMES)
    per_module = BootstrapFinetune(metric, trainer=fake_trainer([]), multitask=False).sft_examples(prog, boot.passed)
    assert sorted(per_module) == sorted(NAMES) and all(len(v) == 3 for v in per_module.values())


def test_weight_step_trains_on_nested_calls_and_tunes_every_predictor(tmp_path):
    calls = []
    prog = Outer().set_lm(make_lm(tmp_path))
    res = BootstrapFinetune(metric, trainer=fake_trainer(calls), num_threads=4).compile(
        prog, trainset=data(4), valset=data(2, 4), out_dir=tmp_path / "ad")
    assert res.history[0].status == "ok" and res.history[0].train_examples == 4 * len(NAMES)
    assert len(calls) == 1 and sorted({ex.module for ex in calls[0]}) == sorted(NAMES)
    assert all(p.lm.adapter == str(tmp_path / "ad" / "adapter") for p in res.program.predictors())


# -- program.json -----------------------------------------------------------------------------------------
def test_save_and_load_round_trip_keeps_nested_demos(tmp_path):
    lm = make_lm()
    fs = BootstrapFewShot(metric, attempts=1, num_threads=4)
    prog = fs.compile(Outer().set_lm(lm), trainset=data(5)).program
    prog.sub.hops[1].instructions = "Second hop."
    prog.save(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "program.json").read_text())
    assert list(saved["predictors"]) == NAMES
    loaded = tandem.load(tmp_path / "p", program=Outer(), lms={"fake:fake": lm})
    assert loaded.dump_state() == prog.dump_state()
    assert loaded.sub.hops[1].instructions == "Second hop." and len(loaded.sub.p.demos) == 3
    assert loaded.sub.p.lm is lm
    with trace() as t:
        loaded(x="20")  # right only with demos in the prompt
    assert [e.predictor for e in t] == NAMES
    assert t[3].prompt.count("X: ") == 4  # sub.p's three demos and the input


# -- metric calls ----------------------------------------------------------------------------------------
def test_a_two_parameter_metric_works_in_evaluation_and_bootstrapping():
    prog = Outer().set_lm(make_lm())
    assert evaluate(prog, data(3), lambda ex, pred: ex.y == pred.y, num_threads=2).score == 100.0
    assert len(bootstrap(prog, data(3), lambda ex, pred: ex.y == pred.y, num_threads=2).passed) == 3


@pytest.mark.parametrize("style", ["three", "varargs"])
def test_the_trace_goes_to_the_metric_in_bootstrapping_and_none_in_evaluation(style):
    seen = []

    def three(ex, pred, trace=None):
        seen.append(trace)
        return ex.y == pred.y

    def varargs(ex, pred, *rest):
        seen.append(rest[0])
        return ex.y == pred.y

    m = three if style == "three" else varargs
    prog = Outer().set_lm(make_lm())
    assert evaluate(prog, data(3), m, num_threads=2).score == 100.0
    assert seen == [None] * 3
    seen.clear()
    boot = bootstrap(prog, data(3), m, num_threads=2)
    assert len(boot.passed) == 3 and len(seen) == 3
    assert sorted([e.predictor for e in t] for t in seen) == [NAMES] * 3


def test_a_type_error_inside_the_metric_is_one_metric_failure_and_one_call():
    calls = []

    def buggy(ex, pred, trace=None):
        calls.append(ex.x)
        return len(5)  # TypeError raised by the metric itself

    prog = Outer().set_lm(make_lm())
    r = evaluate(prog, data(3), buggy, num_threads=2)
    assert r.failures == {"metric": 3} and r.correct == 0
    assert all(rec.error.startswith("TypeError: object of type 'int' has no len()") for rec in r.records)
    assert sorted(calls) == ["0", "1", "2"]  # once per example, never retried without the trace
    calls.clear()
    boot = bootstrap(prog, data(2), buggy, num_threads=2, attempts=1)
    assert boot.passed == [] and [run.failure for run in boot.runs] == ["metric", "metric"]
    assert sorted(calls) == ["0", "1"]


def test_a_metric_whose_helper_misses_a_positional_argument_is_not_called_again():
    calls = []

    def same(a, b):
        return a == b

    def buggy(ex, pred, trace=None):
        calls.append(ex.x)
        return same(pred.y)  # TypeError: same() missing 1 required positional argument: 'b'

    r = evaluate(Outer().set_lm(make_lm()), data(2), buggy, num_threads=2)
    assert r.failures == {"metric": 2} and sorted(calls) == ["0", "1"]
    assert "missing 1 required positional argument" in r.records[0].error


# -- the real embedded model --------------------------------------------------------------------------------
class Measure(Module):
    """A sub-module: a list holding a note-taking predictor, and the Iris classifier."""

    def __init__(self):
        from tandem.tasks.iris import IrisClassifier

        self.notes = [tandem.Predict("petal_length, petal_width -> petal_size", max_tokens=16)]
        self.classify = IrisClassifier().classify  # ChainOfThought, species closed to the three names

    def forward(self, **m):
        self.notes[0](petal_length=m["petal_length"], petal_width=m["petal_width"])
        return self.classify(**m)


class NestedIris(Module):
    """Iris two modules down: the program -> Measure -> (a list's predictor, the classifier)."""

    def __init__(self):
        self.inner = Measure()

    def forward(self, **m):
        return self.inner(**m)


REAL_NAMES = ["inner.notes[0]", "inner.classify"]


@pytest.mark.slow
def test_nested_program_on_the_real_model_bootstraps_saves_and_loads(smollm_vllm, tmp_path):
    """BootstrapFewShot on 8 Iris examples with the embedded model: the nested predictors get demos from
    the model's own traces under the names named_predictors() gives them, and program.json keeps them."""
    from tandem.tasks.iris import iris_metric, load_iris, split_iris

    splits = split_iris(load_iris(), seed=0, sizes=(8, 3, 3))
    program = NestedIris().set_lm(smollm_vllm)
    assert [n for n, _ in program.named_predictors()] == REAL_NAMES

    fs = BootstrapFewShot(iris_metric, max_bootstrapped_demos=2, max_labeled_demos=2, attempts=2, num_threads=8)
    boot = fs.run_bootstrap(program, splits["train"])
    assert boot.passed, boot.summary()  # the model passed at least one example: traces to learn from
    for run in boot.passed:  # every traced call carries the program's name for its predictor
        assert [e.predictor for e in run.entries] == REAL_NAMES, [e.predictor for e in run.entries]
    for name in REAL_NAMES:
        assert boot.calls(name), name

    compiled = fs.assemble(program, boot, splits["train"])  # what compile() does after the bootstrap
    demos = dict((n, p.demos) for n, p in compiled.named_predictors())
    assert list(demos) == REAL_NAMES
    # Bootstrapped demos: the model's own replies, found in the traces under the same names.
    assert demos["inner.notes[0]"] and all(set(d) == {"petal_length", "petal_width", "petal_size"}
                                           for d in demos["inner.notes[0]"])
    assert any("reasoning" in d for d in demos["inner.classify"]), demos["inner.classify"]
    assert demos["inner.notes[0]"][0]["petal_size"] == boot.calls("inner.notes[0]")[0].outputs["petal_size"]

    with trace() as t:
        pred = compiled(**splits["test"][0].inputs())
    assert [e.predictor for e in t] == REAL_NAMES and pred.species

    compiled.save(tmp_path / "saved", seed=0)
    saved = json.loads((tmp_path / "saved" / "program.json").read_text())
    assert list(saved["predictors"]) == REAL_NAMES
    assert [len(saved["predictors"][n]["demos"]) for n in REAL_NAMES] == [len(demos[n]) for n in REAL_NAMES]
    loaded = tandem.load(tmp_path / "saved", program=NestedIris(), lms={"vllm:smollm2-135m": smollm_vllm})
    assert loaded.dump_state() == compiled.dump_state()
    assert loaded.inner.classify.demos == demos["inner.classify"]
    ex = splits["test"][1]
    with trace() as t:
        again = loaded(**ex.inputs())
    assert [e.predictor for e in t] == REAL_NAMES
    assert dict(again) == dict(compiled(**ex.inputs()))  # greedy: the same prompts give the same replies
