"""The SQLite call cache: hits, keys, concurrency, switch-off."""

from __future__ import annotations

import threading

from tandem.lm import FakeLM, Request, SamplingParams
from tandem.lm.cache import CallCache, default_cache


def test_hits_skip_the_engine_and_keys_include_fingerprint(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    lm = FakeLM("hello")
    lm.cache = cache
    a = lm.complete(Request("p1"))
    b = lm.complete(Request("p1"))
    assert not a.cached and b.cached and b.text == "hello"
    assert len(lm.prompts) == 1
    adapted = lm.with_adapter("ad1")
    adapted.cache = cache
    adapted.complete(Request("p1"))  # another fingerprint: a miss
    assert len(adapted.prompts) == 1
    lm.complete(Request("p1", SamplingParams(max_tokens=7)))  # other params: a miss
    assert len(lm.prompts) == 2
    assert lm.usage.cached_calls == 1


def test_sampling_without_seed_is_not_cached(tmp_path):
    lm = FakeLM("x")
    lm.cache = CallCache(tmp_path / "c.sqlite")
    for _ in range(2):
        lm.complete(Request("p", SamplingParams(temperature=0.7)))
    assert len(lm.prompts) == 2
    for _ in range(2):
        lm.complete(Request("p", SamplingParams(temperature=0.7, seed=3)))
    assert len(lm.prompts) == 3


def test_concurrent_writers_and_a_second_process_view(tmp_path):
    path = tmp_path / "c.sqlite"
    lm = FakeLM(lambda t: t.upper())
    lm.cache = CallCache(path)
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
