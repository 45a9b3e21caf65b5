"""OpenAILM against a scripted OpenAI-compatible server on 127.0.0.1 (fast, no model)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tandem import ChainOfThought, Example, Module
from tandem.evaluate import evaluate
from tandem.lm import LMError, LMUnavailable, Prompt, Request, SamplingParams
from tandem.lm.base import ContextLengthError
from tandem.lm.cache import CallCache
from tandem.lm.caching import with_cache
from tandem.lm.openai import AdapterNotServed, OpenAILM, RequestRejected, ServerUnavailable
from tandem.lm.registry import get_lm


class ScriptedServer:
    """A tiny OpenAI-compatible server whose answers a test scripts.

    ``plan``: actions used one per POST to a completion endpoint, in order,
    before the default answer; ``rule(path, body)`` may return an action for
    any request. An action is a dict: ``status``, ``body`` (a dict, sent as
    JSON, or a str sent as is), ``headers``, ``delay`` (seconds).
    """

    def __init__(self, port: int = 0, models: tuple[str, ...] = ("served-model",)) -> None:
        self.requests: list[tuple[str, dict | None, dict]] = []
        self.models = list(models)
        self.gets = 0
        self.dead = False
        self.plan: list[dict] = []
        self.rule = None
        self.delay = 0.0
        self.reply = lambda body: " the petals are short\nSpecies: setosa"
        self.lora_api = True
        self.loras: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body, headers: dict | None = None) -> None:
                raw = body if isinstance(body, str) else json.dumps(body)
                data = raw.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _drop(self) -> None:
                """A killed server: the connection goes without a reply."""
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def do_GET(self):
                if server.dead:
                    return self._drop()
                server.gets += 1
                if self.path.endswith("/models"):
                    ids = [*server.models, *server.loras]
                    self._send(200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                if server.dead:
                    return self._drop()
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n).decode()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with server._lock:
                    server.requests.append((self.path, body, dict(self.headers)))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body):
                path = self.path
                if path.endswith("/load_lora_adapter"):
                    if not server.lora_api:
                        return self._send(404, {"detail": "Not Found"})
                    if body["lora_name"] in server.loras:
                        return self._send(400, {"error": {"message": f"The lora adapter '{body['lora_name']}' has already been loaded."}})
                    server.loras[body["lora_name"]] = body["lora_path"]
                    return self._send(200, "Success: LoRA adapter loaded")
                action = server.rule(path, body) if server.rule else None
                if action is None:
                    with server._lock:
                        action = server.plan.pop(0) if server.plan else {}
                time.sleep(action.get("delay", server.delay))
                if server.dead:
                    return self._drop()
                if "status" in action and action["status"] != 200 or "body" in action:
                    return self._send(action.get("status", 200), action.get("body", ""), action.get("headers"))
                model = body.get("model")
                if model not in (*server.models, *server.loras):
                    return self._send(404, {"error": {"message": f"The model `{model}` does not exist."}})
                text = server.reply(body)
                usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
                if path.endswith("/chat/completions"):
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                elif path.endswith("/completions"):
                    choice = {"index": 0, "text": text, "finish_reason": "length"}
                else:
                    return self._send(404, {"error": "not found"})
                self._send(200, {"id": "x", "object": "completion", "model": model, "choices": [choice], "usage": usage})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def posts(self, suffix: str = "completions") -> list[dict]:
        return [b for p, b, _ in self.requests if p.endswith(suffix)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kill(self) -> None:
        """As SIGKILL: requests in flight and on open connections get no reply, new connections are refused."""
        self.dead = True
        self.close()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def _lm(server, **kw):
    kw.setdefault("backoff", 0.01)
    return OpenAILM("served-model", base_url=server.url, **kw)


PROMPT = Prompt((("system", "Classify."), ("user", "Sepal length: 5.1")), prefix="Reasoning:")


def test_completions_endpoint_sends_the_rendered_text(server):
    lm = _lm(server, endpoint="completions", api_key="sk-test")
    text = lm.render(PROMPT)
    c = lm.complete(Request(text, SamplingParams(max_tokens=20, stop=("\n\n",), seed=3), PROMPT))
    assert c.text == server.reply({})
    assert (c.prompt_tokens, c.output_tokens, c.finish_reason) == (11, 7, "length")
    (path, body, headers), = server.requests
    assert path == "/v1/completions"
    assert body["prompt"] == text and text.endswith("Reasoning:")
    assert body["model"] == "served-model" and body["max_tokens"] == 20
    assert body["temperature"] == 0.0 and body["stop"] == ["\n\n"] and body["seed"] == 3
    assert headers["Authorization"] == "Bearer sk-test"


def test_chat_endpoint_continues_the_assistant_prefix(server):
    lm = _lm(server)  # no local model: chat is the default
    assert lm.endpoint == "chat"
    c = lm.complete(Request(lm.render(PROMPT), SamplingParams(max_tokens=8), PROMPT))
    assert c.text == server.reply({})
    body = server.posts("chat/completions")[0]
    assert body["messages"] == [
        {"role": "system", "content": "Classify."}, {"role": "user", "content": "Sepal length: 5.1"},
        {"role": "assistant", "content": "Reasoning:"},
    ]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_chat_prefix_mode_none_strips_a_repeated_prefix(server):
    lm = _lm(server, prefix_mode="none")
    server.reply = lambda body: "Reasoning: short petals\nSpecies: setosa"
    c = lm.complete(Request(lm.render(PROMPT), SamplingParams(), PROMPT))
    assert c.text == " short petals\nSpecies: setosa"
    body = server.posts("chat/completions")[0]
    assert body["messages"][-1]["role"] == "user" and "continue_final_message" not in body


def test_chat_fill_missing_continuation_is_sent_as_a_partial_reply(server):
    """The predictor asks for a missing field with a text-only request; the chat endpoint gets messages."""

    class P(Module):
        def __init__(self):
            self.p = ChainOfThought("x -> y")

        def forward(self, x):
            return self.p(x=x)

    def reply(body):
        last = body["messages"][-1]["content"]
        return " 7" if last.endswith("Y:") else " I think so"

    server.reply = reply
    out = P().set_lm(_lm(server))(x="3")
    assert out.y == "7"
    first, second = server.posts("chat/completions")
    assert first["messages"][-1] == {"role": "assistant", "content": "Reasoning:"}
    assert second["messages"][:-1] == first["messages"][:-1]
    assert second["messages"][-1] == {"role": "assistant", "content": "Reasoning: I think so\nY:"}


def test_chat_request_without_messages_is_a_clear_error(server):
    lm = _lm(server)
    with pytest.raises(LMError, match="endpoint='completions'"):
        lm.complete(Request("just text"))


def test_requests_reach_the_server_in_parallel(server):
    server.delay = 1.0  # long enough that a loaded 2-core CI machine still overlaps them
    lm = _lm(server, max_concurrency=8, endpoint="completions")
    start = time.perf_counter()
    outs = lm.generate([Request(f"prompt {i}") for i in range(16)])
    wall = time.perf_counter() - start
    assert len(outs) == 16 and all(o.text for o in outs)
    assert server.max_in_flight == 8  # all the pool allows, no more
    assert wall < 16 * 1.0 / 2  # two waves of 8, not 16 in a row


def test_concurrent_submits_from_threads_are_not_serialized(server):
    server.delay = 1.0
    lm = _lm(server, endpoint="completions")
    futs = [lm.submit(Request(f"p{i}")) for i in range(20)]
    assert all(f.result().text for f in futs)
    assert server.max_in_flight >= 10  # serialized submits would never exceed 1


def test_retries_429_and_5xx_then_succeeds(server):
    server.plan = [
        {"status": 429, "body": {"error": "slow down"}, "headers": {"Retry-After": "0.3"}},
        {"status": 500, "body": {"error": "boom"}},
        {"status": 200, "body": "{not json"},  # a truncated reply is retried too
    ]
    lm = _lm(server, endpoint="completions")
    start = time.perf_counter()
    c = lm.complete(Request("hello"))
    assert c.text == server.reply({})
    assert len(server.posts()) == 4
    assert time.perf_counter() - start >= 0.3  # Retry-After was honoured


def test_retries_exhausted_names_server_model_prompt_and_status(server):
    server.rule = lambda path, body: {"status": 503, "body": {"error": "overloaded"}}
    lm = _lm(server, endpoint="completions", max_retries=2)
    with pytest.raises(ServerUnavailable) as info:
        lm.complete(Request("Classify this iris flower please"))
    msg = str(info.value)
    assert server.url in msg and "served-model" in msg and "Classify this iris" in msg
    assert "HTTP 503" in msg and "overloaded" in msg and "3 attempts" in msg
    assert isinstance(info.value, LMError) and info.value.status == 503
    assert len(server.posts()) == 3


def test_non_retryable_400_fails_at_once(server):
    server.rule = lambda path, body: {"status": 400, "body": {"error": {"message": "bad temperature"}}}
    lm = _lm(server, endpoint="completions", max_retries=5, backoff=1.0)
    start = time.perf_counter()
    with pytest.raises(RequestRejected, match="HTTP 400.*bad temperature"):
        lm.complete(Request("hello"))
    assert len(server.posts()) == 1 and time.perf_counter() - start < 0.5


def test_context_length_400_is_a_context_error(server):
    msg = "This model's maximum context length is 4096 tokens. However, your prompt contains 5000 input tokens"
    server.rule = lambda path, body: {"status": 400, "body": {"error": {"message": msg}}}
    with pytest.raises(ContextLengthError, match="maximum context length"):
        _lm(server, endpoint="completions").complete(Request("word " * 5000))


def test_timeout_is_retried_then_reported(server):
    server.delay = 1.5
    lm = _lm(server, endpoint="completions", timeout=0.2, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(ServerUnavailable, match=r"timed out after 0.2 s.*2 attempts"):
        lm.complete(Request("hello"))
    assert time.perf_counter() - start < 1.4
    assert len(server.posts()) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_is_a_clear_error_after_retries():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    lm = OpenAILM("m", base_url=url, endpoint="completions", max_retries=2, backoff=0.01)
    with pytest.raises(ServerUnavailable) as info:
        lm.complete(Request("hello"))
    msg = str(info.value)
    assert url in msg and "cannot connect" in msg and "3 attempts" in msg and "is the server running" in msg
    with pytest.raises(ServerUnavailable, match="does not answer"):
        lm.start()


class Iris(Module):
    def __init__(self):
        self.classify = ChainOfThought("petal_length -> species", fill_missing=False)

    def forward(self, petal_length):
        return self.classify(petal_length=petal_length)


def test_evaluate_counts_server_failures_without_crashing(server):
    def rule(path, body):
        if "Petal Length: 9" in json.dumps(body):
            return {"status": 500, "body": {"error": "kaput"}}
        return None

    server.rule = rule
    data = [Example(petal_length=str(i), species="setosa").with_inputs("petal_length") for i in range(10)]
    lm = _lm(server, max_retries=1)
    result = evaluate(Iris().set_lm(lm), data, lambda ex, pred: ex.species == pred.species, num_threads=10)
    assert result.n == 10 and result.failures == {"lm": 1}
    assert result.correct == 9
    bad = next(r for r in result.records if r.failure)
    assert server.url in bad.error and "HTTP 500" in bad.error


def test_evaluate_against_a_dead_server_stops_with_the_error():
    """A server that is down is no example's failure: the evaluation stops instead of scoring 0."""
    url = f"http://127.0.0.1:{_free_port()}/v1"
    lm = OpenAILM("m", base_url=url, max_retries=1, backoff=0.01)
    data = [Example(petal_length=str(i), species="setosa").with_inputs("petal_length") for i in range(40)]
    with pytest.raises(LMUnavailable, match="cannot connect.*is the server running") as info:
        evaluate(Iris().set_lm(lm), data, lambda ex, pred: 1.0, num_threads=4)
    assert isinstance(info.value, ServerUnavailable) and url in str(info.value)


