"""Optimizer orchestration on the scripted FakeLM (the real model runs in test_optimize_e2e)."""

from __future__ import annotations

import json

import pytest

from fakes import Mod3, data, fake_trainer, metric, read_x as _x
from tandem import ChainOfThought, Module
from tandem.lm import FakeLM
from tandem.optimize.bootstrap import BootstrapFewShot
from tandem.optimize import (
    BetterTogether, BootstrapFinetune, RandomSearch, SplitPlan, StrategyError, bootstrap, parse_strategy,
)
from tandem.optimize.base import CompileResult, StepRecord
from tandem.persist import ProgramFileError, load_program, read_program_file



def base_reply(text):
    """Right for x < 10 always; right for the rest only when the prompt has demos."""
    x = _x(text)
    has_demos = text.count("X: ") > 1
    y = x % 3 if (x < 10 or has_demos) else (x + 1) % 3
    return f" x is {x}\nY: {y}"


def tuned_reply(text):
    return f" tuned\nY: {_x(text) % 3}"


def make_lm(tmp_path):
    lm = FakeLM(base_reply)
    lm.model_dir = tmp_path
    return lm


def bt(tmp_path, strategy, calls=None, **kw):
    lm = make_lm(tmp_path)
    # teacher_demos="all": this fake LM passes only when a prompt shows demos, and the prompt
    # step chooses labelled ones, which the default teacher drops (test_bootstrap tests that).
    w = BootstrapFinetune(metric, trainer=fake_trainer(calls if calls is not None else []), teacher_demos="all")
    return lm, BetterTogether(metric, strategy=strategy, weight_optimizer=w,
                              splits=SplitPlan(10, 20), **kw)


# -- strategies ---------------------------------------------------------------------------
def test_parse_strategy():
    assert parse_strategy("p -> w -> p", {"p", "w"}) == ["p", "w", "p"]
    assert parse_strategy("w", {"p", "w"}) == ["w"]
    with pytest.raises(StrategyError, match="unknown step 'q'"):
        parse_strategy("p -> q", {"p", "w"})
    with pytest.raises(StrategyError, match="empty step"):
        parse_strategy("p -> -> w", {"p", "w"})
    with pytest.raises(StrategyError):
        parse_strategy("", {"p"})


# -- bootstrapping --------------------------------------------------------------------------
class Twice(Module):
    """Calls one predictor a variable number of times per example."""

    def __init__(self):
        self.step = ChainOfThought("x -> y")
        self.final = ChainOfThought("x -> y")

    def forward(self, x):
        for _ in range(int(x) % 3):
            self.step(x=x)
        return self.final(x=x)


def test_bootstrap_passes_trace_to_metric_and_keys_calls_by_name_and_index():
    seen = []

    def m(ex, pred, trace=None):
        seen.append(len(trace))
        return metric(ex, pred)

    prog = Twice().set_lm(FakeLM(base_reply))
    boot = bootstrap(prog, data(9), m)
    assert sorted(seen) == sorted([1 + i % 3 for i in range(9)])
    assert len(boot.passed) == 9
    for run in boot.passed:
        steps = [e for e in run.entries if e.predictor == "step"]
        assert [e.call_index for e in steps] == list(range(len(steps)))
    assert all(e.predictor == "final" for e in boot.calls("final"))
    assert len(boot.calls("step")) == sum(i % 3 for i in range(9))


def test_failed_examples_are_resampled_with_seeds():
    def reply(text, params):
        x = _x(text)
        if params.temperature > 0 and params.seed == 2:
            return f" sampled\nY: {x % 3}"
        return f" greedy\nY: {(x + 1) % 3 if x % 2 else x % 3}"

    prog = Mod3().set_lm(FakeLM(reply))
    one = bootstrap(prog, data(10), metric, attempts=1)
    three = bootstrap(prog, data(10), metric, attempts=3)
    assert len(one.passed) == 5 and len(three.passed) == 10
    assert sorted(r.attempt for r in three.passed) == [0] * 5 + [2] * 5
    resampled = [r for r in three.passed if r.attempt == 2]
    assert all("sampled" in r.entries[0].completion for r in resampled)
    assert three.usage.calls == 10 + 5 + 5


