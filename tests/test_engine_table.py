"""The vLLM engine pool's bookkeeping (no vLLM: engines are stand-ins; the real reload is in test_vllm)."""

from __future__ import annotations

import json
from concurrent.futures import Future

import pytest

from tandem.lm import vllm as V
from tandem.lm.protocol import Completion
from tandem.lm.vllm_pool import EngineGroup, EnginePool


class StandIn:
    started: list = []

    def __init__(self, model_dir, options, reuse=None, *, start_timeout=None, stop=None):
        self.model_dir, self.options, self.reused_from = model_dir, options, reuse
        self.closed, self.busy = False, False
        self.start_timeout = start_timeout
        StandIn.started.append(self)

    def idle(self):
        return not self.closed and not self.busy

    def close(self):
        self.closed = True

    def hand_over(self, model_dir):
        self.closed = True
        return StandIn(model_dir, self.options, reuse=self)


def checkpoint(path, hidden=64, tokenizer="tok"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden, "_name_or_path": str(path)}))
    (path / "tokenizer.json").write_text(tokenizer)
    return path


@pytest.fixture
def pool():
    StandIn.started = []
    return EnginePool(StandIn, max_engines=1, reload_weights=True)


def table(pool):
    return pool.engines()


def test_same_architecture_reloads_into_the_idle_engine(pool, tmp_path):
    base, merged = checkpoint(tmp_path / "base"), checkpoint(tmp_path / "merged")
    g = EngineGroup()
    a = pool.get(base, {"o": 1}, g)
    b = pool.get(merged, {"o": 1}, g)
    assert b.reused_from is a and a.closed and table(pool) == [b]
    assert pool.get(merged, {"o": 1}, g) is b  # already serving it
    c = pool.get(base, {"o": 1}, g)  # and back
    assert c.reused_from is b and len(StandIn.started) == 3


def test_other_architecture_tokenizer_or_options_close_and_start(pool, tmp_path):
    base = checkpoint(tmp_path / "base")
    g = EngineGroup()
    for other, opts in [(checkpoint(tmp_path / "wide", hidden=128), {"o": 1}),
                        (checkpoint(tmp_path / "tok", tokenizer="other"), {"o": 1}),
                        (checkpoint(tmp_path / "same"), {"o": 2})]:
        a = pool.get(base, {"o": 1}, g)
        b = pool.get(other, opts, g)
        assert b.reused_from is None and a.closed and table(pool) == [b]


def test_a_busy_engine_is_never_closed_for_another(pool, tmp_path):
    base, merged = checkpoint(tmp_path / "base"), checkpoint(tmp_path / "merged")
    g = EngineGroup()
    a = pool.get(base, {"o": 1}, g)
    a.busy = True
    b = pool.get(merged, {"o": 1}, g)
    assert b.reused_from is None and not a.closed and len(table(pool)) == 2  # over the limit while busy
    a.busy = False
    c = pool.get(checkpoint(tmp_path / "third"), {"o": 1}, g)
    # back under the limit: the idle ones make room, the oldest is reused
    assert c.reused_from is a and b.closed and table(pool) == [c]


def test_reload_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_RELOAD_WEIGHTS", "0")
    monkeypatch.setenv("TANDEM_MAX_ENGINES", "1")
    pool = EnginePool(StandIn)  # settings read from the environment when used
    g = EngineGroup()
    a = pool.get(checkpoint(tmp_path / "base"), {"o": 1}, g)
    b = pool.get(checkpoint(tmp_path / "merged"), {"o": 1}, g)
    assert b.reused_from is None and a.closed
    monkeypatch.setenv("TANDEM_MAX_ENGINES", "two")
    with pytest.raises(ValueError, match="TANDEM_MAX_ENGINES"):
        pool.get(checkpoint(tmp_path / "third"), {"o": 1}, g)


def test_release_closes_only_what_no_other_group_owns(tmp_path):
    pool = EnginePool(StandIn, max_engines=3, reload_weights=True)
    base, other = checkpoint(tmp_path / "base"), checkpoint(tmp_path / "other", hidden=128)
    mine, theirs = EngineGroup(), EngineGroup()
    shared = pool.get(base, {"o": 1}, mine)
    assert pool.get(base, {"o": 1}, theirs) is shared
    own = pool.get(other, {"o": 1}, mine)
    pool.release(mine)
    assert own.closed and not shared.closed and table(pool) == [shared]
    pool.release(theirs)
    assert shared.closed and table(pool) == []


def test_start_timeout_reaches_the_engine(tmp_path, monkeypatch):
    pool = EnginePool(StandIn, max_engines=3, reload_weights=True)
    g = EngineGroup()
    assert pool.get(checkpoint(tmp_path / "a"), {"o": 1}, g, start_timeout=7.0).start_timeout == 7.0
    monkeypatch.setenv("TANDEM_ENGINE_START_TIMEOUT", "42")
    assert pool.get(checkpoint(tmp_path / "b"), {"o": 1}, g).start_timeout == 42.0
    monkeypatch.setenv("TANDEM_ENGINE_START_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="TANDEM_ENGINE_START_TIMEOUT: expected a positive number"):
        pool.get(checkpoint(tmp_path / "c"), {"o": 1}, g)


class Closed:
    def submit_many(self, items):
        return [self.submit(*item) for item in items]

    def submit(self, ids, params, lora):
        f = Future()
        f.set_exception(V.EngineClosed("closed"))
        return f


class Working:
    def submit_many(self, items):
        return [self.submit(*item) for item in items]

    def submit(self, ids, params, lora):
        f = Future()
        f.set_result(Completion("ok", len(ids), 1))
        return f


def test_a_request_that_reaches_a_closed_engine_is_sent_again(tiny_model_dir, monkeypatch):
    """A request queued on an engine that is then closed or handed on fails with EngineClosed;
    VLLM sends it again to the engine that serves its weights now (at most twice)."""

    def make(engines):
        lm = V.VLLM(tiny_model_dir)
        seq = iter(engines)
        monkeypatch.setattr(lm, "engine", lambda: next(seq))
        return lm

    fut = Future()
    make([Closed(), Closed(), Working()]).send([([1, 2], None, fut)], retries=2)
    assert fut.result(timeout=10).text == "ok"

    fut = Future()
    make([Closed(), Closed(), Closed()]).send([([1, 2], None, fut)], retries=2)
    with pytest.raises(V.EngineClosed):
        fut.result(timeout=10)

    monkeypatch.setattr(V.pool, "aborted", type("E", (), {"is_set": staticmethod(lambda: True)})())
    fut = Future()
    make([Closed(), Working()]).send([([1, 2], None, fut)], retries=2)
    with pytest.raises(V.EngineClosed):  # shutting down: no second try
        fut.result(timeout=10)


def test_with_adapter_shares_the_engine_group_and_only_the_creator_closes(tiny_model_dir, monkeypatch):
    released = []
    monkeypatch.setattr(V.pool, "release", released.append)
    lm = V.VLLM(tiny_model_dir, kv_cache_gb=3, max_model_len=2048)
    copy = lm.with_adapter(None)
    assert copy.engines is lm.engines and copy.chat is lm.chat  # one tokenizer, loaded once
    assert copy.options == lm.options and copy.context_length == 2048
    copy.close()
    assert released == []  # a copy owns no engine
    lm.close()
    assert released == [lm.engines]
    with pytest.raises(TypeError, match="get_lm"):
        V.VLLM(tiny_model_dir, cache=False)
