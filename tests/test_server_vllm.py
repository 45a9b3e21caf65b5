"""tandem against a real vLLM OpenAI-compatible server running the embedded model (slow).

One server process serves the module (started with ``python -m
vllm.entrypoints.openai.api_server`` on a free port of 127.0.0.1, killed with
its process group at the end). The in-process engine runs first, alone, for
the reference outputs, and is shut down before the server starts, so the two
never hold memory at the same time.

The restart test kills the server in the middle of an evaluation and starts
it again with LoRA serving on (``--enable-lora``, runtime loading), which the
adapter test then uses. The fleet test starts one more server like it, makes
the two one fleet (adapters on both, then SIGKILL to the second during an
evaluation) and stops it.
"""

from __future__ import annotations

import threading
import time
import warnings

import pytest

from tandem.evaluate import evaluate
from tandem.lm import LMUnavailable, Request, SamplingParams
from tandem.lm.cache import CallCache
from tandem.lm.caching import with_cache
from tandem.lm.openai import OpenAILM
from tandem.lm.vllm_server import VLLMServer
from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris

pytestmark = pytest.mark.slow
RUN_LAST = True  # stops the shared in-process engine for the server (tests/conftest.py)

MODEL = "smollm2-135m"
N_REF = 4


@pytest.fixture(scope="module")
def iris_dev():
    return split_iris(load_iris(), seed=0)["dev"]


@pytest.fixture(scope="module")
def reference(iris_dev):
    """Greedy outputs of the in-process engine for a few Iris prompts, run one at a time."""
    pytest.importorskip("vllm")
    from tandem.lm.vllm import VLLM, shutdown_engines

    lm = VLLM(MODEL)
    p = IrisClassifier().classify
    reqs = [p.request(ex.inputs(), lm) for ex in iris_dev[:N_REF]]
    outs = [lm.complete(r) for r in reqs]
    shutdown_engines()  # the server gets the memory
    return [(r, o) for r, o in zip(reqs, outs)]


@pytest.fixture(scope="module")
def server(reference, tmp_path_factory):
    s = VLLMServer(MODEL, log=tmp_path_factory.mktemp("vllm-server"), kv_cache_gb=1)
    s.start(timeout=600)
    yield s
    s.stop()


def _lm(server, **kw) -> OpenAILM:
    return OpenAILM(MODEL, base_url=server.url, local_model=MODEL, **kw)


def test_server_greedy_outputs_equal_the_in_process_engine(server, reference):
    lm = _lm(server, max_concurrency=1)
    lm.start()
    for req, want in reference:
        assert lm.render(req.prompt) == req.text  # the same template, byte for byte
        got = lm.complete(req)
        assert got.text == want.text
        assert (got.prompt_tokens, got.output_tokens) == (want.prompt_tokens, want.output_tokens)
        assert got.prompt_tokens == lm.count_tokens(req.text)  # no extra BOS from the server


def test_chat_endpoint_continues_the_prefix(server, reference):
    """The chat endpoint (server-side template, continue_final_message) runs the same prompt.

    Compared with the completions endpoint on a repeat of the same prompt: a
    repeat reuses the server's prefix cache, and bf16 numerics with cached KV
    blocks may differ from a full prefill, so only repeat vs repeat is exact.
    """
    chat = OpenAILM(MODEL, base_url=server.url, endpoint="chat", max_concurrency=1)
    comp = _lm(server, max_concurrency=1)
    req, want = reference[0]
    again = comp.complete(req)
    got = chat.complete(type(req)(chat.render(req.prompt), req.params, req.prompt))
    assert got.prompt_tokens == want.prompt_tokens  # the same prompt tokens as tandem's rendering
    assert got.text == again.text
    if again.text != want.text:
        warnings.warn(f"a repeated greedy prompt (prefix-cache hit) gave another text than the first run: "
                      f"{want.text!r} vs {again.text!r}")


