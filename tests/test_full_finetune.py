"""Full fine-tuning (``[lora] method = "full"``) as a weight step: a whole checkpoint that stands where
an adapter would, on the tiny model (HF backend); the real-model run (p -> w -> p, method "auto") is
in test_optimize_e2e."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fakes import Mod3, data  # noqa: E402

from tandem.lm import Request, SamplingParams  # noqa: E402
from tandem.lm.hf import HFLM  # noqa: E402
from tandem.lm.identity import (  # noqa: E402
    AdapterMismatch, check_adapter_base, is_full_checkpoint, load_adapter_meta,
)
from tandem.lm.protocol import LMError  # noqa: E402
from tandem.train import LoRAConfig, SFTExample, train_lora  # noqa: E402

FULL = LoRAConfig(method="full", epochs=3, batch_size=2, learning_rate=1e-3)


def _examples(n: int = 4) -> list[SFTExample]:
    return [SFTExample(f"Say hello to number {i}. Answer:", " hello there", "greet") for i in range(n)]


@pytest.fixture(scope="module")
def full_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "tuned"
    train_lora(tiny_model_dir, _examples(), FULL, out)
    return out


def test_a_fully_tuned_checkpoint_names_its_base(full_dir, tiny_model_dir, tmp_path_factory):
    from tandem.lm.models import build_tiny_model

    assert is_full_checkpoint(full_dir) and not (full_dir / "adapter_config.json").exists()
    meta = load_adapter_meta(full_dir)
    assert meta["config"]["method"] == "full" and meta["training"]["steps"] > 0
    check_adapter_base(full_dir, tiny_model_dir)
    other = build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)
    with pytest.raises(AdapterMismatch, match="trained on base model"):
        check_adapter_base(full_dir, other)
    assert not is_full_checkpoint(tiny_model_dir)  # an ordinary checkpoint has no tandem_adapter.json


def test_hf_serves_the_tuned_checkpoint_in_place_of_the_base(full_dir, tiny_model_dir):
    base = HFLM(tiny_model_dir)
    tuned = base.with_adapter(full_dir)
    direct = HFLM(full_dir)  # the same weights loaded as a model of their own
    req = [Request("Say hello to number 7. Answer:", SamplingParams(max_tokens=6))]
    assert tuned.full and tuned.model_dir == base.model_dir  # training starts from the base again
    assert tuned.generate(req)[0].text == direct.generate(req)[0].text
    assert tuned.fingerprint() != base.fingerprint()
    assert tuned.with_adapter(None).fingerprint() == base.fingerprint()
    assert tuned.generate(req)[0].text != base.generate(req)[0].text


def test_vllm_loads_the_checkpoint_itself_and_sends_no_lora(full_dir, tiny_model_dir):
    from tandem.lm.vllm import VLLM

    for mode in ("merge", "lora"):
        lm = VLLM(tiny_model_dir, adapter_mode=mode).with_adapter(full_dir)
        assert lm.full and lm.serving_dir() == full_dir and lm._lora() is None
        assert lm.fingerprint().endswith(":full")


def test_a_server_cannot_load_it_as_a_lora(full_dir):
    from tandem.lm.openai_lora import served_adapter

    with pytest.raises(LMError, match="tuned in full.*vllm serve"):
        served_adapter(full_dir)


def test_the_weight_step_trains_in_full_and_the_program_saves_and_loads(tiny_model_dir, tmp_path):
    import tandem
    from tandem.optimize import BootstrapFinetune

    def any_reply(ex, pred, trace=None):  # the tiny model is random: every trace passes
        return True

    prog = Mod3().set_lm(HFLM(tiny_model_dir))
    step = BootstrapFinetune(any_reply, config=FULL, attempts=1, hint_attempts=0, num_threads=4)
    res = step.compile(prog, trainset=data(4), valset=data(2), seed=0, out_dir=tmp_path / "w")
    (rec,) = res.history
    assert rec.status == "ok", rec.detail
    assert rec.trainable_params > 1_000_000  # every weight of the tiny model, not a LoRA's
    lm = res.program.solve.lm
    assert lm.full and lm.adapter == tmp_path / "w" / "adapter"
    res.program.save(tmp_path / "saved", seed=0)
    ref = json.loads((tmp_path / "saved" / "program.json").read_text())
    assert ref["predictors"]["solve"]["lm"]["adapter"] == "adapters/adapter"
    loaded = tandem.load(tmp_path / "saved")
    assert loaded.solve.lm.full and loaded.solve.lm.fingerprint() == lm.fingerprint()
    assert loaded(x="4") == res.program(x="4")


def test_auto_trains_small_models_in_full_with_the_full_recipe(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tandem.train import recipe

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = sum(p.numel() for p in model.parameters())  # a tied head counted once, as the file stores it
    assert recipe.count_params(tiny_model_dir) == n
    cfg = recipe.resolve_config(LoRAConfig(), tiny_model_dir)
    assert (cfg.method, cfg.epochs, cfg.batch_size, cfg.learning_rate) == ("full", 20, 8, 1e-4)
    kept = recipe.resolve_config(LoRAConfig(epochs=2, learning_rate=5e-5), tiny_model_dir)
    assert (kept.method, kept.epochs, kept.batch_size, kept.learning_rate) == ("full", 2, 8, 5e-5)
    monkeypatch.setattr(recipe, "FULL_MAX_PARAMS", n - 1)
    big = recipe.resolve_config(LoRAConfig(), tiny_model_dir)
    assert (big.method, big.epochs, big.batch_size, big.learning_rate) == ("lora", 4, 2, 1e-3)
    assert recipe.resolve_config(LoRAConfig(method="full"), tiny_model_dir).method == "full"
    with pytest.raises(ValueError, match="method must be one of auto, lora, full"):
        LoRAConfig(method="qlora")


def test_an_lm_that_serves_only_loras_gets_a_lora(tmp_path):
    from fakes import metric

    from tandem.lm.fake import FakeLM
    from tandem.optimize import BootstrapFinetune

    lm = FakeLM(lambda text, params: " because\nY: 1")
    lm.model_dir, lm.serves_full_weights = tmp_path, False  # as OpenAILM: a server loads LoRAs only
    seen = []

    def trainer(model_dir, examples, cfg, out, **kw):
        seen.append(cfg.method)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        BootstrapFinetune(metric, trainer=trainer, attempts=1, hint_attempts=0).compile(
            Mod3().set_lm(lm), trainset=data(3), valset=data(2), out_dir=tmp_path / "w")
    assert seen == ["lora"]  # auto chose a LoRA
    with pytest.raises(ValueError, match='method = "full": .* serves LoRA adapters only'):
        BootstrapFinetune(metric, trainer=trainer, config=LoRAConfig(method="full")).compile(
            Mod3().set_lm(lm), trainset=data(3), valset=data(2), out_dir=tmp_path / "w")
    assert seen == ["lora"]  # refused before any run or training


def test_the_rl_step_refuses_to_continue_from_weights_tuned_in_full(full_dir, tiny_model_dir):
    from tandem.train.grpo import Policy

    with pytest.raises(ValueError, match="trains a LoRA .* tuned in full"):
        Policy(tiny_model_dir, LoRAConfig(), adapter=full_dir)