def test_call_cache_hits_skip_the_server(server, tmp_path):
    lm = with_cache(_lm(server, endpoint="completions"), CallCache(tmp_path / "calls.sqlite"))
    a = lm.complete(Request("hello"))
    b = lm.complete(Request("hello"))
    assert not a.cached and b.cached and a.text == b.text
    assert len(server.posts()) == 1
    lm.complete(Request("hello", SamplingParams(temperature=0.7)))  # not deterministic: never cached
    lm.complete(Request("hello", SamplingParams(temperature=0.7)))
    assert len(server.posts()) == 3
    # another model name on the same server is another cache entry
    other = with_cache(OpenAILM("other", base_url=server.url, endpoint="completions"), lm.cache)
    assert other.fingerprint() != lm.fingerprint()


def test_identity_spec_and_registry(server):
    lm = get_lm("openai:served-model", base_url=server.url + "/", cache=False)
    assert isinstance(lm.inner, OpenAILM) and lm.base_url == server.url
    assert lm.spec() == {"backend": "openai", "model": "served-model", "base_url": server.url,
                         "adapter": None, "endpoint": "chat", "local_model": None}
    assert lm.fingerprint() == f"openai:{server.url}:served-model:chat"
    assert lm.model_dir is None
    lm.start()  # the server answers /models
    with pytest.raises(ValueError, match="endpoint"):
        OpenAILM("m", endpoint="responses")


