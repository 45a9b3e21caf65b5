"""tandem serve: a real uvicorn server on 127.0.0.1 and real HTTP requests, on the scripted FakeLM."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from tandem import ChainOfThought, Module, Predict  # noqa: E402
from tandem.lm import FakeLM  # noqa: E402
from tandem.lm import registry  # noqa: E402
from tandem.serve import create_app, load_for_serving, parse_model_options, program_input_fields  # noqa: E402
from tandem.serve_http import uvicorn_config  # noqa: E402
from tandem.tasks.iris import IrisClassifier  # noqa: E402

FLOWER = {"sepal_length": "5.1", "sepal_width": "3.5", "petal_length": "1.4", "petal_width": "0.2"}


def iris_reply(text: str) -> str:
    """Species from the last 'Petal Length:' in the prompt (the request's, after any demos)."""
    petal = float(re.findall(r"Petal Length: ([\d.]+)", text)[-1])
    species = "setosa" if petal < 2.5 else "versicolor" if petal < 5 else "virginica"
    return f" the petals are {petal} cm long.\nSpecies: {species}"


def slow_iris_reply(text: str) -> str:
    time.sleep(0.15)  # while one batch runs, the other requests queue up behind it
    return iris_reply(text)


@contextmanager
def running(app, http="auto"):
    """uvicorn on a free 127.0.0.1 port in a thread, configured as ``tandem serve`` runs it;
    yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, http=http, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def iris_lm():
    return FakeLM(iris_reply)


@pytest.fixture
def iris_server(iris_lm):
    with running(create_app(IrisClassifier().set_lm(iris_lm), name="iris-test")) as url:
        yield url


def test_health_and_program(iris_server):
    h = httpx.get(f"{iris_server}/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["name"] == "iris-test"
    assert body["program"] == "tandem.tasks.iris:IrisClassifier"
    assert body["model"] == {"backend": "fake", "model": "fake", "adapter": None}
    assert body["adapter"] is None and body["predictors"]["classify"]["backend"] == "fake"

    p = httpx.get(f"{iris_server}/v1/program").json()
    assert [f["name"] for f in p["input_fields"]] == list(FLOWER)
    assert p["input_fields_from"] == "predictor"
    (pred,) = p["predictors"]
    assert pred["name"] == "classify"
    assert [f["name"] for f in pred["outputs"]] == ["reasoning", "species"]
    assert pred["outputs"][1]["choices"] == ["setosa", "versicolor", "virginica"]


def test_predict_returns_the_programs_outputs(iris_server, iris_lm):
    start = time.perf_counter()
    r = httpx.post(f"{iris_server}/v1/predict", json={"inputs": FLOWER})
    elapsed = time.perf_counter() - start
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["outputs"] == {"reasoning": "the petals are 1.4 cm long.", "species": "setosa"}
    assert body["usage"]["calls"] == 1 and body["usage"]["prompt_tokens"] > 0
    assert 0 < body["latency_s"] <= elapsed  # the server's own time, within the client's
    assert "Petal Length: 1.4" in iris_lm.prompts[-1]
    # numbers are scalars too; the prompt shows str(value)
    r = httpx.post(f"{iris_server}/v1/predict", json={"inputs": {**FLOWER, "petal_length": 5.9}})
    assert r.status_code == 200 and r.json()["outputs"]["species"] == "virginica"


@pytest.mark.parametrize("inputs, words", [
    ({k: v for k, v in FLOWER.items() if k != "petal_width"}, "missing input field 'petal_width'"),
    ({**FLOWER, "sepal_length": {"cm": 5.1}}, "input field 'sepal_length' must be a string or a number, not an object"),
    ({**FLOWER, "sepal_length": [5.1]}, "input field 'sepal_length' must be a string or a number, not a list"),
    ({**FLOWER, "sepal_length": None}, "not null"),
    ({**FLOWER, "sepal_length": True}, "not a boolean"),
    ({**FLOWER, "colour": "blue"}, "unknown input field 'colour'"),
])
def test_invalid_inputs_are_422(iris_server, iris_lm, inputs, words):
    r = httpx.post(f"{iris_server}/v1/predict", json={"inputs": inputs})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request"
    assert words in err["message"], err
    assert err["input_fields"] == list(FLOWER)
    assert iris_lm.prompts == []  # the program never ran


@pytest.mark.parametrize("content, words", [
    (b'{"inputs": {"sepal_length": ', "not valid JSON"),
    (b'[1, 2]', "must be a JSON object"),
    (b'{"flower": {}}', "missing 'inputs'"),
    (json.dumps({"inputs": FLOWER, "extra": 1}).encode(), "unknown key 'extra'"),
])
def test_malformed_bodies_are_422(iris_server, content, words):
    r = httpx.post(f"{iris_server}/v1/predict", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("path, key", [("/v1/predict", "inputs"), ("/v1/predict_batch", "items")])
def test_an_empty_body_names_what_to_send(iris_server, iris_lm, path, key):
    r = httpx.post(f"{iris_server}{path}", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request" and "''" not in err["message"]
    assert "empty" in err["message"] and repr(key) in err["message"]
    assert all(name in err["message"] for name in FLOWER), err  # the input fields it expects
    assert err["details"] == [{"field": "", "message": err["message"]}]
    assert err["input_fields"] == list(FLOWER)
    assert iris_lm.prompts == []


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_422(iris_server, iris_lm, number):
    flower = json.dumps(FLOWER).replace('"5.1"', number)
    for path, body in (("/v1/predict", f'{{"inputs": {flower}}}'), ("/v1/predict_batch", f'{{"items": [{flower}]}}')):
        r = httpx.post(f"{iris_server}{path}", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request"
        assert "input field 'sepal_length' must be a finite number" in err["message"], err
        assert err["details"][0]["field"].endswith("sepal_length")
    assert iris_lm.prompts == []


def raw_request(url: str, head: bytes) -> tuple[int, dict, bytes]:
    """Send ``head`` (a request as bytes) on a plain socket; (status, headers, body) of the reply."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    top, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        size, _, rest = body.partition(b"\r\n")
        body = rest[:int(size, 16)]
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("http", ["h11", "httptools"])
@pytest.mark.parametrize("value", [b"abc", b"-5", b"12abc"])
def test_a_malformed_content_length_is_a_json_400(iris_lm, http, value):
    """uvicorn's HTTP parser refuses the request before the app sees it; the reply is JSON anyway."""
    if http == "httptools":
        pytest.importorskip("httptools")
    with running(create_app(IrisClassifier().set_lm(iris_lm)), http=http) as url:
        check_malformed_content_length(url, value)
    assert iris_lm.prompts == []


def check_malformed_content_length(url: str, value: bytes = b"abc") -> None:
    status, headers, body = raw_request(url, b"POST /v1/predict HTTP/1.1\r\nHost: t\r\n"
                                        b"Content-Type: application/json\r\nContent-Length: " + value
                                        + b"\r\n\r\n{}")
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request"
    assert "Content-Length" in err["message"] and value.decode() in err["message"], err
    assert err["details"] == [{"field": "Content-Length", "message": err["message"]}]
    # any other request the parser refuses is JSON too
    status, headers, body = raw_request(url, b"NOT AN HTTP REQUEST\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request"


def test_oversized_bodies_are_413(iris_lm):
    app = create_app(IrisClassifier().set_lm(iris_lm), max_body_bytes=2000)
    big = json.dumps({"inputs": {**FLOWER, "sepal_length": "5" * 4000}}).encode()
    with running(app) as url:
        # declared by Content-Length
        r = httpx.post(f"{url}/v1/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["type"] == "body_too_large" and r.json()["error"]["max_body_bytes"] == 2000
        # chunked: no Content-Length, the body itself is counted
        r = httpx.post(f"{url}/v1/predict", content=(big[i:i + 500] for i in range(0, len(big), 500)),
                       headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        # a small chunked body still gets through
        small = json.dumps({"inputs": FLOWER}).encode()
        r = httpx.post(f"{url}/v1/predict", content=iter([small[:20], small[20:]]),
                       headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
    assert len(iris_lm.prompts) == 1


def test_batch_endpoint_runs_items_together():
    lm = FakeLM(slow_iris_reply)
    items = [{**FLOWER, "petal_length": str(pl)} for pl in (1.0, 1.5, 3.0, 4.0, 4.5, 5.5, 6.0, 6.5)]
    with running(create_app(IrisClassifier().set_lm(lm), max_batch_items=8)) as url:
        r = httpx.post(f"{url}/v1/predict_batch", json={"items": items}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["n_ok"] == 8 and body["n_failed"] == 0
        species = [res["outputs"]["species"] for res in body["results"]]
        assert species == ["setosa"] * 2 + ["versicolor"] * 3 + ["virginica"] * 3  # in request order
        assert all(res["status"] == 200 and res["usage"]["calls"] == 1 for res in body["results"])
        assert sum(lm.batches) == 8 and max(lm.batches) > 1, lm.batches

        too_many = httpx.post(f"{url}/v1/predict_batch", json={"items": items + items[:1]})
        assert too_many.status_code == 422 and "at most 8" in too_many.json()["error"]["message"]
        bad_item = httpx.post(f"{url}/v1/predict_batch", json={"items": [FLOWER, {"sepal_length": "1"}]})
        assert bad_item.status_code == 422
        assert "items.1.sepal_width" in {d["field"] for d in bad_item.json()["error"]["details"]}
        assert httpx.post(f"{url}/v1/predict_batch", json={"items": []}).status_code == 422


def test_concurrent_requests_reach_the_engine_together():
    lm = FakeLM(slow_iris_reply)
    n = 12
    with running(create_app(IrisClassifier().set_lm(lm))) as url:
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(
                lambda i: client.post(f"{url}/v1/predict", json={"inputs": {**FLOWER, "petal_length": f"{1 + i / 2}"}}),
                range(n)))
    assert [r.status_code for r in replies] == [200] * n
    assert sum(lm.batches) == n
    # one at a time would be n batches of 1; 12 x 0.15 s of "engine" time would also be >= 1.8 s
    assert max(lm.batches) > 1, lm.batches
    assert len(lm.batches) < n


def test_parse_error_is_502_with_the_reply():
    lm = FakeLM(" I am not sure.")  # never names a species
    with running(create_app(IrisClassifier().set_lm(lm))) as url:
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/predict", json={"inputs": FLOWER})
        elapsed = time.perf_counter() - start
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["type"] == "parse_error" and err["missing"] == ["species"]
        assert "I am not sure." in err["completion"]
        assert 0 < r.json()["latency_s"] <= elapsed
        assert r.json()["usage"]["calls"] == 3  # the reply, then twice a continuation asking for the species
        # in a batch a failed item is an entry with its status; the others are answered
        batch = httpx.post(f"{url}/v1/predict_batch", json={"items": [FLOWER, FLOWER]}).json()
        assert batch["n_failed"] == 2 and batch["n_ok"] == 0
        assert [res["error"]["type"] for res in batch["results"]] == ["parse_error"] * 2
        assert batch["results"][0]["status"] == 502


def test_a_slow_program_gets_504():
    lm = FakeLM(lambda t: time.sleep(1.0) or " r\nSpecies: setosa")
    with running(create_app(IrisClassifier().set_lm(lm), timeout_s=0.2)) as url:
        r = httpx.post(f"{url}/v1/predict", json={"inputs": FLOWER})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_binding_beyond_loopback_warns(tmp_path, monkeypatch, fake_backend):
    import tandem.serve as serve_mod

    IrisClassifier().set_lm(FakeLM(iris_reply)).save(tmp_path / "p")
    assert serve_mod.is_loopback("127.0.0.1") and serve_mod.is_loopback("::1") and serve_mod.is_loopback("localhost")
    assert not serve_mod.is_loopback("0.0.0.0") and not serve_mod.is_loopback("192.168.1.4")

    def no_bind(host, port):
        raise OSError("not binding in tests")

    monkeypatch.setattr(serve_mod, "bind_socket", no_bind)
    said: list[str] = []
    with pytest.raises(OSError, match="not binding"):
        serve_mod.serve(tmp_path / "p", host="0.0.0.0", info=said.append)
    assert len(said) == 1 and "no authentication" in said[0]
    said.clear()
    with pytest.raises(OSError):
        serve_mod.serve(tmp_path / "p", info=said.append)
    assert said == []


class Exploding(Module):
    def __init__(self):
        self.step = Predict("question -> answer", lm=FakeLM("Answer: 4"))

    def forward(self, question):
        raise RuntimeError("secret at /home/someone/key.txt")


def test_program_exception_is_500_without_traceback():
    with running(create_app(Exploding())) as url:
        r = httpx.post(f"{url}/v1/predict", json={"inputs": {"question": "2+2?"}})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "program_error" and "RuntimeError" in err["message"] and err["request_id"]
        assert "secret" not in r.text and "Traceback" not in r.text
        # unknown routes and methods are JSON errors too
        assert httpx.get(f"{url}/nope").json()["error"]["type"] == "not_found"
        assert httpx.get(f"{url}/v1/predict").status_code == 405


class TwoSteps(Module):
    def __init__(self):
        self.draft = ChainOfThought("question, style -> draft")
        self.polish = Predict("draft -> answer")

    def forward(self, **inputs):
        return self.polish(draft=self.draft(**inputs).draft)


class Declared(TwoSteps):
    input_fields = ("question",)


class Named(TwoSteps):
    def forward(self, question, style="short"):
        return super().forward(question=question, style=style)


def test_program_input_fields_are_derived_and_documented():
    fields, source = program_input_fields(TwoSteps())
    assert ([f.name for f in fields], source) == (["question", "style"], "predictor")  # the first predictor
    fields, source = program_input_fields(Declared())
    assert ([f.name for f in fields], source) == (["question"], "declared")
    fields, source = program_input_fields(Named())
    assert [(f.name, f.required) for f in fields] == [("question", True), ("style", False)] and source == "forward"
    fields, source = program_input_fields(IrisClassifier())  # forward(**measurements): the predictor's
    assert source == "predictor" and len(fields) == 4


def test_optional_inputs_use_the_programs_default():
    lm = FakeLM(lambda t: " ok\nDraft: d" if "Draft" not in t.split("<|user|>")[-1] else "Answer: done")
    with running(create_app(Named().set_lm(lm))) as url:
        r = httpx.post(f"{url}/v1/predict", json={"inputs": {"question": "why?"}})
        assert r.status_code == 200, r.text
        assert "Style: short" in lm.prompts[0]


@pytest.fixture
def fake_backend():
    """A "fake" backend in the registry, as a plugin would register it; removed afterwards."""
    built: list[dict] = []

    def factory(model, **options):
        built.append({"model": model, **options})
        return FakeLM(iris_reply, name=model)

    registry.register_backend("fake", factory)
    yield built
    registry._BACKENDS.pop("fake", None)


def test_serving_a_saved_run(tmp_path, fake_backend):
    adapter = tmp_path / "trained" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    program = IrisClassifier().set_lm(FakeLM(iris_reply, name="tiny").with_adapter(adapter))
    program.classify.demos = [{**FLOWER, "reasoning": "short petals", "species": "setosa"}]
    program.save(tmp_path / "runs" / "iris-p-s0" / "final")

    loaded, program_dir, name = load_for_serving(tmp_path / "runs" / "iris-p-s0", {"base_url": "http://x"})
    assert program_dir == tmp_path / "runs" / "iris-p-s0" / "final" and name == "iris-p-s0"
    assert fake_backend == [{"model": "tiny", "base_url": "http://x"}]
    assert loaded.classify.lm.cache is None  # get_lm's call cache is off by default
    with running(create_app(loaded, name=name)) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["name"] == "iris-p-s0" and health["model"]["model"] == "tiny"
        assert health["adapter"].endswith("final/adapters/adapter")
        r = httpx.post(f"{url}/v1/predict", json={"inputs": {**FLOWER, "petal_length": "4.2"}})
        assert r.status_code == 200 and r.json()["outputs"]["species"] == "versicolor"
        assert httpx.get(f"{url}/v1/program").json()["predictors"][0]["demos"] == 1

    # a program directory works too, and so does program.json itself
    assert load_for_serving(program_dir)[1] == program_dir
    assert load_for_serving(program_dir / "program.json")[1] == program_dir


def test_parse_model_options():
    assert parse_model_options(["tensor_parallel_size=2", "base_url=http://h:8000/v1", "cache=true",
                                'extra_body={"top_k": 1}']) == {
        "tensor_parallel_size": 2, "base_url": "http://h:8000/v1", "cache": True, "extra_body": {"top_k": 1}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_model_options(["oops"])


def test_cli_serve_help_and_bad_path(capsys, tmp_path):
    from tandem.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("RUN_DIR", "--host", "--port", "--model-options", "--max-body-bytes", "--max-batch"):
        assert flag in out
    assert main(["serve", str(tmp_path / "missing")]) == 2
    (tmp_path / "run").mkdir()
    assert main(["serve", str(tmp_path / "run")]) == 2
    assert "neither program.json nor final/program.json" in capsys.readouterr().err


def test_cli_serve_runs_a_server(tmp_path):
    """`tandem serve RUN_DIR` in a subprocess (a fake backend registered first), queried over HTTP."""
    IrisClassifier().set_lm(FakeLM(iris_reply, name="m")).save(tmp_path / "run" / "final")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_serve import iris_reply
        from tandem.lm import FakeLM
        from tandem.lm.registry import register_backend
        from tandem.cli import main
        register_backend("fake", lambda model, **kw: FakeLM(iris_reply, name=model))
        sys.exit(main(["serve", {str(tmp_path / "run")!r}, "--port", "{port}"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {proc.stdout.read().decode()}")
                time.sleep(0.2)
        assert health.json()["name"] == "run"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": FLOWER})
        assert r.json()["outputs"]["species"] == "setosa"
        check_malformed_content_length(f"http://127.0.0.1:{port}")  # tandem serve's uvicorn answers JSON
    finally:
        proc.terminate()
        proc.wait(20)
    log = proc.stdout.read().decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status is SIGTERM's
    assert proc.returncode in (0, -15, 128 + 15), log
    assert f"on http://127.0.0.1:{port}" in log and "Finished server process" in log
