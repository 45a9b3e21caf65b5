"""The RL step (r) on the real embedded model (slow, in CI): rollouts on vLLM, GRPO updates of a LoRA,
the LoRA merged into the running engine after every step.

The reward is made easy to learn so that a few steps show it rising: a
shorter reasoning line scores higher (partial credit that differs between
samples of one example, so every group teaches something).
"""

from __future__ import annotations

import pytest

from tandem.lm import Request
from tandem.optimize import GRPO, GRPOSettings
from tandem.tasks.iris import IrisClassifier, load_iris, split_iris
from tandem.train import LoRAConfig

pytestmark = pytest.mark.slow


def brevity(ex, pred, trace=None) -> float:
    """1 for an empty reasoning, 0 for 120 characters or more."""
    return 1.0 - min(len(pred.reasoning or ""), 120) / 120


def test_rl_on_the_embedded_model_raises_the_reward_and_changes_the_weights(smollm_vllm, tmp_path):
    splits = split_iris(load_iris(), seed=0, sizes=(16, 4, 4))
    settings = GRPOSettings(steps=6, batch_size=4, rollouts=4, learning_rate=1e-3, temperature=1.0, max_tokens=48,
                            lora=LoRAConfig(method="lora", rank=16, alpha=32))
    program = IrisClassifier().set_lm(smollm_vllm)
    res = GRPO(brevity, settings).compile(program, trainset=splits["train"], valset=splits["dev"], seed=0,
                                          out_dir=tmp_path / "r")
    rec = res.history[-1]
    assert rec.status == "ok", rec.detail
    rewards = [s["mean_reward"] for s in rec.extra["steps"]]
    assert len(rewards) == 6 and all(s["updates"] for s in rec.extra["steps"]), rec.extra["steps"]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.1, rewards  # shorter reasoning, learnt
    tuned = res.program.classify.lm
    assert tuned.adapter is not None and (tuned.adapter / "tandem_adapter.json").exists()
    prompts = [IrisClassifier().classify.request(ex.inputs(), smollm_vllm).text for ex in splits["test"]]
    base_out = [c.text for c in smollm_vllm.generate([Request(p) for p in prompts])]
    tuned_out = [c.text for c in tuned.generate([Request(p) for p in prompts])]
    assert base_out != tuned_out  # the engine serves the new weights