def test_resamples_run_together_and_the_lowest_passing_seed_wins():
    def reply(text, params):
        x = _x(text)
        if params.temperature > 0:  # both re-samples pass
            return f" sampled {params.seed}\nY: {x % 3}"
        return f" greedy\nY: {(x + 1) % 3 if x % 2 else x % 3}"

    boot = bootstrap(Mod3().set_lm(FakeLM(reply)), data(10), metric, attempts=3)
    assert sorted(r.attempt for r in boot.passed) == [0] * 5 + [1] * 5
    assert all("sampled 1" in r.entries[0].completion for r in boot.passed if r.attempt)
    assert boot.usage.calls == 10 + 5 * 2  # the failed ones' two re-samples ran at once


def test_labeled_teacher_shows_other_examples_and_finds_traces_zero_shot_cannot():
    prog = Mod3().set_lm(FakeLM(base_reply))  # x >= 10 is right only with demos in the prompt
    train = data(10, 10)
    plain = BootstrapFewShot(metric, labeled_teacher=False, attempts=1).run_bootstrap(prog, train)
    assert len(plain.passed) == 0
    fs = BootstrapFewShot(metric, max_labeled_demos=3, attempts=1)
    boot = fs.run_bootstrap(prog, train)
    assert len(boot.passed) == 10
    teachers = fs._labeled_teachers(prog, train)
    for i, ex in enumerate(train):
        demos = teachers(i).solve.demos
        assert len(demos) == 3 and all(d["x"] != ex.x for d in demos)  # never its own label
        assert demos == teachers(i).solve.demos  # seeded: the same teacher every run
    # "shared": one sample (less the example itself), so the engine caches one demo prefix
    fs.teacher_demos = "shared"
    teachers = fs._labeled_teachers(prog, train)
    shown = [frozenset(d["x"] for d in teachers(i).solve.demos) for i in range(len(train))]
    most = max(set(shown), key=shown.count)
    assert len(set(shown)) == 4 and shown.count(most) == len(train) - 3  # the 3 shown get the 4th instead
    assert all(ex.x not in shown[i] for i, ex in enumerate(train))
    # the demos a candidate gets are the student's own traces, not the teacher's prompt
    student = fs.assemble(prog, boot, train)
    assert all(set(d) == {"x", "reasoning", "y"} for d in student.solve.demos)


# -- the prompt step --------------------------------------------------------------------------
def test_random_search_candidates_and_deterministic_choice():
    prog = Mod3().set_lm(FakeLM(base_reply))
    rs = RandomSearch(metric)
    r1 = rs.compile(prog, trainset=data(10), valset=data(20, 10), seed=3)
    r2 = rs.compile(prog, trainset=data(10), valset=data(20, 10), seed=3)
    cands = r1.history[0].extra["candidates"]
    assert [c["candidate"] for c in cands][:3] == ["zero-shot", "labeled", "bootstrapped"]
    assert len(cands) == 9  # zero-shot, labelled, bootstrapped + 6 random (DSPy: num_candidate_programs=6)
    assert cands[0]["demos"] == [0] and all(c["demos"][0] <= 3 for c in cands)
    assert cands[0]["score"] == 0.0  # x >= 10 are wrong without demos
    assert r1.score == 100.0 and r1.program.solve.demos
    assert r1.program.dump_state() == r2.program.dump_state()
    assert prog.solve.demos == []  # the input program is untouched
    # labelled demos come from the whole training set (they need no bootstrap), so
    # that candidate scores too, and wins the tie as the earlier one
    assert cands[1]["score"] == cands[2]["score"] == 100.0
    assert r1.history[0].detail.startswith("chose labeled")
    assert all(set(d) == {"x", "y"} for d in r1.program.solve.demos)
    boot = rs.fewshot.run_bootstrap(prog, data(10))
    boot_demo = rs.fewshot.assemble(prog, boot, data(10)).solve.demos[0]
    assert "reasoning" in boot_demo  # bootstrapped demos carry the model's own reasoning


# -- the weight step ---------------------------------------------------------------------------
def test_weight_step_trains_on_zero_shot_prompts_of_passing_runs(tmp_path):
    calls = []
    prog = Mod3().set_lm(make_lm(tmp_path))
    prog.solve.demos = [{"x": "100", "reasoning": "r", "y": "1"}]  # with demos everything passes
    w = BootstrapFinetune(metric, trainer=fake_trainer(calls))
    res = w.compile(prog, trainset=data(12, 5), valset=data(5, 30), out_dir=tmp_path / "ad")
    rec = res.history[0]
    assert rec.status == "ok" and rec.train_examples == 12 and rec.trainable_params == 1234
    examples = calls[0]
    assert all(ex.prompt.count("X: ") == 1 for ex in examples)  # demos removed
    assert all(ex.prompt.endswith("Reasoning:") for ex in examples)
    assert examples[0].completion.endswith(f"Y: {5 % 3}")
    assert res.program.solve.lm.adapter == str(tmp_path / "ad" / "adapter")


