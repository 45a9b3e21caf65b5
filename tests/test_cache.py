"""The SQLite call cache and the wrapper that puts any LM behind it: hits, keys, concurrency, switch-off."""

from __future__ import annotations

import threading

import pytest

from tandem.lm import FakeLM, Request, SamplingParams, TrainableLM
from tandem.lm.cache import CallCache, default_cache
from tandem.lm.caching import CachedLM, with_cache
from tandem.lm.registry import get_lm, register_backend


def test_hits_skip_the_backend_and_keys_include_fingerprint(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    fake = FakeLM("hello")
    lm = with_cache(fake, cache)
    a = lm.complete(Request("p1"))
    b = lm.complete(Request("p1"))
    assert not a.cached and b.cached and b.text == "hello"
    assert len(fake.prompts) == 1
    adapted = lm.with_adapter("ad1")
    assert adapted.cache is cache and isinstance(adapted, TrainableLM)
    adapted.complete(Request("p1"))  # another fingerprint: a miss
    assert len(adapted.inner.prompts) == 1
    lm.complete(Request("p1", SamplingParams(max_tokens=7)))  # other params: a miss
    assert len(fake.prompts) == 2
    assert lm.usage.cached_calls == 1 and lm.usage.calls == 3


def test_sampling_without_seed_is_not_cached(tmp_path):
    fake = FakeLM("x")
    lm = with_cache(fake, CallCache(tmp_path / "c.sqlite"))
    for _ in range(2):
        lm.complete(Request("p", SamplingParams(temperature=0.7)))
    assert len(fake.prompts) == 2
    for _ in range(2):
        lm.complete(Request("p", SamplingParams(temperature=0.7, seed=3)))
    assert len(fake.prompts) == 3


def test_concurrent_writers_and_a_second_process_view(tmp_path):
    path = tmp_path / "c.sqlite"
    lm = with_cache(FakeLM(lambda t: t.upper()), CallCache(path))
    threads = [threading.Thread(target=lambda i=i: [lm.complete(Request(f"p{i}-{j}")) for j in range(20)]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other = CallCache(path)  # a separate connection sees every row
    assert len(other) == 160


def test_switch_off(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    monkeypatch.setenv("TANDEM_CACHE", "0")
    assert default_cache() is None
    monkeypatch.setenv("TANDEM_CACHE", "1")
    assert default_cache().path == tmp_path / "calls.sqlite"


def test_get_lm_wraps_every_backend_once_and_errors_are_not_cached(tmp_path, monkeypatch):
    calls = []

    def reply(text):
        calls.append(text)
        if "boom" in text:
            raise RuntimeError("backend failed")
        return "ok"

    register_backend("cachetest", lambda model, **kw: FakeLM(reply, name=model))
    lm = get_lm("cachetest:m", cache=CallCache(tmp_path / "c.sqlite"))
    assert isinstance(lm, CachedLM) and isinstance(lm, TrainableLM) and lm.name == "m"
    assert with_cache(lm, None).inner is lm.inner  # re-wrapped, not nested
    for _ in range(2):
        with pytest.raises(RuntimeError, match="backend failed"):
            lm.complete(Request("boom"))
    assert calls == ["boom", "boom"]  # a failure is asked again, never served from the cache
    assert lm.complete(Request("fine")).text == lm.complete(Request("fine")).text == "ok"
    assert calls.count("fine") == 1
    monkeypatch.setenv("TANDEM_CACHE", "0")
    assert get_lm("cachetest:m").cache is None and get_lm("cachetest:m", cache=False).cache is None


def test_a_backend_without_the_protocol_is_refused():
    register_backend("notanlm", lambda model, **kw: object())
    with pytest.raises(TypeError, match="lacks the LM protocol"):
        get_lm("notanlm:m")


def test_a_batch_call_hands_its_misses_to_the_backend_together(tmp_path):
    """generate(): hits come from the cache, the misses reach the backend in one submit_many call."""
    cache = CallCache(tmp_path / "c.sqlite")
    fake = FakeLM("hello")
    batches = []
    plain_many = fake.submit_many

    def submit_many(requests):
        batches.append([r.text for r in requests])
        return plain_many(requests)

    fake.submit_many = submit_many
    lm = with_cache(fake, cache)
    lm.complete(Request("p2"))
    out = lm.generate([Request("p1"), Request("p2"), Request("p3")])
    assert [c.cached for c in out] == [False, True, False]
    assert batches == [["p2"], ["p1", "p3"]]


def test_the_vllm_engine_takes_a_batch_as_one_item(tmp_path):
    """Engine.submit_many queues one item, so its requests join the same engine step."""
    import queue

    from tandem.lm.vllm_engine import Engine

    engine = Engine.__new__(Engine)  # only the queue: no vLLM engine started
    engine.closed, engine.model_dir, engine._queue = False, tmp_path, queue.Queue()
    futs = engine.submit_many([([1], None, None), ([2], None, None)])
    assert engine._queue.qsize() == 1 and [item[0] for item in engine._queue.get()] == [[1], [2]]
    assert len(futs) == 2 and not any(f.done() for f in futs)