def test_api_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    _lm(server, endpoint="completions").complete(Request("hi"))
    assert server.requests[0][2]["Authorization"] == "Bearer sk-env"


def _fake_adapter(tmp_path, name="adapter", content=b"weights"):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "adapter_model.safetensors").write_bytes(content)
    return d


def test_with_adapter_loads_the_lora_once_and_asks_for_it(server, tmp_path):
    base = _lm(server, endpoint="completions")
    adir = _fake_adapter(tmp_path)
    tuned = base.with_adapter(adir)
    assert re.fullmatch(r"adapter-[0-9a-f]{10}", tuned.model)
    assert tuned.fingerprint() != base.fingerprint() and tuned.base_model == "served-model"
    assert tuned.spec()["adapter"] == str(adir.resolve()) and tuned.spec()["model"] == "served-model"
    tuned.generate([Request(f"p{i}") for i in range(6)])
    loads = server.posts("load_lora_adapter")
    assert loads == [{"lora_name": tuned.model, "lora_path": str(adir.resolve())}]
    assert {b["model"] for b in server.posts("/completions")} == {tuned.model}
    # back to the base model, and a retrained adapter in the same folder is a new name
    assert tuned.with_adapter(None).model == "served-model"
    (adir / "adapter_model.safetensors").write_bytes(b"retrained")
    assert base.with_adapter(adir).model != tuned.model


