"""An evaluation that the call cache answers whole starts no engine (#16 item 7).

Fast: the tiny model. The HF case is fake-free; the vLLM case warms the
cache with the transformers backend's replies under the vLLM object's
fingerprint (both render with the same template), then evaluates on a VLLM
whose every request for an engine fails.
"""

from __future__ import annotations

import shutil
import threading

import pytest

from tandem import ChainOfThought, Example, Module
from tandem.evaluate import evaluate
from tandem.lm.cache import CallCache
from tandem.lm.caching import with_cache

pytest.importorskip("torch")
pytest.importorskip("transformers")


class Echo(Module):
    def __init__(self):
        self.p = ChainOfThought("x -> y", max_tokens=8)

    def forward(self, x):
        return self.p(x=x)


DATA = [Example(x=str(i), y=str(i % 3)).with_inputs("x") for i in range(6)]


def metric(ex, pred, trace=None):
    return ex.y == pred.y


def _outcome(result):
    return [(r.prediction, r.failure) for r in result.records], result.usage.calls


def test_cached_evaluation_does_not_load_the_hf_model(tiny_model_dir, tmp_path):
    from tandem.lm.hf import HFLM

    cache = CallCache(tmp_path / "calls.sqlite")
    warm = evaluate(Echo().set_lm(with_cache(HFLM(tiny_model_dir), cache)), DATA, metric, num_threads=6)
    assert warm.usage.calls >= len(DATA) and warm.usage.cached_calls == 0
    # The same weights in another folder: the same fingerprint, a checkpoint not loaded yet.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    cold = HFLM(copy)
    assert cold.checkpoint is not HFLM(tiny_model_dir).checkpoint and not cold.checkpoint.loaded
    again = evaluate(Echo().set_lm(with_cache(cold, cache)), DATA, metric, num_threads=6)
    assert _outcome(again) == _outcome(warm) and again.usage.cached_calls == again.usage.calls
    assert not cold.checkpoint.loaded  # every call came from the cache: no weights were loaded
    cold.complete(cold_request(cold))  # and a new call loads them
    assert cold.checkpoint.loaded


def cold_request(lm):
    from tandem.lm.protocol import Prompt, Request, SamplingParams

    return Request(lm.render(Prompt((("user", "a question the cache has not seen"),))), SamplingParams(max_tokens=2))


def test_cached_evaluation_does_not_start_the_vllm_engine(tiny_model_dir, tmp_path, monkeypatch):
    from tandem.lm.hf import HFLM
    from tandem.lm.vllm import VLLM, pool

    lm = VLLM(tiny_model_dir, dtype="float32")
    hf = HFLM(tiny_model_dir, dtype="float32")
    hf.fingerprint = lm.fingerprint  # the warm-up writes its replies under the vLLM object's key
    cache = CallCache(tmp_path / "calls.sqlite")
    warm = evaluate(Echo().set_lm(with_cache(hf, cache)), DATA, metric, num_threads=6)
    assert warm.usage.calls >= len(DATA) and not warm.failures.get("lm")

    asked = []

    def no_engine(*args, **kw):
        asked.append(args)
        raise AssertionError("an engine was asked for")

    monkeypatch.setattr(pool, "get", no_engine)
    monkeypatch.setattr(pool, "aborted", threading.Event())  # whatever an earlier test's abort() left
    again = evaluate(Echo().set_lm(with_cache(lm, cache)), DATA, metric, num_threads=6)
    assert _outcome(again) == _outcome(warm) and again.usage.cached_calls == again.usage.calls
    assert asked == []
    with pytest.raises(AssertionError, match="an engine was asked for"):  # a call the cache lacks asks for one
        with_cache(lm, cache).complete(cold_request(lm))