def test_evaluation_and_prompt_step_through_the_server(server, iris_dev):
    from tandem.optimize import RandomSearch

    lm = _lm(server)
    program = IrisClassifier().set_lm(lm)
    result = evaluate(program, iris_dev[:8], iris_metric, num_threads=8)
    # The server answered every call: failures, if any, are the model's unparseable
    # replies (the fp32 model copies the format line zero-shot), never LM errors.
    assert result.n == 8 and set(result.failures) <= {"parse"}, result.failures
    assert result.usage.calls >= 8 and result.usage.output_tokens > 0
    train = split_iris(load_iris(), seed=0)["train"][:6]
    out = RandomSearch(iris_metric, num_candidates=2, num_threads=8).compile(
        program, trainset=train, valset=iris_dev[:6], seed=0
    )
    rec = out.history[0]
    assert rec.kind == "p" and len(rec.extra["candidates"]) == 2
    assert any(c["failed"] < 6 for c in rec.extra["candidates"])  # demos teach the format
    assert rec.usage["calls"] > 0 and rec.usage["output_tokens"] > 0
    assert out.program.predictors()[0].lm is lm  # the chosen program still runs on the server


def test_server_killed_mid_evaluation_loses_no_finished_call(server, iris_dev, tmp_path):
    """Kill -9 during an evaluation: after the retries the evaluation stops with one clear error (a
    server that is down is no example's failure); after a restart, every call that had finished comes
    from the cache and the rest are answered."""
    cache = CallCache(tmp_path / "calls.sqlite")
    lm = with_cache(_lm(server, max_concurrency=2, max_retries=2, backoff=0.3), cache)
    data = iris_dev[8:28]
    program = IrisClassifier().set_lm(lm)
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = evaluate(program, data, iris_metric, num_threads=2)
        except LMUnavailable as exc:
            box["error"] = exc

    th = threading.Thread(target=run)
    th.start()
    t0 = time.monotonic()
    while len(cache) < 4 and th.is_alive() and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    assert th.is_alive(), "evaluation finished before the server could be killed"
    server.kill()
    th.join(timeout=600)
    assert "result" not in box, "the evaluation went on without its server"
    msg = str(box["error"])
    assert server.url in msg and ("cannot connect" in msg or "attempts" in msg), msg
    finished_calls = len(cache)
    assert finished_calls >= 4

    # The adapter test below needs LoRA serving; without prefix caching its
    # repeated greedy requests are exactly reproducible.
    server.start(lora=True, prefix_caching=False)
    second = evaluate(program, data, iris_metric, num_threads=4)
    assert "lm" not in second.failures
    assert second.usage.cached_calls >= finished_calls  # every finished call was a hit


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A random LoRA of the model (r=8 on q_proj and v_proj), saved by peft."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tandem.lm.models import resolve_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adir = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(adir)
    del peft_model, base
    return adir


def test_adapter_served_by_the_server(server, reference, lora_dir):
    """A LoRA folder loaded at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING) answers, and is loaded
    again when the server has lost it (as after a restart)."""
    if server.proc is None:
        pytest.skip("needs the LoRA server of the restart test")
    adir = lora_dir
    lm = _lm(server, max_concurrency=1)  # one at a time: the same batches every time
    tuned = lm.with_adapter(adir)
    # short replies: LoRA requests decode at a few tokens/s on a loaded 2-core CPU
    reqs = [Request(r.text, SamplingParams(max_tokens=24), r.prompt) for r, _ in reference]
    a = [c.text for c in tuned.generate(reqs)]
    b = [c.text for c in tuned.generate(reqs)]
    assert a == b  # greedy, deterministic
    base_texts = [c.text for c in lm.generate(reqs)]
    assert a != base_texts  # the adapter is applied
    if not all(want.text.startswith(t) for (_, want), t in zip(reference, base_texts)):
        warnings.warn("base outputs on the LoRA-enabled server (no prefix caching) differ from the in-process engine")
    assert tuned.model in tuned.served_models()
    import httpx

    r = httpx.post(f"{server.url}/unload_lora_adapter", json={"lora_name": tuned.model}, timeout=30)
    assert r.status_code == 200, r.text
    assert tuned.model not in tuned.served_models()
    assert tuned.complete(reqs[0]).text == a[0]  # 404 -> loaded again -> same answer


