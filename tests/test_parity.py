"""HF transformers and vLLM give the same greedy outputs on the embedded model.

Both backends see the same prompts: rendered by real ChainOfThought
predictors on Iris measurements (zero-shot and with two demos) and on a few
open questions, tokenized to the same ids (the chat template writes SmolLM2's
BOS ``<|im_start|>`` itself, so neither backend adds special tokens), and run
greedily, some also with a stop string.

Dtype: compare in float32 on both. vLLM's CPU backend defaults to bfloat16
(and so does ``tandem.lm.vllm.VLLM``); in bfloat16 the two engines' kernels
round differently and near-tied tokens flip. Measured here on these 28
prompts: float32, 28 of 28 identical (token counts too); bfloat16, 22 of 28
(20 of 28 with HF run one prompt at a time: HF bfloat16 itself changed 3 of
28 answers with the batch's padding).
"""

from __future__ import annotations

import dataclasses

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("torch")
pytest.importorskip("vllm")

import tandem  # noqa: E402
from tandem.lm.base import Request  # noqa: E402


class Classify(tandem.Signature):
    """Classify the iris flower from its measurements."""

    sepal_length: str = tandem.InputField(desc="in cm")
    sepal_width: str = tandem.InputField(desc="in cm")
    petal_length: str = tandem.InputField(desc="in cm")
    petal_width: str = tandem.InputField(desc="in cm")
    species: str = tandem.OutputField(desc="setosa, versicolor or virginica")


KEYS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS = [(5.1, 3.5, 1.4, 0.2), (7.0, 3.2, 4.7, 1.4), (6.3, 3.3, 6.0, 2.5), (4.9, 3.0, 1.4, 0.2),
        (6.4, 3.2, 4.5, 1.5), (5.8, 2.7, 5.1, 1.9), (5.7, 2.8, 4.1, 1.3), (7.2, 3.6, 6.1, 2.5)]
DEMOS = [
    dict(zip(KEYS, ["5.0", "3.4", "1.5", "0.2"]), reasoning="Short, narrow petals mean setosa.",
         species="setosa"),
    dict(zip(KEYS, ["6.7", "3.0", "5.2", "2.3"]), reasoning="Long, wide petals mean virginica.",
         species="virginica"),
]

QUESTIONS = [
    "Why do irises have three petals?", "Write a short poem about a virginica iris.",
    "How do botanists tell setosa from versicolor?", "List five facts about the iris dataset.",
]


def iris_requests(lm) -> list[Request]:
    zero = tandem.ChainOfThought(Classify, max_tokens=64)
    few = tandem.ChainOfThought(Classify, max_tokens=64)
    few.demos = [dict(d) for d in DEMOS]
    reqs = []
    for cot in (zero, few):
        for row in ROWS:
            reqs.append(cot.request(dict(zip(KEYS, map(str, row))), lm))
    # The small model answers every Iris prompt alike; open questions give
    # longer, varied greedy runs (up to 96 tokens), a stricter comparison.
    qa = tandem.ChainOfThought("question -> answer", max_tokens=96)
    reqs += [qa.request({"question": q}, lm) for q in QUESTIONS]
    # Some again, stopped at the first full stop.
    again = reqs[:4] + reqs[-len(QUESTIONS):]
    reqs += [dataclasses.replace(r, params=dataclasses.replace(r.params, stop=(".",))) for r in again]
    return reqs


@pytest.fixture(scope="module")
def outputs():
    from tandem.lm.hf import HFLM
    from tandem.lm.vllm import VLLM

    # One padded batch of all 28 (HF at batch 8 runs four loops, slower here).
    hf = HFLM("smollm2-135m", dtype="float32", batch_size=32)
    reqs = iris_requests(hf)
    hf_out = hf.generate(reqs)
    # The slow tests' shared engine where this CPU runs float32 anyway (the same
    # options): left running for the tests after this file.
    vl = VLLM("smollm2-135m", dtype="float32")
    assert [r.text for r in iris_requests(vl)] == [r.text for r in reqs]  # same rendering
    assert [vl.tokenize(r.text) for r in reqs] == [hf.tokenize(r.text) for r in reqs]
    return reqs, hf_out, vl.generate(reqs)


def test_same_greedy_outputs(outputs):
    reqs, hf_out, vl_out = outputs
    got = [(c.text, c.finish_reason) for c in hf_out]
    want = [(c.text, c.finish_reason) for c in vl_out]
    mismatched = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatched, f"{len(mismatched)} of {len(reqs)} differ: {mismatched}"
    assert any(c.finish_reason == "stop" and c.text for c in hf_out)


def test_same_token_counts(outputs):
    _, hf_out, vl_out = outputs
    assert [c.prompt_tokens for c in hf_out] == [c.prompt_tokens for c in vl_out]
    assert [c.output_tokens for c in hf_out] == [c.output_tokens for c in vl_out]
