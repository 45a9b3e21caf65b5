"""LoRA training on the tiny model: data, loss, adapter files, merge, base checks."""

from __future__ import annotations

import json
import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tandem.train import (  # noqa: E402
    AdapterMismatch, LoRAConfig, NothingToTrain, SFTExample, check_adapter_base, load_adapter_meta,
    merge_adapter, model_identity, tokenize_example, tokenize_examples, train_lora,
)
from tandem.train.lora import collate_batch, completion_loss  # noqa: E402

# Many steps at a high rate: the tiny model is random, so it has a lot to learn.
FAST = LoRAConfig(rank=8, alpha=16, epochs=30, batch_size=4, learning_rate=1e-2, method="lora")


def _prompt(tok, question: str) -> str:
    msgs = [{"role": "user", "content": question}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "Answer:"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [SFTExample(_prompt(tokenizer, f"Say hello to number {i}."), " hello there", "greet") for i in range(4)]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    return train_lora(tiny_model_dir, examples, FAST, out)


def test_completion_mask_covers_completion_and_eos(tokenizer):
    ex = SFTExample(_prompt(tokenizer, "Is a rose red?"), " Yes, usually.\nVerdict: yes")
    t = tokenize_example(tokenizer, ex)
    p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
    assert list(t.input_ids) == p + c + [tokenizer.eos_token_id]
    assert t.n_prompt == len(p) and t.n_completion == len(c) + 1
    assert t.completion_mask == [False] * len(p) + [True] * (len(c) + 1)
    # The batch mask matches, and padding is never a target.
    short = tokenize_example(tokenizer, SFTExample(ex.prompt, " No."))
    _ids, attn, target = collate_batch([t, short], pad_id=0, device="cpu")
    assert target[0].tolist() == t.completion_mask
    assert target[1].tolist() == short.completion_mask + [False] * (len(t) - len(short))
    assert attn[1].sum().item() == len(short)


def test_too_long_examples_are_dropped_with_a_counted_warning(tokenizer, caplog):
    exs = [SFTExample(_prompt(tokenizer, "hi"), " ok"), SFTExample(_prompt(tokenizer, "hi " * 200), " ok")]
    with caplog.at_level(logging.WARNING, logger="tandem.train.sft"):
        kept, dropped = tokenize_examples(tokenizer, exs, max_length=64)
    assert len(kept) == 1 and dropped == 1
    assert "dropped 1 of 2" in caplog.text


def test_no_examples_raise_nothing_to_train(tiny_model_dir, tokenizer, tmp_path):
    with pytest.raises(NothingToTrain):
        train_lora(tiny_model_dir, [], FAST, tmp_path / "a")
    too_long = [SFTExample(_prompt(tokenizer, "hi " * 200), " ok")]
    with pytest.raises(NothingToTrain, match="longer than max_length"):
        train_lora(tiny_model_dir, too_long, LoRAConfig(max_length=32), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_completion_loss_equals_full_head_loss(tiny_model_dir, tokenizer, examples):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [tokenize_example(tokenizer, ex) for ex in examples[:2]]
    rows.append(tokenize_example(tokenizer, SFTExample(examples[0].prompt, " a much longer reply than the others")))
    ids, attn, target = collate_batch(rows, tokenizer.pad_token_id, "cpu")
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        ours = completion_loss(model, ids, attn, target)
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)


def test_loss_decreases_and_adapter_folder_is_complete(trained, tiny_model_dir, examples):
    assert trained.steps == FAST.epochs and len(trained.losses) == trained.steps
    assert sum(trained.losses[-5:]) / 5 < trained.losses[0] - 0.5
    assert trained.n_examples == 4 and trained.modules == {"greet": 4}
    assert trained.completion_tokens < trained.total_tokens and trained.trainable_params > 0
    files = {p.name for p in trained.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tandem_adapter.json"} <= files
    meta = load_adapter_meta(trained.adapter_dir)
    assert meta["base_model"]["identity"] == model_identity(tiny_model_dir)
    assert meta["config"]["learning_rate"] == FAST.learning_rate and meta["seed"] == FAST.seed
    assert {"torch", "transformers", "peft"} <= set(meta["versions"])
    json.dumps(meta)  # plain JSON


def test_same_seed_same_losses(tiny_model_dir, examples, tmp_path):
    cfg = LoRAConfig(rank=4, alpha=8, epochs=2, batch_size=2, learning_rate=1e-2, bf16=False, method="lora")
    a = train_lora(tiny_model_dir, examples, cfg, tmp_path / "a")
    b = train_lora(tiny_model_dir, examples, cfg, tmp_path / "b")
    assert a.losses == b.losses
    with pytest.raises(FileExistsError):
        train_lora(tiny_model_dir, examples, cfg, tmp_path / "a")


def test_adapter_loads_with_peft_and_changes_greedy_output(trained, tiny_model_dir, tokenizer, examples):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = tokenizer(examples[0].prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base.generate(ids, **gen)[0, ids.shape[1]:].tolist()
    tuned = PeftModel.from_pretrained(base, trained.adapter_dir)
    with torch.no_grad():
        after = tuned.generate(ids, **gen)[0, ids.shape[1]:].tolist()
    assert before != after
    assert after[0] == tokenizer(" hello", add_special_tokens=False)["input_ids"][0]


def test_merged_checkpoint_matches_base_plus_adapter(trained, tiny_model_dir, tokenizer, examples, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = merge_adapter(tiny_model_dir, trained.adapter_dir, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()
    assert json.loads((merged_dir / "tandem.json").read_text())["chat"] is True
    ids = tokenizer(examples[1].prompt + " hello", add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, trained.adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_adapter_on_another_base_raises(trained, tiny_model_dir, tmp_path_factory):
    from tandem.lm.models import build_tiny_model

    check_adapter_base(trained.adapter_dir, tiny_model_dir)  # its own base: fine
    other = build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)
    with pytest.raises(AdapterMismatch, match="trained on base model"):
        check_adapter_base(trained.adapter_dir, other)
    with pytest.raises(AdapterMismatch):
        merge_adapter(other, trained.adapter_dir, tmp_path_factory.mktemp("m") / "merged")
