"""Evaluate: concurrency, counted failures, metrics that misbehave; on FakeLM."""

from __future__ import annotations

import pytest

from tandem import ChainOfThought, Example, Module
from tandem.evaluate import MetricError, call_metric, evaluate
from tandem.lm import FakeLM
from tandem.lm.base import BatchedLM, Completion, ContextLengthError, Request


def _data(n):
    return [Example(x=str(i), y=str(i % 3)).with_inputs("x") for i in range(n)]


def _echo_mod3(text):
    x = int(text.rsplit("X: ", 1)[1].split("<")[0])
    if x % 7 == 6:
        return " hmm"  # no Y field, and the follow-up below also fails for these
    return f" because\nY: {x % 3 if x % 5 else 9}"


class Echo(Module):
    def __init__(self):
        self.p = ChainOfThought("x -> y", fill_missing=False)

    def forward(self, x):
        return self.p(x=x)


def metric(ex, pred, trace=None):
    return ex.y == pred.y


def test_scores_and_counts_parse_failures_separately():
    lm = FakeLM(_echo_mod3)
    result = evaluate(Echo().set_lm(lm), _data(35), metric, num_threads=16)
    parse_failed = sum(1 for i in range(35) if i % 7 == 6)
    wrong = sum(1 for i in range(35) if i % 7 != 6 and i % 5 == 0)
    assert result.failures == {"parse": parse_failed}
    assert result.correct == 35 - parse_failed - wrong
    assert result.score == pytest.approx(100 * result.correct / 35)
    assert [r.index for r in result.records] == list(range(35))
    failed = [r for r in result.records if r.failure]
    assert all("no y field" in r.error for r in failed)
    assert result.usage.calls == 35


def test_requests_reach_the_lm_concurrently():
    import time

    lm = FakeLM(lambda t: " ok\nY: 0")
    orig = lm.generate_batch

    def gen(reqs):
        time.sleep(0.05)  # an engine step: requests arriving meanwhile queue up
        return orig(reqs)

    lm.generate_batch = gen
    evaluate(Echo().set_lm(lm), _data(64), metric, num_threads=64)
    assert sum(lm.batches) == 64
    assert max(lm.batches) >= 16, lm.batches  # gathered into batches, not 64 calls in a row


def test_metric_that_raises_or_returns_junk_is_a_counted_failure():
    lm = FakeLM(lambda t: " r\nY: 1")

    def raising(ex, pred, trace=None):
        if ex.x == "3":
            raise KeyError("boom")
        return 1.0

    r = evaluate(Echo().set_lm(lm), _data(6), raising)
    assert r.failures == {"metric": 1} and r.correct == 5
    assert "KeyError" in r.records[3].error

    r = evaluate(Echo().set_lm(lm), _data(2), lambda ex, pred: "yes")
    assert r.failures == {"metric": 2}


def test_call_metric_accepts_two_argument_metrics_and_rejects_nan():
    ex, pred = Example(y="1"), Example(y="1")
    assert call_metric(lambda e, p: e.y == p.y, ex, pred, None) == 1.0
    with pytest.raises(MetricError):
        call_metric(lambda e, p, t=None: float("nan"), ex, pred, None)


class TooLong(BatchedLM):
    context_length = 10

    def __init__(self):
        super().__init__("toolong")

    def fingerprint(self):
        return "x"

    def spec(self):
        return {"backend": "toolong", "model": "toolong", "adapter": None}

    def generate_batch(self, reqs: list[Request]):
        out = []
        for r in reqs:
            n = self.count_tokens(r.text)
            self.check_fits(r, n)
            out.append(Completion(" r\nY: 1", n, 2))
        return out


def test_context_overflow_fails_alone_and_is_counted():
    data = _data(3) + [Example(x="x" * 2000, y="0").with_inputs("x")]

    class Short(TooLong):
        context_length = 200

    r = evaluate(Echo().set_lm(Short()), data, metric)
    assert r.failures == {"context": 1}
    assert r.records[3].failure == "context"
    assert r.records[0].failure is None
    with pytest.raises(ContextLengthError, match="context window"):
        Short().complete(Request("y" * 2000))
