"""The RL step ``r``: advantages, settings, the GRPO update on the tiny random model, orchestration.

The update test on the tiny model is the real check of the feature: after a
few updates with a positive advantage on one completion and a negative one
on another for the same prompt, the first's log-probability must rise and
the second's fall. The FakeLM tests check the orchestration around it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fakes import Mod3, data, fake_trainer, metric, read_x
from tandem import ChainOfThought, Module
from tandem.experiments.config import STEP_LETTERS, load_config
from tandem.lm import FakeLM
from tandem.optimize import GRPO, BetterTogether, BootstrapFinetune, GRPOSettings, StrategyError, parse_strategy
from tandem.optimize.grpo import group_advantages, module_weights
from tandem.train import LoRAConfig
from tandem.train.grpo import Policy, PolicyItem, UpdateStats, grpo_token_loss


# -- advantages ---------------------------------------------------------------------------
def test_group_advantages_normalize_within_the_group():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    a = 0.5 / (math.sqrt(4 * 0.25 / 3) + 1e-4)  # the sample std, as TRL
    assert adv == pytest.approx([a, -a, -a, a])
    partial = group_advantages([0.2, 0.5, 0.8])  # partial credit (F1-like)
    assert partial[1] == pytest.approx(0.0) and partial[0] == pytest.approx(-partial[2]) and partial[2] > 0
    assert group_advantages([1.0, 1.0, 1.0]) is None  # no variance: nothing to learn
    assert group_advantages([0.0, 0.0]) is None


def test_each_module_gets_an_equal_share_of_the_loss():
    items = [PolicyItem("p", "c", 1.0, "a")] * 3 + [PolicyItem("p", "c", -1.0, "b")]
    w = [it.weight for it in module_weights(items)]
    assert w == pytest.approx([1 / 6] * 3 + [1 / 2]) and sum(w) == pytest.approx(1.0)


# -- settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, name", [
    ({"rollouts": 1}, "rollouts"), ({"learning_rate": -1e-4}, "learning_rate"), ({"learning_rate": 0}, "learning_rate"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": 0.0}, "temperature"), ({"beta": -0.1}, "beta"),
    ({"clip_epsilon": 0}, "clip_epsilon"), ({"steps": 0}, "steps"), ({"batch_size": 1.5}, "batch_size"),
    ({"max_tokens": 0}, "max_tokens"), ({"format_penalty": -1}, "format_penalty"), ({"per_module": "yes"}, "per_module"),
    ({"method": "half"}, "method"), ({"lora": "r16"}, "lora"),
])
def test_bad_settings_are_one_line_errors_naming_the_setting(bad, name):
    with pytest.raises(ValueError) as err:
        GRPO(metric, **bad)  # at construction: before any rollout or model load
    assert f"`{name}`" in str(err.value) and "\n" not in str(err.value)


def test_unknown_settings_and_config_section(no_lm):
    with pytest.raises(ValueError, match="unknown RL setting"):
        GRPO(metric, rollout=4)
    cfg = load_config(overrides=["strategy=p -> r -> p", "rl.steps=3", "rl.rollouts=2", "lora.rank=8"])
    s = cfg.rl_settings()
    assert (s.steps, s.rollouts, s.lora.rank) == (3, 2, 8)
    for override, name in (("rl.rollouts=1", "rollouts"), ("rl.learning_rate=-1", "learning_rate"),
                           ("rl.temperature=-1", "temperature"), ("rl.nope=1", "nope")):
        with pytest.raises(ValueError) as err:
            load_config(overrides=[override])
        assert str(err.value).startswith("[rl] ") and name in str(err.value) and "\n" not in str(err.value)


def test_r_is_a_strategy_letter_and_unknown_letters_still_fail():
    assert parse_strategy("p -> r", STEP_LETTERS) == ["p", "r"]
    assert parse_strategy("w -> r -> p", STEP_LETTERS) == ["w", "r", "p"]
    with pytest.raises(StrategyError, match="unknown step 'x'"):
        parse_strategy("p -> x", STEP_LETTERS)
    assert load_config(overrides=["strategy=r"]).strategy == "r"
    with pytest.raises(ValueError, match="unknown step 'q'"):
        load_config(overrides=["strategy=p -> q"])
    bt = BetterTogether(metric, strategy="p -> r -> p")
    assert bt.steps == ["p", "r", "p"] and isinstance(bt.optimizers["r"], GRPO)


# -- the loss -----------------------------------------------------------------------------
def test_token_loss_clips_and_adds_k3():
    import torch

    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -1.0])
    logp = torch.tensor([0.1, 0.5, -0.5], requires_grad=True)  # ratios 1.105, 1.65, 0.61
    loss = grpo_token_loss(logp, old, adv, clip_epsilon=0.2)
    assert loss.detach().tolist() == pytest.approx([-math.exp(0.1), -1.2, 0.8], rel=1e-5)
    loss.sum().backward()
    # inside the clip range the gradient is -A * ratio; clipped tokens get none
    assert logp.grad.tolist() == pytest.approx([-math.exp(0.1), 0.0, 0.0], rel=1e-5)
    same = grpo_token_loss(old, old, adv, clip_epsilon=0.2, beta=0.5, ref_logp=old)
    assert same.tolist() == pytest.approx((-adv).tolist())  # k3 is 0 where policy == reference
    kl = grpo_token_loss(old, old, torch.zeros(3), clip_epsilon=0.2, beta=1.0, ref_logp=torch.full((3,), -0.3))
    assert kl.tolist() == pytest.approx([math.exp(-0.3) + 0.3 - 1] * 3)


# -- the update on the tiny random model (the real check) ---------------------------------
PROMPT = "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nAnswer:"
GOOD, BAD = " yes, it is", " no"


def train_good_over_bad(policy: Policy, out_dir: Path, updates: int = 4):
    """``updates`` updates with advantage +1 on GOOD and -1 on BAD; (policy, before, after, stats, saved folder)."""
    before = policy.logprob(PROMPT, GOOD), policy.logprob(PROMPT, BAD)
    items = module_weights([PolicyItem(PROMPT, GOOD, 1.0, "solve"), PolicyItem(PROMPT, BAD, -1.0, "solve")])
    stats = [policy.update(items) for _ in range(updates)]
    after = policy.logprob(PROMPT, GOOD), policy.logprob(PROMPT, BAD)
    return policy, before, after, stats, policy.save(out_dir, {"rl_step": updates})


@pytest.fixture(scope="module")
def updated(tiny_model_dir, tmp_path_factory):
    policy = Policy(tiny_model_dir, LoRAConfig(rank=8, alpha=16, device="cpu", bf16=False), learning_rate=5e-3,
                    beta=0.05, micro_batch=1)
    return train_good_over_bad(policy, tmp_path_factory.mktemp("rl") / "adapter")


def test_update_raises_the_positive_completion_and_lowers_the_negative(updated):
    _policy, (good0, bad0), (good1, bad1), stats, _out = updated
    assert good1 > good0 + 0.5, (good0, good1)
    assert bad1 < bad0 - 0.5, (bad0, bad1)
    assert all(isinstance(s, UpdateStats) and s.items == 2 for s in stats)
    assert stats[0].kl == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA is the base model
    assert stats[-1].kl > 0  # the k3 estimate against the base once the LoRA has moved


def test_saved_adapter_is_a_tandem_adapter_and_loads_where_train_lora_adapters_do(updated, tiny_model_dir):
    from tandem.lm.hf import HFLM
    from tandem.train import check_adapter_base, load_adapter_meta

    policy, _before, (good1, _bad1), _stats, out = updated
    meta = load_adapter_meta(out)
    check_adapter_base(out, tiny_model_dir)
    assert meta["training"]["method"] == "grpo" and meta["training"]["updates"] == 4
    assert meta["config"]["rank"] == 8
    lm = HFLM(tiny_model_dir).with_adapter(out)  # the weight step's serving path
    assert lm.adapter == out and "+" in lm.fingerprint()
    # an RL step after a weight step starts from the adapter it finds (w -> r)
    again = Policy(tiny_model_dir, LoRAConfig(device="cpu", bf16=False), adapter=out)
    assert again.logprob(PROMPT, GOOD) == pytest.approx(good1, abs=1e-4)
    assert again.lora.rank == 8  # the adapter's own shape, not the config's 32


# -- orchestration on the FakeLM ----------------------------------------------------------
class FakePolicy:
    """Stands in for tandem.train.grpo.Policy: records the items of each update."""

    made: list["FakePolicy"] = []

    def __init__(self, model_dir, lora, **kw):
        self.kw, self.batches, self.trainable_params = kw, [], 10
        FakePolicy.made.append(self)

    def update(self, items):
        self.batches.append(list(items))
        return UpdateStats(len(items), 0, 10 * len(items), 0.25, None, 0.0, 1.0, 0.01)

    def save(self, out_dir, training=None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text("{}")
        return out


@pytest.fixture(autouse=True)
def _fresh_policies():
    FakePolicy.made = []


def seeded_reply(text, params):
    """Right for odd seeds, wrong for even ones; unparseable (no Y line) for seeds divisible by 5."""
    x, seed = read_x(text), params.seed or 0
    if seed % 5 == 0:
        return " no idea"
    return f" x is {x}\nY: {x % 3 if seed % 2 else (x + 1) % 3}"


def fake_lm(tmp_path, reply=seeded_reply):
    lm = FakeLM(reply)
    lm.model_dir = tmp_path
    return lm


def test_rollouts_advantages_updates_and_the_new_adapter_on_the_lm(tmp_path):
    prog = Mod3().set_lm(fake_lm(tmp_path))
    prog.solve.fill_missing = False  # an unparseable reply stays one (format penalty)
    rl = GRPO(metric, steps=3, batch_size=2, rollouts=6, format_penalty=0.5, max_tokens=32,
              policy_factory=FakePolicy)
    res = rl.compile(prog, trainset=data(5), valset=data(2), seed=1, out_dir=tmp_path / "out")
    rec = res.history[-1]
    assert rec.kind == "r" and rec.status == "ok"
    (policy,) = FakePolicy.made
    assert policy.kw["learning_rate"] == 1e-4 and policy.kw["adapter"] is None
    hist = json.loads((tmp_path / "out" / "rl_history.json").read_text())
    assert [h["step"] for h in hist["steps"]] == [1, 2, 3] and hist["settings"]["rollouts"] == 6
    for h in hist["steps"]:
        assert h["rollouts"] == 12 and h["groups"] == 2 and 0 <= h["zero_variance_share"] <= 1
        assert {"mean_reward", "loss", "wall_s", "rollout_s", "train_s", "failures"} <= set(h)
    trained = [it for b in policy.batches for it in b]
    assert trained and all(it.module == "solve" for it in trained)
    unparsed = [it for it in trained if it.completion == " no idea"]
    assert unparsed and all(it.advantage < 0 for it in unparsed)  # -0.5 is the worst reward in its group
    right = [it for it in trained if it.completion.endswith(f"Y: {read_x(it.prompt) % 3}")]
    assert right and all(it.advantage > 0 for it in right)
    assert sum(it.weight for it in policy.batches[0]) == pytest.approx(1.0)
    lm = res.program.solve.lm  # the last update's LoRA is on the LM; the earlier folders are gone
    assert lm.adapter.endswith("step003") and Path(lm.adapter).exists()
    assert sorted(p.name for p in (tmp_path / "out" / "adapters").iterdir()) == ["adapter-step003"]
    assert prog.solve.lm.adapter is None  # the given program is untouched
    assert rec.usage["calls"] == 36 and rec.train_examples == len(trained)


def test_equal_rewards_everywhere_train_nothing(tmp_path):
    prog = Mod3().set_lm(fake_lm(tmp_path, lambda t: f" ok\nY: {read_x(t) % 3}"))  # always right
    res = GRPO(metric, steps=2, batch_size=3, rollouts=2, policy_factory=FakePolicy).compile(
        prog, trainset=data(6), valset=data(2), out_dir=tmp_path / "out")
    rec = res.history[-1]
    assert rec.status == "nothing_to_train" and "6 of 6 groups had equal rewards" in rec.detail
    assert FakePolicy.made[0].batches == [] and res.program.solve.lm.adapter is None


def test_oversample_trains_the_first_groups_whose_rewards_differ(tmp_path):
    def reply(text, params):  # even x: always right (a group that teaches nothing); odd x: right for odd seeds
        x, seed = read_x(text), params.seed or 0
        return f" ok\nY: {x % 3 if x % 2 == 0 or seed % 2 else 9}"

    prog = Mod3().set_lm(fake_lm(tmp_path, reply))
    res = GRPO(metric, steps=3, batch_size=1, oversample=4, rollouts=4, policy_factory=FakePolicy).compile(
        prog, trainset=data(8), valset=data(2), seed=0, out_dir=tmp_path / "out")
    steps = res.history[-1].extra["steps"]
    assert all(len(h["examples"]) == 4 and h["groups"] == 4 for h in steps)  # 1 x 4 drawn per step
    assert all(h["trained_groups"] == min(1, 4 - h["zero_variance_groups"]) for h in steps)
    (policy,) = FakePolicy.made
    assert policy.batches
    for batch in policy.batches:  # one example's rollouts per update: the first informative one drawn
        assert len({read_x(it.prompt) for it in batch}) == 1 and read_x(batch[0].prompt) % 2 == 1
    with pytest.raises(ValueError, match="`oversample`"):
        GRPO(metric, oversample=0)


class TwoModules(Module):
    def __init__(self):
        self.guess = ChainOfThought("x -> y")
        self.check = ChainOfThought("x, y -> z")

    def forward(self, x):
        y = self.guess(x=x).y
        return self.check(x=x, y=y)


def two_reply(text, params):
    x, seed = read_x(text), params.seed or 0
    return f" hm\nZ: {x % 3 if seed % 2 else 9}" if "\nY: " in text.split("<|user|>")[-1] else f" hm\nY: {x}"


def z_metric(ex, pred, trace=None):
    return float(pred.z == ex.y)


@pytest.mark.parametrize("per_module", [False, True])
def test_every_module_call_gets_its_rollouts_advantage(tmp_path, per_module):
    prog = TwoModules().set_lm(fake_lm(tmp_path, two_reply))
    res = GRPO(z_metric, steps=1, batch_size=2, rollouts=4, per_module=per_module, policy_factory=FakePolicy).compile(
        prog, trainset=data(4), valset=data(1), out_dir=tmp_path / "out")
    assert len(FakePolicy.made) == (2 if per_module else 1)
    items = [it for p in FakePolicy.made for b in p.batches for it in b]
    assert {it.module for it in items} == {"guess", "check"}
    for p in FakePolicy.made:
        (batch,) = p.batches
        by_module = {}
        for it in batch:
            by_module[it.module] = by_module.get(it.module, 0) + it.weight
        assert all(v == pytest.approx(1 / len(by_module)) for v in by_module.values())
    # a rollout's two calls share its advantage: guess's sign follows check's outcome
    guess = sorted(it.advantage for it in items if it.module == "guess")
    check = sorted(it.advantage for it in items if it.module == "check")
    assert guess == pytest.approx(check) and min(guess) < 0 < max(guess)
    adapters = {res.program.guess.lm.adapter, res.program.check.lm.adapter}
    assert len(adapters) == (2 if per_module else 1) and None not in adapters


def test_w_then_r_trains_on_from_the_weight_steps_adapter(tmp_path):
    def reply(text, params):
        x = read_x(text)
        return f" r\nY: {x % 3 if (params.seed or 0) % 2 else 7}"

    prog = Mod3().set_lm(fake_lm(tmp_path, reply))
    bt = BetterTogether(metric, strategy="w -> r",
                        weight_optimizer=BootstrapFinetune(metric, trainer=fake_trainer([])),
                        rl_optimizer=GRPO(metric, steps=1, batch_size=2, rollouts=4, policy_factory=FakePolicy),
                        run_dir=tmp_path / "run")
    res = bt.compile(prog, trainset=data(8), valset=data(3), seed=0)
    assert [r.kind for r in res.history] == ["start", "w", "r"]
    (policy,) = FakePolicy.made
    assert policy.kw["adapter"] and Path(policy.kw["adapter"]).name == "adapter"  # the w step's LoRA
    assert (tmp_path / "run" / "steps" / "02-r" / "out" / "rl_history.json").exists()


# -- end to end on the tiny model ----------------------------------------------------------
def test_rl_step_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Rollouts on the transformers backend, real GRPO updates, the new LoRA served by the same LM."""
    from tandem.lm.hf import HFLM

    def length_metric(ex, pred, trace=None):  # partial credit that varies between samples
        return (len(pred.reasoning) + len(pred.y)) % 7 / 6

    prog = Mod3().set_lm(HFLM(tiny_model_dir))
    settings = GRPOSettings(steps=2, batch_size=2, rollouts=3, max_tokens=6, temperature=1.0, micro_batch=4,
                            lora=LoRAConfig(rank=4, alpha=8, device="cpu", bf16=False))
    res = GRPO(length_metric, settings).compile(prog, trainset=data(4), valset=data(1), seed=0, out_dir=tmp_path)
    rec = res.history[-1]
    assert rec.status == "ok", rec.detail
    steps = rec.extra["steps"]
    assert len(steps) == 2 and all(s["rollouts"] == 6 for s in steps)
    assert any(s["updates"] for s in steps)
    lm = res.program.solve.lm
    assert isinstance(lm, HFLM) and lm.adapter is not None and lm.adapter.parent == tmp_path / "adapters"
    assert (lm.adapter / "tandem_adapter.json").exists()
    assert res.program.solve(x="4").y is not None  # the program runs on the new weights


def test_run_cell_gives_the_rl_step_the_config_settings(monkeypatch, tmp_path):
    """`[rl]` in a run config reaches the r step that run_cell builds (not GRPO's defaults)."""
    import tandem.optimize as optimize
    from tandem.experiments.run import run_cell

    seen = []

    class Recording(optimize.GRPO):
        def __init__(self, metric, settings=None, **kw):
            seen.append(settings)
            super().__init__(metric, settings, **kw)

    monkeypatch.setattr(optimize, "GRPO", Recording)
    cfg = load_config(overrides=["strategy=r", "rl.steps=3", "rl.rollouts=2", "sizes=10,10,10"])
    with pytest.raises(TypeError, match="no local checkpoint"):  # a FakeLM cannot train: construction is what counts
        run_cell(cfg, lm=FakeLM(lambda text: " r\nY: 1"), run_dir=tmp_path / "run")
    assert seen and seen[0].steps == 3 and seen[0].rollouts == 2
