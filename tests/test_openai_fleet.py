"""The openai backend on a fleet of scripted OpenAI-compatible servers on 127.0.0.1 (fast, no model)."""

from __future__ import annotations

import json
import logging
import time

import pytest

from fakes import Mod3, data, metric, read_x
from test_openai import Iris, ScriptedServer, _fake_adapter, _free_port
from tandem import Example
from tandem.evaluate import evaluate
from tandem.lm import LMUnavailable, Request
from tandem.lm.openai import AdapterNotServed, FleetMismatch, OpenAILM, ServersDown
from tandem.lm.openai_fleet import parse_base_urls
from tandem.lm.registry import get_lm
from tandem.optimize import BetterTogether, SplitPlan


@pytest.fixture
def two():
    servers = [ScriptedServer(), ScriptedServer()]
    yield servers
    for s in servers:
        if not s.dead:
            s.close()


def _fleet(servers, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("endpoint", "completions")
    return OpenAILM("served-model", base_url=[s.url for s in servers], **kw)


def _answered(lm) -> dict[str, int]:
    return {s["url"]: s["answered"] for s in lm.servers()}


def test_base_url_forms_and_identity(two):
    a, b = two
    assert parse_base_urls(f" {a.url}/ , {b.url}") == [a.url, b.url]  # --set base_url=URL1,URL2
    assert parse_base_urls([a.url]) == [a.url]
    with pytest.raises(ValueError, match="twice"):
        parse_base_urls([a.url, a.url + "/"])
    with pytest.raises(ValueError, match="not an http"):
        parse_base_urls(f"{a.url},127.0.0.1:8000/v1")
    lm = _fleet(two)
    again = OpenAILM("served-model", base_url=f"{b.url},{a.url}", endpoint="completions")  # another order
    assert lm.fingerprint() == again.fingerprint()  # whichever server answers, and in any order
    assert lm.fingerprint() != _fleet([a]).fingerprint()  # a fleet does not share entries with one of its servers
    assert lm.spec()["base_url"] == [a.url, b.url] and _fleet([a]).spec()["base_url"] == a.url
    via_registry = get_lm("openai:served-model", base_url=f"{a.url},{b.url}", cache=False)
    assert via_registry.base_urls == [a.url, b.url]


def test_a_saved_program_keeps_its_fleet(two, tmp_path):
    from tandem.persist import load_program

    prog = Mod3().set_lm(_fleet(two))
    prog.save(tmp_path / "saved")
    again = load_program(tmp_path / "saved", program=Mod3()).solve.lm
    assert again.base_urls == [s.url for s in two] and again.fingerprint() == _fleet(two).fingerprint()


def test_requests_go_to_the_server_with_fewest_in_flight(two):
    a, b = two
    a.delay = b.delay = 1.0  # every request is in flight before the first answer
    lm = _fleet(two, max_concurrency=8)
    lm.generate([Request(f"p{i}") for i in range(8)])
    assert len(a.posts()) == 4 and len(b.posts()) == 4
    assert a.max_in_flight == 4 and b.max_in_flight == 4

    # a slow server keeps its requests longer, so it gets fewer
    a.delay, b.delay = 0.6, 0.02
    slow_before, fast_before = len(a.posts()), len(b.posts())
    outs = lm.generate([Request(f"q{i}") for i in range(30)])
    assert len(outs) == 30 and all(o.text for o in outs)
    slow, fast = len(a.posts()) - slow_before, len(b.posts()) - fast_before
    assert slow + fast == 30 and fast > 2 * slow, (slow, fast)
    assert sum(_answered(lm).values()) == 38


def test_a_server_killed_mid_batch_loses_nothing_and_counts_nothing_twice(two, caplog):
    a, b = two
    a.delay = b.delay = 0.3
    lm = get_lm("openai:served-model", base_url=[a.url, b.url], endpoint="completions", backoff=0.01, cache=False)
    rows = [Example(petal_length=str(i), species="setosa").with_inputs("petal_length") for i in range(40)]
    a.rule = lambda path, body: (a.kill() if len(a.posts()) == 6 else None)  # dies with requests in flight

    with caplog.at_level(logging.WARNING, logger="tandem.lm.openai_fleet"):
        result = evaluate(Iris().set_lm(lm), rows, lambda ex, pred: ex.species == pred.species, num_threads=8)
    assert result.n == 40 and result.failures == {} and result.correct == 40  # every example answered
    assert result.usage.calls == 40  # one completion per example, however often it was sent
    assert (result.usage.prompt_tokens, result.usage.output_tokens) == (40 * 11, 40 * 7)
    answered = _answered(lm)
    assert sum(answered.values()) == 40
    assert answered[a.url] < len(a.posts())  # requests were in flight on a when it died ...
    assert len(a.posts()) + len(b.posts()) > 40  # ... and were sent again, to b
    stats = {s["url"]: s for s in lm.servers()}
    assert not stats[a.url]["in_service"] and stats[b.url]["in_service"]
    assert any(a.url in r.message and "taken out" in r.message for r in caplog.records)


def test_a_server_that_comes_back_is_readmitted_after_its_cooldown(two):
    a, b = two
    lm = _fleet(two, cooldown=4.0, max_concurrency=2)
    port = a.port
    b.delay = 0.1
    a.kill()
    t0 = time.monotonic()
    lm.generate([Request(f"p{i}") for i in range(10)])
    taken_out = time.monotonic()  # at the latest
    assert _answered(lm)[b.url] == 10
    back = ScriptedServer(port=port)  # restarted on the same address
    back.delay = 0.1
    try:
        lm.generate([Request(f"q{i}") for i in range(10)])
        assert time.monotonic() - t0 < 4.0, "too slow to test the cool-down"
        assert not back.posts() and back.gets == 0  # still cooling down: not even checked
        time.sleep(max(0.0, 4.2 - (time.monotonic() - taken_out)))
        lm.generate([Request(f"r{i}") for i in range(10)])
        assert back.gets >= 1  # checked (GET /models) before it got requests again
        assert len(back.posts()) >= 3
        assert all(s["in_service"] for s in lm.servers())
    finally:
        back.close()


def test_servers_of_different_models_are_an_error_at_start(two):
    a, b = two
    b.models = ["another-model"]
    lm = _fleet(two)
    with pytest.raises(FleetMismatch) as info:
        lm.start()
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{a.url} serves ['served-model']" in msg and f"{b.url} serves ['another-model']" in msg
    # without start(), the fleet's first request says the same, before any completion is sent
    with pytest.raises(FleetMismatch, match="another-model"):
        _fleet(two).complete(Request("x"))
    assert not a.posts() and not b.posts()


def test_one_silent_server_at_start_is_taken_out(two, caplog):
    a, _ = two
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    lm = OpenAILM("served-model", base_url=[dead, a.url], endpoint="completions", max_retries=1, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="tandem.lm.openai_fleet"):
        lm.start()
    assert any(dead in r.message and "taken out" in r.message for r in caplog.records)
    assert lm.complete(Request("x")).text and _answered(lm) == {dead: 0, a.url: 1}


def test_every_server_down_is_a_clear_error_after_the_retries():
    urls = [f"http://127.0.0.1:{_free_port()}/v1" for _ in range(2)]
    lm = OpenAILM("served-model", base_url=urls, endpoint="completions", max_retries=2, backoff=0.01)
    with pytest.raises(ServersDown) as info:
        lm.complete(Request("Classify this iris"))
    msg = str(info.value)
    assert isinstance(info.value, LMUnavailable)
    assert "every server of the fleet is out after 3 attempts" in msg and all(u in msg for u in urls)
    assert "cannot connect" in msg and "Classify this iris" in msg
    with pytest.raises(ServersDown, match="no server of the fleet answers"):
        lm.start()


def test_an_adapter_is_loaded_on_every_server_before_it_is_used(two, tmp_path):
    a, b = two
    tuned = _fleet(two).with_adapter(_fake_adapter(tmp_path))
    tuned.complete(Request("first"))
    for s in two:  # both loaded it, though only one answered the first request
        assert [x["lora_name"] for x in s.posts("load_lora_adapter")] == [tuned.model]
    tuned.generate([Request(f"p{i}") for i in range(10)])
    assert {x["model"] for s in two for x in s.posts("/completions")} == {tuned.model}
    assert len(a.posts("/completions")) > 0 and len(b.posts("/completions")) > 0
    assert all(len(s.posts("load_lora_adapter")) == 1 for s in two)  # once per server


def test_a_server_that_cannot_load_the_adapter_is_taken_out_for_it(two, tmp_path, caplog):
    a, b = two
    b.lora_api = False
    base = _fleet(two)
    tuned = base.with_adapter(_fake_adapter(tmp_path))
    with caplog.at_level(logging.WARNING, logger="tandem.lm.openai_fleet"):
        tuned.generate([Request(f"p{i}") for i in range(10)])
    assert len(a.posts("/completions")) == 10 and not b.posts("/completions")
    warned = [r.message for r in caplog.records if b.url in r.message]
    assert warned and "cannot serve" in warned[0] and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in warned[0]
    base.generate([Request(f"q{i}") for i in range(4)])  # the base model is still served by both
    assert len(b.posts("/completions")) > 0

    a.lora_api = False  # neither can load another adapter: one error naming both servers
    other = base.with_adapter(_fake_adapter(tmp_path, "other", b"other weights"))
    with pytest.raises(AdapterNotServed) as info:
        other.complete(Request("x"))
    msg = str(info.value)
    assert "no server of the fleet can serve" in msg and a.url in msg and b.url in msg


def _mod3_reply(body: dict) -> str:
    x = read_x(json.dumps(body["messages"]).replace("\\n", "\n"))
    return f" {x} mod 3\nY: {x % 3}"


def test_a_run_stops_when_every_server_is_down_and_resumes_when_one_is_back(two, tmp_path):
    for s in two:
        s.reply = _mod3_reply
    run = tmp_path / "run"
    ports = [s.port for s in two]
    lm = OpenAILM("served-model", base_url=[s.url for s in two], max_retries=1, backoff=0.01, cooldown=0.2)

    def kill_after_step_1(rec):
        if rec.index == 1:
            for s in two:
                s.kill()

    opt = BetterTogether(metric, strategy="p -> p", splits=SplitPlan(10, 20), run_dir=run, num_threads=4)
    with pytest.raises(LMUnavailable, match="every server of the fleet is out"):
        opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(6, 40), on_step=kill_after_step_1)
    assert (run / "steps" / "00-start" / "record.json").exists() and (run / "steps" / "01-p" / "record.json").exists()
    assert not (run / "steps" / "02-p" / "record.json").exists()
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["status"] == "failed" and "every server of the fleet is out" in history[-1]["detail"]

    back = ScriptedServer(port=ports[1])  # one server is back
    back.reply = _mod3_reply
    try:
        opt = BetterTogether(metric, strategy="p -> p", splits=SplitPlan(10, 20), run_dir=run, num_threads=4)
        lm = OpenAILM("served-model", base_url=[s.url for s in two], max_retries=1, backoff=0.01, cooldown=0.2)
        res = opt.compile(Mod3().set_lm(lm), trainset=data(30), valset=data(6, 40), resume=True)
        assert res.extra["reused_steps"] == [0, 1] and len(res.history) == 3
        assert res.history[2].status == "ok" and back.posts("chat/completions")
    finally:
        back.close()


def test_the_cli_says_in_one_line_that_every_server_is_down(tmp_path, capsys):
    from tandem.cli import main

    urls = [f"http://127.0.0.1:{_free_port()}/v1" for _ in range(2)]
    code = main(["optimize", "iris", "--model", "openai:served-model", "--strategy", "p",
                 "--run-dir", str(tmp_path / "run"), "--set", f"backend_options.base_url={urls[0]},{urls[1]}",
                 "--set", "backend_options.max_retries=0"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: no server of the fleet answers") and all(u in errors[0] for u in urls)
    assert "with --resume once a server answers" in err
