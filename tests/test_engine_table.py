"""The vLLM engine table's bookkeeping (no vLLM: engines are stand-ins; the real reload is in test_vllm)."""

from __future__ import annotations

import json

import pytest

from tandem.lm import vllm as V


class StandIn:
    started: list = []

    def __init__(self, model_dir, options, reuse=None):
        self.model_dir, self.options, self.reused_from = model_dir, options, reuse
        self._closed, self.busy = False, False
        StandIn.started.append(self)

    def idle(self):
        return not self._closed and not self.busy

    def close(self):
        self._closed = True

    def hand_over(self, model_dir):
        self._closed = True
        return StandIn(model_dir, self.options, reuse=self)


def checkpoint(path, hidden=64, tokenizer="tok"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden, "_name_or_path": str(path)}))
    (path / "tokenizer.json").write_text(tokenizer)
    return path


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(V, "_Engine", StandIn)
    monkeypatch.setattr(V, "_engines", {})
    monkeypatch.setattr(V, "MAX_ENGINES", 1)
    monkeypatch.setattr(V, "RELOAD_WEIGHTS", True)
    StandIn.started = []
    return V._engines


def test_same_architecture_reloads_into_the_idle_engine(table, tmp_path):
    base, merged = checkpoint(tmp_path / "base"), checkpoint(tmp_path / "merged")
    a = V._get_engine(base, {"o": 1})
    b = V._get_engine(merged, {"o": 1})
    assert b.reused_from is a and a._closed and list(table.values()) == [b]
    assert V._get_engine(merged, {"o": 1}) is b  # already serving it
    c = V._get_engine(base, {"o": 1})  # and back
    assert c.reused_from is b and len(StandIn.started) == 3


def test_other_architecture_tokenizer_or_options_close_and_start(table, tmp_path):
    base = checkpoint(tmp_path / "base")
    for other, opts in [(checkpoint(tmp_path / "wide", hidden=128), {"o": 1}),
                        (checkpoint(tmp_path / "tok", tokenizer="other"), {"o": 1}),
                        (checkpoint(tmp_path / "same"), {"o": 2})]:
        a = V._get_engine(base, {"o": 1})
        b = V._get_engine(other, opts)
        assert b.reused_from is None and a._closed and list(table.values()) == [b]


def test_a_busy_engine_is_never_closed_for_another(table, tmp_path):
    base, merged = checkpoint(tmp_path / "base"), checkpoint(tmp_path / "merged")
    a = V._get_engine(base, {"o": 1})
    a.busy = True
    b = V._get_engine(merged, {"o": 1})
    assert b.reused_from is None and not a._closed and len(table) == 2  # over the limit while busy
    a.busy = False
    c = V._get_engine(checkpoint(tmp_path / "third"), {"o": 1})
    # back under the limit: the idle ones make room, the oldest is reused
    assert c.reused_from is a and b._closed and list(table.values()) == [c]


def test_reload_can_be_switched_off(table, tmp_path, monkeypatch):
    monkeypatch.setattr(V, "RELOAD_WEIGHTS", False)
    a = V._get_engine(checkpoint(tmp_path / "base"), {"o": 1})
    b = V._get_engine(checkpoint(tmp_path / "merged"), {"o": 1})
    assert b.reused_from is None and a._closed


def test_a_request_that_reaches_a_closed_engine_is_sent_again(monkeypatch):
    """A request queued on an engine that is then closed or handed on fails with EngineClosed;
    VLLM sends it again to the engine that serves its weights now (at most twice)."""
    from concurrent.futures import Future

    from tandem.lm.base import LM, Completion

    class Closed:
        def submit(self, ids, params, lora):
            f = Future()
            f.set_exception(V.EngineClosed("closed"))
            return f

    class Working:
        def submit(self, ids, params, lora):
            f = Future()
            f.set_result(Completion("ok", len(ids), 1))
            return f

    def make(engines):
        lm = object.__new__(V.VLLM)
        LM.__init__(lm, "test", cache=False)
        lm.adapter, lm._lora_request = None, None
        seq = iter(engines)
        monkeypatch.setattr(lm, "engine", lambda: next(seq))
        return lm

    fut = Future()
    make([Closed(), Closed(), Working()])._submit([1, 2], None, fut, None, retries=2)
    assert fut.result(timeout=10).text == "ok"

    fut = Future()
    make([Closed(), Closed(), Closed()])._submit([1, 2], None, fut, None, retries=2)
    with pytest.raises(V.EngineClosed):
        fut.result(timeout=10)

    monkeypatch.setattr(V, "_aborted", type("E", (), {"is_set": staticmethod(lambda: True)})())
    fut = Future()
    make([Closed(), Working()])._submit([1, 2], None, fut, None, retries=2)
    with pytest.raises(V.EngineClosed):  # shutting down: no second try
        fut.result(timeout=10)
