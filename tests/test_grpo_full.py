"""The RL step training every weight (``[rl] method = "full"``), on the tiny random model.

As for the LoRA policy (test_grpo), the update test is the real check: a
positive advantage raises a completion's log-probability and a negative one
lowers it. The rest checks what a full policy saves (a whole checkpoint that
stands where an adapter would), its checkpoints, where it starts from after a
weight step, and the settings that cannot go with it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fakes import Mod3, data  # noqa: E402
from test_grpo import BAD, GOOD, PROMPT, train_good_over_bad  # noqa: E402

from tandem.experiments.config import RunConfig  # noqa: E402
from tandem.lm.identity import check_adapter_base, is_full_checkpoint, load_adapter_meta  # noqa: E402
from tandem.optimize import GRPO, GRPOSettings  # noqa: E402
from tandem.optimize.grpo import module_weights  # noqa: E402
from tandem.train import LoRAConfig, SFTExample, train_lora  # noqa: E402
from tandem.train.grpo import Policy, PolicyItem  # noqa: E402

FULL = LoRAConfig(method="full", device="cpu", bf16=False)
ITEMS = module_weights([PolicyItem(PROMPT, GOOD, 1.0, "solve"), PolicyItem(PROMPT, BAD, -1.0, "solve")])


@pytest.fixture(scope="module")
def updated(tiny_model_dir, tmp_path_factory):
    policy = Policy(tiny_model_dir, FULL, learning_rate=1e-3, micro_batch=1)
    return train_good_over_bad(policy, tmp_path_factory.mktemp("rl-full") / "adapter")


def test_a_full_update_raises_the_positive_completion_and_lowers_the_negative(updated):
    policy, (good0, bad0), (good1, bad1), stats, _out = updated
    assert good1 > good0 + 0.5, (good0, good1)
    assert bad1 < bad0 - 0.5, (bad0, bad1)
    assert all(s.items == 2 for s in stats)
    total = sum(p.numel() for p in policy._causal_lm.parameters())
    assert policy.trainable_params == total  # every weight, not a LoRA's


def test_it_saves_a_whole_checkpoint_that_names_its_base_and_serves(updated, tiny_model_dir):
    from tandem.lm.hf import HFLM

    _policy, _before, (good1, _bad1), _stats, out = updated
    assert is_full_checkpoint(out)
    check_adapter_base(out, tiny_model_dir)
    meta = load_adapter_meta(out)
    assert meta["training"]["method"] == "grpo" and meta["config"]["method"] == "full"
    lm = HFLM(tiny_model_dir).with_adapter(out)
    assert lm.adapter == out and lm.fingerprint() != HFLM(tiny_model_dir).fingerprint()
    # w -> r with full weights: an RL step starts from the checkpoint it finds
    again = Policy(tiny_model_dir, FULL, adapter=out)
    assert again.logprob(PROMPT, GOOD) == pytest.approx(good1, abs=1e-4)


def test_a_checkpoint_resumes_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = Policy(tiny_model_dir, FULL, learning_rate=1e-3, micro_batch=1)
    for _ in range(3):
        straight.update(ITEMS)
    first = Policy(tiny_model_dir, FULL, learning_rate=1e-3, micro_batch=1)
    first.update(ITEMS)
    first.save_state(tmp_path / "state")
    resumed = Policy(tiny_model_dir, FULL, learning_rate=1e-3, micro_batch=1)
    resumed.load_state(tmp_path / "state")
    for _ in range(2):
        resumed.update(ITEMS)
    assert resumed.n_updates == 3
    assert resumed.logprob(PROMPT, GOOD) == pytest.approx(straight.logprob(PROMPT, GOOD), abs=1e-5)


def test_full_and_lora_policies_refuse_the_other_kind_of_start(tiny_model_dir, tmp_path):
    ex = [SFTExample(f"Say hi {i}. Answer:", " hi", "greet") for i in range(2)]
    lora_dir = train_lora(tiny_model_dir, ex, LoRAConfig(method="lora", epochs=1, rank=4, alpha=8, device="cpu",
                                                         bf16=False), tmp_path / "lora").adapter_dir
    with pytest.raises(ValueError, match='method = "full" trains every weight, but the program serves the LoRA'):
        Policy(tiny_model_dir, FULL, adapter=lora_dir)
    with pytest.raises(ValueError, match="`beta` > 0 needs a LoRA"):
        Policy(tiny_model_dir, FULL, beta=0.05)


@pytest.mark.parametrize("bad, match", [
    ({"method": "half"}, "`method` must be 'lora' or 'full'"),
    ({"method": "full", "per_module": True}, "`per_module` needs method = 'lora'"),
    ({"method": "full", "beta": 0.1}, "`beta` must be 0 with method = 'full'"),
])
def test_settings_that_cannot_go_with_full_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        GRPO(lambda e, p, t=None: 1.0, **bad)
    assert "\n" not in str(err.value)


def test_the_run_config_lets_a_full_rl_step_follow_a_full_weight_step():
    cfg = RunConfig(strategy="w -> r", rl={"method": "full"}).check()
    assert cfg.lora_config().method == "auto"  # not turned into a LoRA: r continues from full weights
    assert cfg.rl_settings().method == "full" and cfg.rl_settings().policy_lora().method == "full"
    assert RunConfig(strategy="w -> r", lora={"method": "full"}, rl={"method": "full"}).check()
    assert RunConfig(strategy="w -> r").check().lora_config().method == "lora"  # a LoRA r: a LoRA w
    with pytest.raises(ValueError, match=r"^\[rl\] setting `method` must be 'lora' or 'full'"):
        RunConfig(strategy="r", rl={"method": "half"}).check()


def test_an_rl_step_in_full_end_to_end_serves_its_checkpoint(tiny_model_dir, tmp_path):
    """Rollouts on the transformers backend, full GRPO updates, the new checkpoint served by the same LM."""
    from tandem.lm.hf import HFLM

    def length_metric(ex, pred, trace=None):  # partial credit that varies between samples
        return (len(pred.reasoning) + len(pred.y)) % 7 / 6

    prog = Mod3().set_lm(HFLM(tiny_model_dir))
    settings = GRPOSettings(steps=2, batch_size=2, rollouts=3, max_tokens=6, temperature=1.0, micro_batch=4,
                            method="full", learning_rate=1e-4, lora=LoRAConfig(device="cpu", bf16=False))
    res = GRPO(length_metric, settings).compile(prog, trainset=data(4), valset=data(1), seed=0, out_dir=tmp_path)
    rec = res.history[-1]
    assert rec.status == "ok", rec.detail
    assert any(s["updates"] for s in rec.extra["steps"])
    lm = res.program.solve.lm
    assert isinstance(lm, HFLM) and lm.adapter is not None and is_full_checkpoint(lm.adapter)
    assert res.program.solve(x="4").y is not None  # the program runs on the new weights