def test_weight_step_with_nothing_to_train(tmp_path):
    lm = FakeLM(lambda t: " no idea\nY: 7")
    lm.model_dir = tmp_path
    calls = []
    res = BootstrapFinetune(metric, trainer=fake_trainer(calls)).compile(
        Mod3().set_lm(lm), trainset=data(6), valset=data(3), out_dir=tmp_path / "ad")
    assert res.history[0].status == "nothing_to_train"
    assert "nothing to train on" in res.history[0].detail
    assert calls == [] and res.program.solve.lm.adapter is None


# -- BetterTogether -----------------------------------------------------------------------------
def test_p_w_p_restarts_prompts_on_new_weights(tmp_path):
    calls = []
    lm, opt = bt(tmp_path, "p -> w -> p", calls)
    lm.adapter_replies[str(tmp_path / "run" / "steps" / "02-w" / "out" / "adapter")] = tuned_reply
    opt.run_dir = tmp_path / "run"
    prog = Mod3().set_lm(lm)
    prog.solve.instructions = "ORIGINAL"
    res = opt.compile(prog, trainset=data(30), valset=data(15, 40), seed=1)
    kinds = [(r.kind, r.status) for r in res.history]
    assert kinds == [("start", "ok"), ("p", "ok"), ("w", "ok"), ("p", "ok")]
    assert all(r.val_score is not None for r in res.history)
    # the weight step trained on traces of the prompt-optimized program
    assert len(calls) == 1 and len(calls[0]) == 30
    final = res.extra["final_program"]
    assert final.solve.lm.adapter is not None  # the last p step ran on the tuned weights
    assert final.solve.instructions == "ORIGINAL"
    assert prog.solve.demos == [] and prog.solve.lm is lm  # caller's program untouched
    assert (tmp_path / "run" / "final" / "program.json").exists()
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["kind"] for h in hist] == ["start", "p", "w", "p"]


class SetInstructions:
    """A registered step that only rewrites the instructions (and records its seeds)."""

    def __init__(self, text, seeds=None):
        self.text, self.seeds = text, [] if seeds is None else seeds

    def compile(self, program, *, trainset, valset, seed=0, progress=None, out_dir=None):
        self.seeds.append(seed)
        new = program.deepcopy()
        new.solve.instructions = self.text
        return CompileResult(new, [StepRecord(0, "set")])


def sloppy_reply(text):
    """Right unless the instructions say to be sloppy."""
    x = _x(text)
    return f" x is {x}\nY: {(x + 1) % 3 if 'Be sloppy.' in text else x % 3}"


def test_the_start_is_step_0_of_the_history_and_of_the_run_dir(tmp_path):
    lm, opt = bt(tmp_path, "p -> w -> p", run_dir=tmp_path / "run")
    valset = data(15, 40)
    res = opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=valset, seed=1)
    start = res.history[0]
    assert (start.index, start.kind, start.status, start.detail) == (0, "start", "ok", "the given program")
    assert start.val_score == 0.0 and start.extra["val_failures"] == {}  # zero-shot, x >= 10 is wrong
    assert start.wall_s > 0 and start.usage["calls"] == len(valset) and start.inner_score is None
    assert [(r.index, r.kind) for r in res.history] == [(0, "start"), (1, "p"), (2, "w"), (3, "p")]
    steps = tmp_path / "run" / "steps"
    assert sorted(d.name for d in steps.iterdir()) == ["00-start", "01-p", "02-w", "03-p"]
    assert all((d / "record.json").exists() and (d / "program" / "program.json").exists() for d in steps.iterdir())
    assert json.loads((steps / "00-start" / "record.json").read_text())["kind"] == "start"
    assert load_program(steps / "00-start" / "program", lms={"fake:fake": lm}).dump_state() == Mod3().dump_state()
    assert (steps / "02-w" / "out" / "adapter").is_dir()  # the weight step's adapter, by history index
    best = res.extra["best_step"]
    assert best >= 1 and res.score == res.history[best].val_score > start.val_score
    assert read_program_file(tmp_path / "run" / "final")["extra"]["best_step"] == best
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["steps"] == ["p", "w", "p"]