def test_fleet_of_two_servers_loads_adapters_everywhere_and_survives_a_kill(server, reference, iris_dev, lora_dir,
                                                                            tmp_path_factory):
    """The module's server and one more (LoRA, no prefix caching, as the module's after its restart) as
    one fleet. An adapter is loaded on both before its first request and answers as on one server.
    Then SIGKILL the second server while it answers a request in the middle of an Iris evaluation:
    that request goes to the first server, every example is answered, and the score equals the
    one-server score (greedy, no call cache; one request at a time on both sides, so every
    request is computed alone, as on one server)."""
    if server.proc is None:
        pytest.skip("needs the LoRA server of the restart test")
    second = VLLMServer(MODEL, log=tmp_path_factory.mktemp("vllm-server-2"), kv_cache_gb=1)
    second.start(lora=True, prefix_caching=False, timeout=900)
    try:
        fleet = OpenAILM(MODEL, base_url=[server.url, second.url], local_model=MODEL, max_concurrency=2)
        fleet.start()  # both serve the model

        tuned = fleet.with_adapter(lora_dir)
        reqs = [Request(r.text, SamplingParams(max_tokens=16), r.prompt) for r, _ in reference[:2]]
        on_fleet = [c.text for c in tuned.generate(reqs)]  # one request on each server
        for url in (server.url, second.url):
            assert tuned.model in tuned.served_models(url)  # loaded on every server
        on_one = [c.text for c in _lm(server, max_concurrency=1).with_adapter(lora_dir).generate(reqs)]
        assert on_fleet == on_one

        data = iris_dev[:16]
        one = evaluate(IrisClassifier().set_lm(_lm(server, max_concurrency=1)), data, iris_metric, num_threads=1)
        assert one.n == 16 and "lm" not in one.failures
        box: dict = {}
        program = IrisClassifier().set_lm(fleet)
        th = threading.Thread(target=lambda: box.update(r=evaluate(program, data, iris_metric, num_threads=1)))
        before = {row["url"]: row["answered"] for row in fleet.servers()}
        th.start()
        t0 = time.monotonic()
        while th.is_alive() and time.monotonic() - t0 < 600:
            row = next(r for r in fleet.servers() if r["url"] == second.url)
            if row["answered"] - before[second.url] >= 2 and row["in_flight"]:
                break
            time.sleep(0.01)
        assert th.is_alive(), "evaluation finished before the server could be killed"
        second.kill()  # with a request in flight
        th.join(timeout=900)
        got = box["r"]
        assert got.n == 16 and "lm" not in got.failures, got.failures  # every example answered
        stats = {row["url"]: row for row in fleet.servers()}
        assert not stats[second.url]["in_service"] and stats[server.url]["in_service"]
        assert stats[second.url]["failures"] >= 1  # the request in flight failed there and was sent again
        assert got.score == one.score
        assert [r.prediction for r in got.records] == [r.prediction for r in one.records]
        assert got.usage.calls == one.usage.calls  # the request sent again is counted once
    finally:
        second.stop()


def test_weight_step_adapter_served_by_the_server_matches_the_in_process_engine(server, reference, iris_dev,
                                                                                   tmp_path):
    """A weight step with the server's LM: tandem trains the LoRA locally (peft), the server
    serves it by name, and its greedy outputs equal the in-process engine's with the same
    adapter (LoRA mode, no prefix caching on either side, one request at a time).

    Runs last: it stops the server before starting the in-process engine."""
    if server.proc is None:
        pytest.skip("needs the LoRA server of the restart test")
    from tandem.lm.vllm import VLLM, shutdown_engines
    from tandem.optimize import BootstrapFinetune
    from tandem.train.lora import LoRAConfig

    lm = _lm(server)
    program = IrisClassifier().set_lm(lm)
    train = split_iris(load_iris(), seed=0)["train"][:8]
    step = BootstrapFinetune(iris_metric, config=LoRAConfig(epochs=1), num_threads=8)
    out = step.compile(program, trainset=train, valset=iris_dev[:4], seed=0, out_dir=tmp_path / "w")
    rec = out.history[0]
    assert rec.kind == "w" and rec.train_examples > 0, rec.detail
    tuned = out.program.predictors()[0].lm
    assert isinstance(tuned, OpenAILM) and tuned.adapter is not None and tuned.base_url == server.url
    assert tuned.model in tuned.served_models()  # loaded at run time, served by name
    adapter = tuned.adapter

    reqs = [Request(r.text, SamplingParams(max_tokens=16), r.prompt) for r, _ in reference[:2]]
    served = [c.text for c in _lm(server, max_concurrency=1).with_adapter(adapter).generate(reqs)]
    server.stop()  # memory and both cores for the in-process engine
    local = VLLM(MODEL, adapter_mode="lora", enable_prefix_caching=False).with_adapter(adapter)
    try:
        in_process = [local.complete(r).text for r in reqs]
    finally:
        shutdown_engines()
    assert served == in_process
