"""The RL step (r) on the real embedded model (slow, in CI): rollouts on vLLM, GRPO updates of a LoRA,
the LoRA merged into the running engine after every step.

The task is made easy to learn so that a few steps show the reward rising: a
one-field program (every reply parses) whose reward is the brevity of its
answer, partial credit that differs between samples of one question, so
every group teaches something.
"""

from __future__ import annotations

import pytest

import tandem
from tandem.lm import Request
from tandem.optimize import GRPO, GRPOSettings
from tandem.program.example import Example
from tandem.train import LoRAConfig

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "a forest", "winter", "a city at night", "bread", "a river", "the moon", "a garden",
          "a storm", "a library", "mountains", "a train"]


class Describe(tandem.Module):
    def __init__(self):
        self.describe = tandem.Predict("topic -> description", instructions="Describe the topic.")

    def forward(self, topic):
        return self.describe(topic=topic)


def brevity(ex, pred, trace=None) -> float:
    """1 for an empty description, 0 for 200 characters or more."""
    return 1.0 - min(len(pred.description or ""), 200) / 200


def test_rl_on_the_embedded_model_raises_the_reward_and_changes_the_weights(smollm_vllm, tmp_path):
    data = [Example(topic=t, description="").with_inputs("topic") for t in TOPICS]
    settings = GRPOSettings(steps=5, batch_size=4, rollouts=4, learning_rate=1e-3, max_tokens=60,
                            lora=LoRAConfig(method="lora", rank=16, alpha=32))
    res = GRPO(brevity, settings).compile(Describe().set_lm(smollm_vllm), trainset=data[:8], valset=data[8:],
                                          seed=0, out_dir=tmp_path / "r")
    rec = res.history[-1]
    assert rec.status == "ok", rec.detail
    steps = rec.extra["steps"]
    rewards = [s["mean_reward"] for s in steps]
    print("mean reward per RL step:", [round(r, 3) for r in rewards])
    assert len(steps) == 5 and all(s["updates"] for s in steps), steps
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.05, rewards  # shorter descriptions, learnt
    tuned = res.program.describe.lm
    assert tuned.adapter is not None and (tuned.adapter / "tandem_adapter.json").exists()
    prompts = [Describe().describe.request({"topic": t}, smollm_vllm).text for t in TOPICS[8:]]
    base_out = [c.text for c in smollm_vllm.generate([Request(p) for p in prompts])]
    tuned_out = [c.text for c in tuned.generate([Request(p) for p in prompts])]
    assert base_out != tuned_out  # the engine serves the new weights