def test_adapter_is_reloaded_after_a_server_restart(server, tmp_path):
    tuned = _lm(server, endpoint="completions").with_adapter(_fake_adapter(tmp_path))
    tuned.complete(Request("a"))
    server.loras.clear()  # what a restarted server knows
    assert tuned.complete(Request("b")).text
    assert len(server.posts("load_lora_adapter")) == 2


def test_adapter_without_runtime_loading_says_which_flags(server, tmp_path):
    server.lora_api = False
    tuned = _lm(server, endpoint="completions").with_adapter(_fake_adapter(tmp_path))
    with pytest.raises(AdapterNotServed) as info:
        tuned.complete(Request("a"))
    msg = str(info.value)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in msg and "--enable-lora" in msg and "--lora-modules" in msg


def test_adapter_served_by_name(server):
    server.loras["my-lora"] = "/somewhere"
    lm = _lm(server, endpoint="completions", adapter="my-lora")
    assert lm.model == "my-lora" and lm.complete(Request("x")).text
    assert not server.posts("load_lora_adapter")


@pytest.fixture(scope="session")
def transformers_installed():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def test_local_model_renders_the_chat_template_and_counts_tokens(transformers_installed, tiny_model_dir, server):
    AutoTokenizer = transformers_installed.AutoTokenizer

    lm = _lm(server, local_model=tiny_model_dir)
    assert lm.endpoint == "completions" and lm.model_dir == tiny_model_dir
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": r, "content": c} for r, c in PROMPT.messages]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "Reasoning:"
    text = lm.render(PROMPT)
    assert text == want
    assert lm.count_tokens(text) == len(tok.encode(text, add_special_tokens=False))
    lm.complete(Request(text, SamplingParams(), PROMPT))
    body = server.posts()[0]
    assert body["prompt"] == text and body["add_special_tokens"] is False  # the template wrote BOS
    # with a known context window, a prompt that cannot fit never leaves
    small = _lm(server, local_model=tiny_model_dir, context_length=16)
    with pytest.raises(ContextLengthError, match="context window"):
        small.complete(Request(text))
    assert len(server.posts()) == 1


def test_close_then_use_again(server):
    lm = _lm(server, endpoint="completions")
    lm.complete(Request("a"))
    lm.close()
    assert lm.complete(Request("b")).text  # a fresh client and pool
    lm.close()


def test_saved_program_reloads_with_its_server_and_adapter(server, tmp_path):
    """program.json keeps the server's address, endpoint and adapter: load_program needs no lm_options."""
    from tandem.persist import load_program

    class Solve(Module):
        def __init__(self):
            super().__init__()
            self.solve = ChainOfThought("question -> answer")

        def forward(self, question):
            return self.solve(question=question)

    tuned = _lm(server, endpoint="completions").with_adapter(_fake_adapter(tmp_path))
    prog = Solve().set_lm(tuned)
    prog.save(tmp_path / "saved")
    again = load_program(tmp_path / "saved", program=Solve())
    lm = again.solve.lm
    assert isinstance(lm.inner, OpenAILM) and lm.base_url == server.url and lm.endpoint == "completions"
    assert lm.base_model == "served-model" and lm.adapter == (tmp_path / "saved" / "adapters" / "adapter").resolve()
    assert lm.model == tuned.model  # the same adapter bytes: the same served name
    other = load_program(tmp_path / "saved", program=Solve(), lm_options={"base_url": "http://127.0.0.1:9/v1"})
    assert other.solve.lm.base_url == "http://127.0.0.1:9/v1"  # lm_options win
