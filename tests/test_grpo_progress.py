"""What the user sees of the RL step: a progress report per RL step with its mean reward, and the step record.

The record's reward curve, spread, equal-reward groups, time per phase and
tokens are checked against the rollouts the FakeLM produced; the CLI's
progress (bars on a terminal, lines elsewhere) shows the mean reward.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from fakes import Mod3, data, metric, read_x
from tandem.cli_output import progress
from tandem.lm import FakeLM
from tandem.optimize import GRPO
from tandem.optimize.base import report
from tandem.train.grpo import UpdateStats


class CountingPolicy:
    def __init__(self, model_dir, lora, **kw):
        self.trainable_params = 10

    def update(self, items):
        return UpdateStats(len(items), 0, 5 * len(items), 0.1, None, 0.0, 1.0, 0.01)

    def save(self, out_dir, training=None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return out


def reply(text, params):
    """Right for seeds divisible by 3; examples with x >= 4 are always right (their groups teach nothing)."""
    x, seed = read_x(text), params.seed or 0
    return f" x is {x}\nY: {x % 3 if x >= 4 or seed % 3 == 0 else 7}"


def run(tmp_path, callback, steps=3):
    lm = FakeLM(reply)
    lm.model_dir = tmp_path
    rl = GRPO(metric, steps=steps, batch_size=3, rollouts=4, policy_factory=CountingPolicy)
    return rl.compile(Mod3().set_lm(lm), trainset=data(6), seed=0, out_dir=tmp_path / "out", progress=callback)


def test_each_rl_step_is_reported_with_its_mean_reward(tmp_path):
    calls = []
    res = run(tmp_path, lambda label, done, total, status=None: calls.append((label, done, total, status)))
    steps = res.history[-1].extra["steps"]
    assert calls == [("rl steps", 0, 3, None)] + [
        ("rl steps", s["step"], 3, f"mean reward {s['mean_reward']:.3f}") for s in steps]
    plain = []  # a callback that takes no status gets the counts alone
    run(tmp_path, lambda label, done, total: plain.append((label, done, total)))
    assert plain == [("rl steps", i, 3) for i in range(4)]


def test_the_record_holds_the_reward_curve_spread_equal_groups_phases_and_tokens(tmp_path):
    res = run(tmp_path, None, steps=4)
    rec = res.history[-1]
    steps = rec.extra["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        xs = [int(data(6)[i].x) for i in s["examples"]]
        # an example with x >= 4 is always right: its group has equal rewards
        always = sum(x >= 4 for x in xs)
        assert s["zero_variance_groups"] >= always and s["groups"] == 3
        assert s["zero_variance_share"] == pytest.approx(s["zero_variance_groups"] / 3)
        assert s["reward_min"] <= s["mean_reward"] <= s["reward_max"]
        assert 0 <= s["reward_std"] <= 0.5 + 1e-9
        assert s["usage"]["calls"] == 12 and s["usage"]["prompt_tokens"] > 0
        assert s["trained_tokens"] == sum(u["tokens"] for u in s["updates"].values())
        assert {"rollout_s", "train_s", "sync_s", "wall_s"} <= set(s)
    # the spread is the rollouts' own: rewards are 0 or 1 here, so std = sqrt(p (1 - p))
    s = steps[0]
    mean = s["mean_reward"]
    assert s["reward_std"] == pytest.approx(math.sqrt(mean * (1 - mean)))
    assert rec.usage["calls"] == sum(s["usage"]["calls"] for s in steps)
    assert rec.extra["tokens"] == {"rollouts": rec.usage["prompt_tokens"] + rec.usage["output_tokens"],
                                   "trained": sum(s["trained_tokens"] for s in steps)}
    assert rec.extra["phases_s"]["rollout"] == pytest.approx(sum(s["rollout_s"] for s in steps), abs=0.05)


def test_report_leaves_status_out_for_callbacks_that_do_not_take_it():
    got = []
    report(lambda label, done, total: got.append((label, done, total)), "rl steps", 1, 2, status="x")
    report(lambda *a, **kw: got.append((a, kw)), "rl steps", 2, 2, status="y")
    report(None, "rl steps", 2, 2, status="z")
    assert got == [("rl steps", 1, 2), (("rl steps", 2, 2), {"status": "y"})]


def test_cli_lines_show_the_mean_reward_at_every_rl_step():
    out = io.StringIO()
    with progress(Console(file=out, width=80), interval_s=10, clock=lambda: 0.0) as update:
        update("rl steps", 0, 3)
        for k, r in ((1, 0.25), (2, 0.5), (3, 0.75)):
            update("rl steps", k, 3, status=f"mean reward {r:.3f}")
    assert out.getvalue().splitlines() == ["rl steps: 0/3 (0 s)", "rl steps: 1/3 (0 s), mean reward 0.250",
                                           "rl steps: 2/3 (0 s), mean reward 0.500",
                                           "rl steps: 3/3 (0 s), mean reward 0.750"]


def test_cli_bar_shows_the_mean_reward():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    with progress(console) as update:
        update("rl steps", 0, 3)
        update("rl steps", 1, 3, status="mean reward 0.250")
        (task,) = update.bar.tasks
        assert task.description == "rl steps (mean reward 0.250)" and task.completed == 1
    assert "rl steps (mean reward 0.250)" in out.getvalue()
