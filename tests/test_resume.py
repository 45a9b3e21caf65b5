"""Resume checks the whole configuration (issue #16, D2): steps are reused only under the same settings."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fakes import Mod3, data, fake_trainer, metric
from tandem.experiments.config import load_config
from tandem.experiments.run import run_cell
from tandem.lm import FakeLM
from tandem.optimize import BetterTogether, BootstrapFinetune, SplitPlan
from tandem.optimize.plan import ResumeMismatch


def _reply(text: str) -> str:
    """Zero-shot 'setosa'; with demos in the prompt, a petal-length rule (as tests/test_experiments.py)."""
    pl = float(re.findall(r"Petal Length: ([\d.]+)", text)[-1])
    rule = "setosa" if pl < 2.5 else ("versicolor" if pl < 4.85 else "virginica")
    return f" petal length {pl}\nSpecies: {rule if text.count('Petal Length:') > 1 else 'setosa'}"


class _AnyAdapter(dict):
    def get(self, key, default=None):
        return _reply


def make_lm(tmp_path: Path) -> FakeLM:
    lm = FakeLM(_reply)
    lm.model_dir = tmp_path  # allows weight steps
    lm.adapter_replies = _AnyAdapter()
    return lm


BASE = ["sizes=30,15,15", "threads=8", "num_candidates=3"]


def cfg(*changes: str):
    return load_config(None, [*BASE, *changes], task="iris", strategy="p -> w")


def killed_run(tmp_path: Path) -> Path:
    """A finished p -> w run with step 2 (w) and results.json removed, as if killed during step 2."""
    run = tmp_path / "run"
    run_cell(cfg(), make_lm(tmp_path), run_dir=run, trainer=fake_trainer([]))
    (run / "results.json").unlink()
    shutil.rmtree(run / "steps" / "02-w")
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("changes", [[], ["threads=4"]], ids=["same", "other-threads"])
def test_resume_with_the_same_settings_reuses_the_finished_steps_and_says_which(tmp_path, changes):
    run = killed_run(tmp_path)
    lm, trained, notes = make_lm(tmp_path), [], []
    res = run_cell(cfg(*changes), lm, run_dir=run, trainer=fake_trainer(trained), info=notes.append)
    assert res["reused_steps"] == [0, 1]  # the start and step 1 (p) come from the run directory
    assert len(trained) == 1  # step 2 (w) ran again
    said = [n for n in notes if "reused" in n]
    assert len(said) == 1 and "start" in said[0] and "1 (p)" in said[0] and "2 (w)" in said[0], notes
    assert json.loads((run / "config.json").read_text())["threads"] == (4 if changes else 8)


@pytest.mark.parametrize("change, named", [
    ("num_candidates=2", "p.num_candidates: was 3, now 2"),
    ("sizes=20,15,15", "sizes.train: was 30, now 20"),
    ("lora.rank=8", "w.lora.rank: was 32, now 8"),
    ("seed=1", "seed: was 0, now 1"),
])
def test_resume_with_other_settings_is_refused_naming_them_and_nothing_is_written(tmp_path, change, named):
    run = killed_run(tmp_path)
    before = snapshot(run)
    lm, trained = make_lm(tmp_path), []
    with pytest.raises(ResumeMismatch) as err:
        run_cell(cfg(change), lm, run_dir=run, trainer=fake_trainer(trained))
    msg = str(err.value)
    assert "\n" not in msg and named in msg and "cannot resume" in msg, msg
    assert not lm.prompts and not trained  # refused before anything ran
    assert snapshot(run) == before  # config.json, plan.json and the steps untouched


def test_a_fresh_start_in_a_run_directory_does_not_leave_steps_a_later_resume_would_reuse(tmp_path):
    run = tmp_path / "run"
    run_cell(cfg(), make_lm(tmp_path), run_dir=run, trainer=fake_trainer([]))  # steps 0-2 of candidates=3

    class Killed(list):  # the same trainer (a trainer is a setting too), killed as it finishes
        def append(self, item):
            raise RuntimeError("killed in the weight step")

    # A step's own checkpoint (as an RL step leaves one) is dropped too: a fresh run never continues it.
    ckpt = run / "steps" / "02-w" / "out" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    # Started over with other settings (no resume) and killed in step 2: 02-w is the first run's.
    with pytest.raises(RuntimeError, match="killed"):
        run_cell(cfg("num_candidates=2"), make_lm(tmp_path), run_dir=run, trainer=fake_trainer(Killed()),
                 resume=False)
    assert not ckpt.exists()
    trained: list = []
    res = run_cell(cfg("num_candidates=2"), make_lm(tmp_path), run_dir=run, trainer=fake_trainer(trained))
    assert res["reused_steps"] == [0, 1] and len(trained) == 1  # the first run's step 2 was not reused


def test_a_run_directory_of_an_older_tandem_is_refused(tmp_path):
    run = killed_run(tmp_path)
    plan = json.loads((run / "plan.json").read_text())
    old = {k: plan[k] for k in ("strategy", "steps", "seed", "splits", "start_step")}  # no settings recorded
    (run / "plan.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="older tandem"):
        run_cell(cfg(), make_lm(tmp_path), run_dir=run, trainer=fake_trainer([]))


# -- BetterTogether on its own ---------------------------------------------------------------
def _bt(tmp_path, run, **w):
    lm = FakeLM(lambda text: " x\nY: 0")
    lm.model_dir = tmp_path
    weight = BootstrapFinetune(metric, trainer=fake_trainer([]), teacher_demos="all", **w)
    return lm, BetterTogether(metric, strategy="p -> w", weight_optimizer=weight, splits=SplitPlan(10, 20),
                              run_dir=run, num_threads=4)


def test_better_together_compares_its_optimizers_data_and_program(tmp_path):
    run = tmp_path / "run"
    lm, opt = _bt(tmp_path, run)
    opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(5, 40))
    (run / "steps" / "02-w" / "record.json").unlink()
    notes: list = []
    lm, opt = _bt(tmp_path, run)
    opt.num_threads = 16  # does not change a result
    res = opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(5, 40), resume=True, info=notes.append)
    assert res.extra["reused_steps"] == [0, 1] and any("reused" in n for n in notes)

    cases = [
        (dict(w={"temperature": 0.3}), "w.temperature: was 0.7, now 0.3"),
        (dict(trainset=data(30, 1)), "trainset: was 30 examples"),
        (dict(valset=data(6, 40)), "valset: was 5 examples"),
        (dict(program=Mod3().set_format("markers")), "program.solve.format: was fields, now markers"),
        (dict(settings={"task": "other"}), "task: was unset, now other"),
    ]
    for change, named in cases:
        (run / "steps" / "02-w" / "record.json").unlink(missing_ok=True)
        before = snapshot(run)
        lm, opt = _bt(tmp_path, run, **change.get("w", {}))
        program = change.get("program", Mod3()).set_lm(lm)
        with pytest.raises(ResumeMismatch, match=re.escape(named)):
            opt.compile(program, trainset=change.get("trainset", data(30)), valset=change.get("valset", data(5, 40)),
                        resume=True, settings=change.get("settings"))
        assert snapshot(run) == before and not lm.prompts
