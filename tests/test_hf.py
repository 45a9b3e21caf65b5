"""The transformers backend on the tiny random model (fast)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tandem.lm.cache import CallCache  # noqa: E402
from tandem.lm.caching import with_cache  # noqa: E402
from tandem.lm.chat import render_completion_text  # noqa: E402
from tandem.lm.hf import HFLM  # noqa: E402
from tandem.lm.protocol import ContextLengthError, LMError, Prompt, Request, SamplingParams  # noqa: E402

PROMPT = Prompt((("system", "Answer briefly."), ("user", "Question: what is two plus two?")), prefix="Answer:")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return HFLM(tiny_model_dir)


def req(lm, extra: str = "", **params) -> Request:
    p = Prompt(PROMPT.messages[:-1] + (("user", PROMPT.messages[-1][1] + extra),), PROMPT.prefix)
    return Request(lm.render(p), SamplingParams(**params), p)


def test_chat_template_applied(lm):
    text = lm.render(PROMPT)
    tok = lm.checkpoint.chat.tokenizer
    msgs = [{"role": r, "content": c} for r, c in PROMPT.messages]
    assert text == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "Answer:"
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\nAnswer:")
    # The template writes BOS (<|im_start|>) itself: exactly one at the start.
    ids = lm.tokenize(text)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_base_model_gets_completion_text(tiny_model_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "tandem.json").write_text(json.dumps({"name": "plain", "chat": False}))
    base = HFLM(plain)
    assert base.checkpoint.chat.chat_template(PROMPT) is None
    assert base.render(PROMPT) == render_completion_text(PROMPT)
    c = base.complete(Request(base.render(PROMPT), SamplingParams(max_tokens=4)))
    assert c.output_tokens == 4


def test_greedy_deterministic(lm):
    r = req(lm, max_tokens=12)
    a, b = lm.complete(r), lm.complete(r)
    assert a.text == b.text and a.text
    assert a.finish_reason == "length" and a.output_tokens == 12


def test_batch_matches_single(lm, tiny_model_dir):
    # Different lengths, so the batch is left-padded; greedy and seeded sampling.
    reqs = [req(lm, " x" * i, max_tokens=10) for i in range(4)]
    reqs += [req(lm, " y" * i, max_tokens=10, temperature=1.0, seed=i) for i in range(4)]
    batched = lm.generate(reqs)  # the dispatcher hands them over together
    single = HFLM(tiny_model_dir, batch_size=1)
    assert single.checkpoint is lm.checkpoint  # one loaded model per checkpoint and dtype
    alone = [single.complete(r) for r in reqs]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.output_tokens for c in batched] == [c.output_tokens for c in alone]


def test_seeded_sampling_reproducible(lm):
    r = req(lm, max_tokens=16, temperature=1.0, seed=7)
    a, b = lm.complete(r), lm.complete(r)
    assert a.text == b.text
    other = lm.complete(req(lm, max_tokens=16, temperature=1.0, seed=8))
    assert other.text != a.text
    # The same seed in a busy batch still gives the same text.
    crowd = [req(lm, " z" * i, max_tokens=16, temperature=1.0, seed=100 + i) for i in range(3)]
    outs = lm.generate(crowd[:1] + [r] + crowd[1:])
    assert outs[1].text == a.text


def test_stop_strings(lm):
    # A random model sampled at temperature 1 writes varied text; stop on a
    # piece of its middle and the same seed must end right before it.
    full = lm.complete(req(lm, max_tokens=24, temperature=1.0, seed=3))
    assert len(full.text) > 12
    stop = full.text[8:11]
    cut = lm.complete(req(lm, max_tokens=24, temperature=1.0, seed=3, stop=(stop, "never-there")))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    assert 1 <= cut.output_tokens < full.output_tokens


def test_eos_stops(lm):
    from tandem.lm.hf import Row

    lm.start()
    eos = next(iter(lm.checkpoint.eos_ids))
    row = Row([1, 2, 3], max_new=10, temperature=0.0, stop=(), generator=None, out=[])
    assert lm.advance(row, eos)
    assert row.finish == "stop" and row.text == "" and len(row.out) == 1


def test_token_counts(lm):
    r = req(lm, max_tokens=5)
    c = lm.complete(r)
    assert c.prompt_tokens == len(lm.tokenize(r.text)) == lm.count_tokens(r.text)
    assert c.output_tokens == 5
    counted = with_cache(lm, None)
    counted.complete(req(lm, max_tokens=3))
    assert counted.usage.output_tokens == 3 and counted.usage.calls == 1


def test_context_length(tiny_model_dir):
    lm = HFLM(tiny_model_dir)
    lm.context_length = 60  # per object; the shared model is untouched
    short = req(lm, max_tokens=50)
    n = len(lm.tokenize(short.text))
    assert n < 60
    too_long = req(lm, " word" * 80, max_tokens=5)
    with pytest.raises(ContextLengthError):
        lm.complete(too_long)
    # Submitted together from several threads: only the long one fails, and
    # max_tokens is capped to what is left of the window.
    results: dict = {}

    def run(i, r):
        try:
            results[i] = lm.complete(r)
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate([short, too_long, short])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[1], ContextLengthError)
    assert results[0].output_tokens == results[2].output_tokens == 60 - n
    assert results[0].finish_reason == "length"
    # A batch that reaches generate_batch directly fails as a whole (the
    # dispatcher then runs its requests one by one).
    with pytest.raises(ContextLengthError):
        lm.generate_batch([short, too_long])


def test_call_cache(tiny_model_dir, tmp_path):
    lm = with_cache(HFLM(tiny_model_dir), CallCache(tmp_path / "calls.sqlite"))
    r = req(lm, max_tokens=6)
    a, b = lm.complete(r), lm.complete(r)
    assert not a.cached and b.cached and a.text == b.text


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)  # random B: the adapter changes the outputs
    peft_model = get_peft_model(model, cfg)
    out = tmp_path_factory.mktemp("adapter") / "a1"
    peft_model.save_pretrained(out)
    return out


def test_with_adapter(lm, tiny_model_dir, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = req(lm, max_tokens=8, temperature=1.0, seed=1)
    base_text = lm.complete(r).text
    tuned = lm.with_adapter(adapter_dir)
    assert tuned.checkpoint is lm.checkpoint
    assert tuned.fingerprint() != lm.fingerprint() and tuned.fingerprint().startswith(lm.fingerprint())
    assert HFLM(tiny_model_dir, adapter=str(adapter_dir)).fingerprint() == tuned.fingerprint()
    tuned_text = tuned.complete(r).text
    assert tuned_text != base_text
    assert lm.complete(r).text == base_text  # the base LM still runs without the adapter

    # Same greedy tokens as peft on its own copy of the model.
    g = req(lm, max_tokens=8)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    ids = torch.tensor([lm.tokenize(g.text)])
    with torch.inference_mode():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    expect = lm.checkpoint.chat.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert tuned.complete(g).text == expect

    tuned.close()
    assert lm.complete(r).text == base_text
    with pytest.raises(LMError):
        tuned.complete(g)


def test_adapter_for_other_base_refused(lm, adapter_dir, tmp_path):
    from tandem.lm.identity import AdapterMismatch

    other = tmp_path / "other"
    shutil.copytree(adapter_dir, other)
    (other / "tandem_adapter.json").write_text(json.dumps({
        "format": "tandem-adapter", "version": 1,
        "base_model": {"name": "elsewhere", "path": "/nowhere", "identity": "0" * 16},
    }))
    with pytest.raises(AdapterMismatch):
        lm.with_adapter(other)