def test_steps_that_all_score_below_the_start_return_the_given_program(tmp_path):
    lm = FakeLM(sloppy_reply)
    opt = BetterTogether(metric, strategy="sloppy -> sloppy", splits=SplitPlan(10, 20), run_dir=tmp_path / "run",
                         optimizers={"sloppy": SetInstructions("Be sloppy.")})
    prog = Mod3().set_lm(lm)
    prog.solve.demos = [{"x": "1", "y": "1"}]
    res = opt.compile(prog, trainset=data(30), valset=data(9))
    assert [r.val_score for r in res.history] == [100.0, 0.0, 0.0]
    assert res.extra["best_step"] == 0 and res.score == 100.0
    assert res.program.solve.instructions == "Give x modulo 3." and res.program.dump_state() == prog.dump_state()
    assert res.extra["final_program"].solve.instructions == "Be sloppy."  # the last step's, as before
    final = read_program_file(tmp_path / "run" / "final")
    assert final["extra"]["best_step"] == 0 and final["predictors"]["solve"]["demos"] == prog.solve.demos


def test_a_step_that_ties_the_start_is_returned(tmp_path):
    seeds = []
    opt = BetterTogether(metric, strategy="same -> same", splits=SplitPlan(10, 20),
                         optimizers={"same": SetInstructions("Also fine.", seeds)})
    res = opt.compile(Mod3().set_lm(FakeLM(sloppy_reply)), trainset=data(30), valset=data(9), seed=3)
    assert [r.val_score for r in res.history] == [100.0] * 3
    assert res.extra["best_step"] == 2 and res.program.solve.instructions == "Also fine."
    assert seeds == [300, 301]  # seed * 100 + the position in the strategy, unchanged by step 0
    # w first with no passing trace is reported, not crashed; it keeps the program and its
    # score, so it ties the start, and wins
    lm = FakeLM(lambda t: " ?\nY: 9")
    lm.model_dir = tmp_path
    opt = BetterTogether(metric, strategy="w -> p", splits=SplitPlan(10, 20),
                         weight_optimizer=BootstrapFinetune(metric, trainer=fake_trainer([])))
    res = opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(5))
    assert [r.status for r in res.history] == ["ok", "nothing_to_train", "ok"] and res.extra["best_step"] == 2


def test_selection_uses_the_outer_valset_only(tmp_path):
    lm, opt = bt(tmp_path, "p")
    seen_val = []

    class Spy(RandomSearch):
        def compile(self, program, *, trainset, valset, seed=0, progress=None, out_dir=None):
            seen_val.extend(ex.x for ex in valset)
            return super().compile(program, trainset=trainset, valset=valset, seed=seed)

    opt = BetterTogether(metric, strategy="p", prompt_optimizer=Spy(metric), splits=SplitPlan(10, 20))
    outer = data(15, 100)
    opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=outer)
    assert seen_val and not set(seen_val) & {ex.x for ex in outer}


def test_registered_step_and_a_step_that_raises(tmp_path):
    class Boom:
        def compile(self, program, *, trainset, valset, seed=0, progress=None, out_dir=None):
            raise RuntimeError("exploded")

    class Instr:
        def compile(self, program, *, trainset, valset, seed=0, progress=None, out_dir=None):
            new = program.deepcopy()
            new.solve.instructions = "Be careful."
            return CompileResult(new, [StepRecord(0, "instr")])

    lm = make_lm(tmp_path)
    with pytest.raises(StrategyError, match="unknown step 'instr'"):
        BetterTogether(metric, strategy="instr -> boom")
    opt = BetterTogether(metric, strategy="instr -> boom", splits=SplitPlan(10, 20), run_dir=tmp_path / "run3",
                         optimizers={"instr": Instr(), "boom": Boom()})
    with pytest.raises(RuntimeError, match="exploded"):
        opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(5))
    hist = json.loads((tmp_path / "run3" / "history.json").read_text())
    assert [(h["kind"], h["status"]) for h in hist] == [("start", "ok"), ("instr", "ok"), ("boom", "failed")]
    assert [h["index"] for h in hist] == [0, 1, 2] and "exploded" in hist[2]["detail"]


