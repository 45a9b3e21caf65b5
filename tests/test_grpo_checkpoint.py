"""The RL step's checkpoints: a run killed with SIGKILL and resumed ends as an uninterrupted one.

The real check is ``test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result``:
a child process runs the RL step on the tiny random model (transformers
backend, call cache off) and kills itself with SIGKILL in the middle of its
second checkpoint, after the sync that removed the first checkpoint's
served LoRA folder; the parent resumes with the same ``out_dir`` and
compares with an uninterrupted run: the same reward history and the same
final LoRA weights (max abs difference <= 1e-6; they were bitwise equal on this CPU).
Without the restored AdamW state they differ by about 2e-4.
The FakeLM tests check the bookkeeping around it quickly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fakes import Mod3, data, metric, read_x
from tandem.lm import FakeLM
from tandem.optimize import GRPO, BetterTogether, GRPOSettings
from tandem.optimize import grpo_checkpoint as checkpoint
from tandem.train import LoRAConfig
from tandem.train.grpo import UpdateStats

# what must come out the same, per RL step (times differ)
SAME = ("step", "examples", "mean_reward", "reward_std", "reward_min", "reward_max", "rollouts", "groups",
        "zero_variance_groups", "failures", "items", "loss", "trained_tokens", "usage")


def same_part(history: list[dict]) -> list[dict]:
    return [{k: h.get(k) for k in SAME} for h in history]


# -- the tiny model, killed for real ---------------------------------------------------------
def length_metric(ex, pred, trace=None):
    """Partial credit that varies between samples of the random model."""
    return (len(pred.reasoning) + len(pred.y)) % 7 / 6


def tiny_settings(method: str = "lora") -> GRPOSettings:
    return GRPOSettings(steps=3, batch_size=2, rollouts=2, max_tokens=4, temperature=1.0, micro_batch=4,
                        checkpoint_every=2, method=method, learning_rate=1e-4,
                        lora=LoRAConfig(rank=4, alpha=8, device="cpu", bf16=False))


def tiny_run(model_dir, out_dir, progress=None, method: str = "lora"):
    from tandem.lm.hf import HFLM

    prog = Mod3().set_lm(HFLM(model_dir))
    return GRPO(length_metric, tiny_settings(method)).compile(prog, trainset=data(4), seed=0, out_dir=out_dir,
                                                              progress=progress)


def child(model_dir: str, out_dir: str, method: str) -> None:
    """The run to kill: SIGKILL right after the second checkpoint wrote its LoRA, before it is complete."""
    from tandem.train.grpo import Policy

    real, calls = Policy.save_state, []

    def save_state(self, path):
        out = real(self, path)
        calls.append(path)
        if len(calls) == 2:  # the checkpoint after RL step 3 (the first was after step 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Policy.save_state = save_state
    tiny_run(model_dir, out_dir, method=method)


def adapter_weights(folder: Path) -> dict:
    """The trained weights: a LoRA's, or a whole checkpoint's (method "full")."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path, method):
    killed = tmp_path / "killed"
    code = f"import test_grpo_checkpoint as t; t.child({str(tiny_model_dir)!r}, {str(killed)!r}, {method!r})"
    env = {**os.environ, "TANDEM_CACHE": "0", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                                os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # what the kill left: the complete checkpoint after step 2, a half-written one, and the LoRA of step 3
    # served (step 2's folder already removed by that sync)
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and (killed / "checkpoint.partial").exists()
    assert not (killed / "checkpoint.partial" / "state.json").exists()
    assert sorted(p.name for p in (killed / "adapters").iterdir()) == ["adapter-step003"]

    seen = []
    resumed = tiny_run(tiny_model_dir, killed, progress=lambda label, done, total: seen.append((label, done, total)),
                       method=method)
    full = tiny_run(tiny_model_dir, tmp_path / "full", method=method)

    a, b = resumed.history[-1], full.history[-1]
    assert a.status == b.status == "ok"
    assert a.extra["resumed_after_step"] == 2 and b.extra["resumed_after_step"] is None
    assert seen[0] == ("rl steps", 2, 3) and seen[-1] == ("rl steps", 3, 3)  # only step 3 ran again
    assert same_part(a.extra["steps"]) == same_part(b.extra["steps"])
    assert any(h["updates"] for h in b.extra["steps"])  # something was trained: the comparison means something
    assert a.usage == b.usage and a.train_examples == b.train_examples
    lm_a, lm_b = resumed.program.solve.lm, full.program.solve.lm
    assert lm_a.adapter.name == lm_b.adapter.name == "adapter-step003"
    wa, wb = adapter_weights(lm_a.adapter), adapter_weights(lm_b.adapter)
    assert wa.keys() == wb.keys() and wa
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    # the leftovers are gone: one complete checkpoint (after the last step), one served LoRA
    assert not (killed / "checkpoint.partial").exists()
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["step"] == 3
    assert sorted(p.name for p in (killed / "adapters").iterdir()) == ["adapter-step003"]
    hist = json.loads((killed / "rl_history.json").read_text())["steps"]
    assert same_part(hist) == same_part(b.extra["steps"])


# -- the bookkeeping, on the FakeLM ----------------------------------------------------------------
class StatePolicy:
    """A Policy stand-in whose state (the updates so far) is saved and loaded like the real one's."""

    def __init__(self, model_dir, lora, **kw):
        self.n, self.trainable_params, self.loaded = 0, 10, False

    def update(self, items):
        self.n += 1
        self.loaded = True
        return UpdateStats(len(items), 0, 10 * len(items), 1.0 / self.n, None, 0.0, 1.0, 0.01)

    def save(self, out_dir, training=None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps({"n": self.n}))
        return out

    def save_state(self, out_dir):
        self.save(Path(out_dir) / "adapter")
        return Path(out_dir)

    def load_state(self, state_dir):
        self.n = json.loads((Path(state_dir) / "adapter" / "adapter_config.json").read_text())["n"]
        self.loaded = True


def seeded_reply(text, params):
    x, seed = read_x(text), params.seed or 0
    return f" x is {x}\nY: {x % 3 if seed % 2 else (x + 1) % 3}"


def fake_program(tmp_path):
    lm = FakeLM(seeded_reply)
    lm.model_dir = tmp_path
    return Mod3().set_lm(lm)


class Stop(Exception):
    pass


def stop_after(k):
    def progress(label, done, total, status=None):
        if label == "rl steps" and done == k and status:
            raise Stop

    return progress


def test_a_stopped_run_resumes_from_its_checkpoint_with_the_same_history(tmp_path):
    rl = GRPO(metric, steps=5, batch_size=2, rollouts=4, checkpoint_every=2, policy_factory=StatePolicy)
    full = rl.compile(fake_program(tmp_path), trainset=data(5), seed=3, out_dir=tmp_path / "full")
    with pytest.raises(Stop):
        rl.compile(fake_program(tmp_path), trainset=data(5), seed=3, out_dir=tmp_path / "cut",
                   progress=stop_after(3))
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed = rl.compile(fake_program(tmp_path), trainset=data(5), seed=3, out_dir=tmp_path / "cut")
    a, b = resumed.history[-1], full.history[-1]
    assert same_part(a.extra["steps"]) == same_part(b.extra["steps"])  # the data order went on where it was
    assert a.extra["resumed_after_step"] == 2 and "resumed after RL step 2" in a.detail
    losses = [next(iter(h["updates"].values()))["loss"] for h in a.extra["steps"]]
    assert losses == [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5]  # the trainer's state went on too
    assert Path(resumed.program.solve.lm.adapter).name == "adapter-step005"
    assert a.usage == b.usage  # the rollouts' usage before the checkpoint is kept


def test_a_checkpoint_of_other_settings_is_not_used(tmp_path, caplog):
    def run(**kw):
        return GRPO(metric, batch_size=2, rollouts=4, policy_factory=StatePolicy, **kw).compile(
            fake_program(tmp_path), trainset=data(5), seed=0, out_dir=tmp_path / "out")

    run(steps=2)
    assert json.loads((tmp_path / "out" / "checkpoint" / "state.json").read_text())["step"] == 2
    again = run(steps=2, checkpoint_every=0)  # checkpoint_every is not part of what must match
    assert again.history[-1].extra["resumed_after_step"] == 2
    other = run(steps=2, learning_rate=1e-3)
    assert other.history[-1].extra["resumed_after_step"] is None
    assert "another settings" in caplog.text and "settings.learning_rate" in caplog.text
    assert json.loads((tmp_path / "out" / "checkpoint" / "state.json").read_text())["identity"]["settings"][
        "learning_rate"] == 1e-3


def test_checkpoint_every_is_checked():
    with pytest.raises(ValueError, match="`checkpoint_every` must be 0 \\(none\\) or a multiple of sync_every=2"):
        GRPO(metric, sync_every=2, checkpoint_every=3)
    with pytest.raises(ValueError, match="checkpoint_every"):
        GRPO(metric, checkpoint_every=-1)
    assert GRPO(metric, sync_every=2, checkpoint_every=4).settings.checkpoint_every == 4


def test_a_half_written_checkpoint_is_never_read(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint.partial").mkdir(parents=True)
    (out / "checkpoint.partial" / "state.json").write_text("{")  # killed while writing
    assert checkpoint.read(out, {"x": 1}) is None and not (out / "checkpoint.partial").exists()
    # killed between the two renames: the previous checkpoint is still there, as checkpoint.old
    (out / "checkpoint.old").mkdir()
    (out / "checkpoint.old" / "state.json").write_text(json.dumps({"identity": {"x": 1}, "step": 4}))
    state, folder = checkpoint.read(out, {"x": 1})
    assert state["step"] == 4 and folder.name == "checkpoint.old"


def test_better_together_resume_continues_the_killed_r_step(tmp_path):
    """A run stopped inside its r step is resumed: the step runs again with the same out_dir and goes on."""
    def bt(progress_steps):
        rl = GRPO(metric, steps=4, batch_size=2, rollouts=4, checkpoint_every=2, policy_factory=StatePolicy)
        return BetterTogether(metric, strategy="r", rl_optimizer=rl, run_dir=tmp_path / "run"), progress_steps

    run, _ = bt(None)
    with pytest.raises(Stop):
        run.compile(fake_program(tmp_path), trainset=data(8), valset=data(3), seed=0, progress=stop_after(3))
    out = tmp_path / "run" / "steps" / "01-r" / "out"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    res = run.compile(fake_program(tmp_path), trainset=data(8), valset=data(3), seed=0, resume=True)
    assert res.history[-1].extra["resumed_after_step"] == 2
    assert [h["step"] for h in res.history[-1].extra["steps"]] == [1, 2, 3, 4]
