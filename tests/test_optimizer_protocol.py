"""The optimizer protocol: every BetterTogether step is called alike; the top-level API (FakeLM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tandem
from fakes import Mod3, data, metric, read_x
from tandem.lm import FakeLM
from tandem.optimize import BetterTogether, RandomSearch, SplitPlan
from tandem.optimize.base import CompileResult, Optimizer, StepRecord


def reply(text):
    """Right for x < 10 always; right for the rest only when the prompt has demos."""
    x = read_x(text)
    return f" x is {x}\nY: {x % 3 if (x < 10 or text.count('X: ') > 1) else (x + 1) % 3}"


class Careful(Optimizer):
    """A user's optimizer: rewrites the instructions, reports progress, writes a note to ``out_dir``."""

    def __init__(self):
        self.calls = []

    def compile(self, program, *, trainset, valset, seed=0, progress=None, out_dir=None):
        self.calls.append({"program": program, "trainset": trainset, "valset": valset, "seed": seed,
                           "progress": progress, "out_dir": out_dir})
        if progress:
            progress("rewriting", 1, 1)
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "note.txt").write_text("careful")
        new = program.deepcopy()
        new.solve.instructions = "Give x modulo 3, carefully."
        return CompileResult(new, [StepRecord(0, "careful", inner_score=50.0, detail="rewrote the instructions")],
                             score=50.0)


def run(tmp_path, strategy, **optimizers):
    opt = BetterTogether(metric, strategy=strategy, splits=SplitPlan(10, 20), run_dir=tmp_path / "run",
                         prompt_optimizer=RandomSearch(metric, num_candidates=3), optimizers=optimizers)
    bars = []
    prog = Mod3().set_lm(FakeLM(reply))
    res = opt.compile(prog, trainset=data(30), valset=data(9, 40), seed=1,
                      progress=lambda label, done, total: bars.append(label))
    return opt, res, bars


def test_a_registered_optimizer_is_called_like_p_and_w(tmp_path):
    x = Careful()
    opt, res, bars = run(tmp_path, "p -> x", x=x)
    (call,) = x.calls
    # the same keywords as p and w: the caller's progress, a folder of its own under the run directory
    assert call["progress"] is not None and "rewriting" in bars
    assert call["out_dir"] == tmp_path / "run" / "steps" / "02-x" / "out"
    assert (call["out_dir"] / "note.txt").read_text() == "careful"
    # a step that is not a prompt optimizer starts from the current program: p's demos are kept
    assert call["program"].solve.demos == res.extra["final_program"].solve.demos != []
    assert len(call["trainset"]) == 30 and len(call["valset"]) == 20 and call["seed"] == 101
    # its record appears in the history like p's, and on disk like p's
    assert [(r.index, r.kind, r.status) for r in res.history] == [(0, "start", "ok"), (1, "p", "ok"), (2, "x", "ok")]
    rec = res.history[2]
    assert rec.val_score is not None and rec.inner_score == 50.0 and rec.detail == "rewrote the instructions"
    assert rec.usage["calls"] == 9 and "val_failures" in rec.extra  # its validation, counted as p's is
    steps = tmp_path / "run" / "steps"
    assert (steps / "02-x" / "record.json").exists() and (steps / "02-x" / "program" / "program.json").exists()
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["kind"] for h in hist] == ["start", "p", "x"]
    assert res.extra["final_program"].solve.instructions == "Give x modulo 3, carefully."


def test_p_gets_progress_and_an_out_dir_too(tmp_path):
    seen = []

    class Spy(RandomSearch):
        def compile(self, program, **kw):
            seen.append(kw)
            return super().compile(program, **kw)

    opt = BetterTogether(metric, strategy="p", splits=SplitPlan(10, 20), prompt_optimizer=Spy(metric, num_candidates=2))
    bars = []
    opt.compile(Mod3().set_lm(FakeLM(reply)), trainset=data(30), valset=data(5, 40),
                progress=lambda label, d, t: bars.append(label))
    (kw,) = seen
    assert set(kw) == {"trainset", "valset", "seed", "progress", "out_dir"}
    assert {"bootstrap", "candidates"} <= set(bars)
    # without a run directory, a temporary folder stands in for it
    assert kw["out_dir"].parts[-3:] == ("steps", "01-p", "out") and kw["out_dir"].parent.parent.parent.is_dir()


def test_a_registered_prompt_optimizer_restarts_from_the_original_prompts(tmp_path):
    class PromptOpt(Careful):
        restarts_prompts = True

    x = PromptOpt()
    res = run(tmp_path, "p -> x", x=x)[1]
    (call,) = x.calls
    assert call["program"].solve.demos == [] and call["program"].solve.instructions == "Give x modulo 3."
    assert len(call["trainset"]) == 10 and len(call["valset"]) == 20  # disjoint parts, as p gets
    assert not {e.x for e in call["trainset"]} & {e.x for e in call["valset"]}
    assert res.history[2].kind == "x"


def test_an_optimizer_without_the_protocols_keywords_is_refused_at_once():
    class Old:
        def compile(self, program, *, trainset, valset, seed=0):
            return CompileResult(program, [StepRecord(0, "old")])

    class Kwargs:
        def compile(self, program, **kw):
            return CompileResult(program, [StepRecord(0, "kw")])

    with pytest.raises(TypeError, match=r"optimizer 'old' \(Old\): compile\(\) takes no progress, out_dir"):
        BetterTogether(metric, strategy="old", optimizers={"old": Old()})
    with pytest.raises(TypeError, match="has no compile"):
        BetterTogether(metric, strategy="p", optimizers={"n": object()})
    BetterTogether(metric, strategy="kw", optimizers={"kw": Kwargs()})  # **kw takes them all


# -- the top-level API ----------------------------------------------------------------------------
def test_top_level_api():
    from tandem import BetterTogether as BT, evaluate, get_lm, load
    from tandem.evaluate.evaluate import evaluate as evaluate_fn
    from tandem.lm.registry import get_lm as get_lm_fn
    from tandem.persist import load_program

    assert BT is BetterTogether and evaluate is evaluate_fn and get_lm is get_lm_fn and load is load_program
    assert tandem.RandomSearch is RandomSearch and "BetterTogether" in dir(tandem)
    assert set(tandem.__all__) >= {"BetterTogether", "evaluate", "get_lm", "load"}
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        tandem.nothing  # noqa: B018
    prog = Mod3().set_lm(FakeLM(reply))
    assert tandem.evaluate(prog, data(5), metric, num_threads=2).score == 100.0


def test_import_tandem_stays_light():
    code = ("import sys, tandem; heavy = [m for m in ('vllm', 'torch', 'transformers', 'peft', 'tandem.optimize',"
            " 'tandem.train') if m in sys.modules]; print(heavy); tandem.BetterTogether;"
            " print('tandem.optimize' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"