@pytest.mark.parametrize("killed_in", [1, 2, 3])  # after the start, after step 1, after step 2
def test_resume_continues_after_the_last_finished_step(tmp_path, killed_in):
    lm, opt = bt(tmp_path, "p -> w -> p")
    run = tmp_path / "run"
    lm.adapter_replies[str(run / "steps" / "02-w" / "out" / "adapter")] = tuned_reply
    opt.run_dir = run
    full = opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(15, 40), seed=2)

    # A second run killed during step `killed_in`...
    lm2, opt2 = bt(tmp_path, "p -> w -> p")
    run2 = tmp_path / "run2"
    lm2.adapter_replies[str(run2 / "steps" / "02-w" / "out" / "adapter")] = tuned_reply
    # on resume the adapter is read from the saved program's copy of the folder
    lm2.adapter_replies[str(run2 / "steps" / "02-w" / "program" / "adapters" / "adapter")] = tuned_reply
    opt2.run_dir = run2
    real = opt2._run_step
    state = {"n": 0}

    def dies(kind, *a, **k):
        state["n"] += 1
        if state["n"] == killed_in:
            raise KeyboardInterrupt
        return real(kind, *a, **k)

    opt2._run_step = dies
    with pytest.raises(KeyboardInterrupt):
        opt2.compile(Mod3().set_lm(lm2), trainset=data(30), valset=data(15, 40), seed=2)
    finished = sorted(d.name for d in (run2 / "steps").iterdir() if (d / "record.json").exists())
    assert finished == ["00-start", "01-p", "02-w"][:killed_in]
    # ...and started again with resume: the start is not scored again, only unfinished steps run.
    opt2._run_step = real
    trained, validated = [], []
    opt2.weight_optimizer.trainer = fake_trainer(trained)
    real_validate = opt2._validate
    opt2._validate = lambda prog, vs, label, bar: validated.append(label) or real_validate(prog, vs, label, bar)
    res = opt2.compile(Mod3().set_lm(lm2), trainset=data(30), valset=data(15, 40), seed=2, resume=True)
    assert validated == [f"step {i} validation" for i in range(killed_in, 4)]
    assert len(trained) == (1 if killed_in <= 2 else 0)  # a finished weight step is not redone
    assert [r.index for r in res.history] == [0, 1, 2, 3]
    assert [r.val_score for r in res.history] == [r.val_score for r in full.history]
    assert res.extra["best_step"] == full.extra["best_step"]
    assert res.program.dump_state() == full.program.dump_state()
    assert res.extra["final_program"].solve.lm.adapter.endswith("adapter")


def test_resume_refuses_another_strategy(tmp_path):
    lm, opt = bt(tmp_path, "p", run_dir=tmp_path / "run")
    opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(5))
    lm, opt = bt(tmp_path, "p -> w", run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="another run directory"):
        opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(5), resume=True)
    # a run directory of a tandem before step 0 (steps/00-p was the first step)
    (tmp_path / "old" / "steps" / "00-p").mkdir(parents=True)
    (tmp_path / "old" / "steps" / "00-p" / "record.json").write_text("{}")
    (tmp_path / "old" / "plan.json").write_text(json.dumps({"strategy": "p", "steps": ["p"], "seed": 0}))
    lm, opt = bt(tmp_path, "p", run_dir=tmp_path / "old")
    with pytest.raises(ValueError, match="older tandem"):
        opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(5), resume=True)
    with pytest.raises(StrategyError, match="'start' names step 0"):  # a reserved step name
        BetterTogether(metric, strategy="start", optimizers={"start": SetInstructions("x")})


def test_tiny_training_set_is_a_clear_error(tmp_path):
    lm, opt = bt(tmp_path, "p")
    with pytest.raises(ValueError, match="needs 10 \\+ 20"):
        opt.compile(Mod3().set_lm(lm), trainset=data(12), valset=data(5))
    with pytest.raises(ValueError, match="at least 2"):
        opt.compile(Mod3().set_lm(lm), trainset=data(1), valset=data(5))


# -- program files ---------------------------------------------------------------------------------
def test_program_file_errors(tmp_path):
    prog = Mod3().set_lm(FakeLM(base_reply))
    prog.solve.demos = [{"x": "1", "y": "1"}]
    prog.save(tmp_path / "p")
    doc = read_program_file(tmp_path / "p")
    assert doc["format_version"] == 1 and doc["program"].endswith(":Mod3")
    lms = {"fake:fake": prog.solve.lm}
    again = load_program(tmp_path / "p", lms=lms)
    assert again.dump_state() == prog.dump_state() and again.solve.lm is prog.solve.lm
    (tmp_path / "p" / "program.json").write_text("{not json")
    with pytest.raises(ProgramFileError, match="corrupt"):
        load_program(tmp_path / "p")
    (tmp_path / "p" / "program.json").write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(ProgramFileError, match="upgrade tandem"):
        load_program(tmp_path / "p")
    with pytest.raises(ProgramFileError, match="no such file"):
        load_program(tmp_path / "nothing")
