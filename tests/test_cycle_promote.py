"""The improvement cycle (issue #18), promotion side: the gate, rollback, reload, and ``optimize --from``.

Constructed programs on the scripted ``fake:m`` (``cycle_helpers``): the champion calls every
non-setosa a virginica; the challenger, whose instructions say "Mind the versicolors", gets
the versicolors right. On 20 setosas and 2 versicolors the difference is not significant
(exact McNemar p = 0.5); on 20 setosas and 20 versicolors it is.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from cycle_helpers import MARKER, factory, iris_program, tandem_server  # noqa: E402
from fakes import Mod3, one_error_line  # noqa: E402
from tandem.cli import main  # noqa: E402
from tandem.experiments.config import load_config  # noqa: E402
from tandem.experiments.run import run_cell  # noqa: E402
from tandem.lm import FakeLM  # noqa: E402
from tandem.tasks.iris import load_iris  # noqa: E402

ROWS = load_iris()
SETOSAS = [r for r in ROWS if r["species"] == "setosa"]
VERSICOLORS = [r for r in ROWS if r["species"] == "versicolor" and float(r["petal_length"]) < 4.85]


@pytest.fixture(autouse=True)
def fake_backend(monkeypatch):
    import tandem.lm.registry as registry

    monkeypatch.setitem(registry._BACKENDS, "fake", factory)


def write_examples(path: Path, rows, split: str | None = "test") -> Path:
    with open(path, "w") as fh:
        for ex in rows:
            fh.write(json.dumps({"data": dict(ex), "inputs": list(ex.input_keys), "split": split}) + "\n")
    return path


@pytest.fixture
def cycle(tmp_path):
    """A deployment whose champion v1 is a zero-shot iris run on fake:m, a challenger, and two data files."""
    cfg = load_config(task="iris", strategy="zero-shot", sizes=(30, 15, 30), threads=4)
    run_cell(cfg, FakeLM(factory("m")._reply, name="m"), run_dir=tmp_path / "run-champ")
    assert main(["promote", str(tmp_path / "run-champ"), "--init", str(tmp_path / "deploy")]) == 0
    iris_program(careful=True).save(tmp_path / "challenger")
    return {
        "deploy": tmp_path / "deploy", "challenger": tmp_path / "challenger",
        "small": write_examples(tmp_path / "small.jsonl", SETOSAS[:20] + VERSICOLORS[:2]),
        "big": write_examples(tmp_path / "big.jsonl", SETOSAS[:20] + VERSICOLORS[:20]),
    }


def deployment(deploy: Path) -> dict:
    return json.loads((deploy / "deploy.json").read_text())


def promote(c: dict, data: str = "big", *extra: str) -> int:
    return main(["promote", str(c["challenger"]), "--over", str(c["deploy"]), "--data", str(c[data]), *extra])


def test_promotion_is_refused_when_not_significant_and_made_when_it_is(cycle, capsys):
    assert promote(cycle, "small") == 1
    out = capsys.readouterr().out
    assert "refused: the difference is not significant at 0.05 (p = 0.5)" in out
    assert "exact McNemar p = 0.5" in out and "[95% Wilson interval" in out
    doc = deployment(cycle["deploy"])
    assert doc["champion"] == "v1" and doc["stack"] == ["v1"]
    refused = doc["events"][-1]
    assert refused["event"] == "refuse" and refused["decision"] == "refused" and refused["test"]["p_value"] == 0.5
    assert refused["n"] == 22 and refused["split"] == "test" and refused["task"] == "iris"

    assert promote(cycle, "big") == 0
    out = capsys.readouterr().out
    assert "promoted: the challenger is better at p = " in out and "is now v2" in out
    doc = deployment(cycle["deploy"])
    assert doc["champion"] == "v2" and doc["stack"] == ["v1", "v2"]
    rec = doc["events"][-1]
    assert rec["event"] == "promote" and rec["version"] == "v2" and rec["previous"] == "v1"
    assert rec["scores"]["champion"]["score"] == 50.0 and rec["scores"]["challenger"]["score"] == 100.0
    lo, hi = rec["scores"]["champion"]["ci95"]
    assert lo < 50 < hi and rec["scores"]["interval"] == "wilson"
    assert rec["test"]["method"] == "mcnemar-exact" and rec["test"]["p_value"] == pytest.approx(2 * 0.5 ** 20)
    assert rec["test"]["diff_points"] == 50.0 and rec["test"]["challenger_better"] == 20
    import hashlib

    assert rec["data_sha256"] == hashlib.sha256(cycle["big"].read_bytes()).hexdigest()
    assert rec["by"] and rec["time"].endswith("Z") and rec["alpha"] == 0.05
    saved = json.loads((cycle["deploy"] / "versions" / "v2" / "program.json").read_text())
    assert MARKER in saved["predictors"]["classify"]["signature"]["instructions"]


def test_a_stricter_alpha_and_a_guard_can_refuse(cycle, capsys):
    assert promote(cycle, "big", "--alpha", "1e-7") == 1
    assert "not significant at 1e-07" in capsys.readouterr().out
    # the challenger's longer instructions cost prompt tokens: refused on the tokens guard ...
    assert promote(cycle, "big", "--guard", "tokens") == 1
    out = capsys.readouterr().out
    assert "guard tokens:" in out and "failed" in out and "worse on the guard tokens" in out
    assert deployment(cycle["deploy"])["champion"] == "v1"
    # ... unless the tolerance allows them
    assert promote(cycle, "big", "--guard", "tokens", "--guard-tolerance", "50") == 0
    assert deployment(cycle["deploy"])["events"][-1]["guard"]["passed"] is True


def test_rollback_restores_the_previous_champion(cycle, capsys):
    assert promote(cycle, "big") == 0
    assert main(["promote", "--rollback", str(cycle["deploy"])]) == 0
    assert "champion v1 (was v2)" in capsys.readouterr().out
    doc = deployment(cycle["deploy"])
    assert doc["champion"] == "v1" and doc["stack"] == ["v1"] and doc["events"][-1]["event"] == "rollback"
    assert main(["promote", "--rollback", str(cycle["deploy"])]) == 2
    assert "no previous champion" in one_error_line(capsys)
    assert promote(cycle, "big") == 0  # a new promotion gets a new number; v2 stays as it was
    assert deployment(cycle["deploy"])["champion"] == "v3"


def _bad_cases(tmp_path: Path, c: dict) -> dict:
    """name -> (command arguments, words of the one-line error)."""
    other_task = tmp_path / "other-task"
    iris_program(careful=True).save(other_task)
    (other_task / "config.json").write_text(json.dumps({"task": "gsm8k", "seed": 0}))
    other_model = iris_program(careful=True, model="other").save(tmp_path / "other-model")
    other_class = Mod3().set_lm(FakeLM("y", name="m")).save(tmp_path / "other-class")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    foreign = write_examples(tmp_path / "foreign.jsonl", [])
    foreign.write_text(json.dumps({"data": {"question": "1+1?", "answer": "2"}, "inputs": ["question"],
                                   "split": "test"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(c["big"].read_text() + "{not json\n")
    over = ["--over", str(c["deploy"])]
    big = ["--data", str(c["big"])]
    return {
        "another task": ([str(other_task), *over, *big], "was made for task gsm8k, the champion for iris"),
        "another model": ([str(other_model), *over, *big], "runs on fake:other, the champion on fake:m"),
        "another program": ([str(other_class), *over, *big], "is a fakes:Mod3 program"),
        "data of another task": ([str(c["challenger"]), *over, "--data", str(foreign)], "has no field 'sepal_length'"),
        "data in another format": ([str(c["challenger"]), *over, "--data", str(gsm)],
                                   "is neither an examples file (tandem data from-log) nor iris data"),
        "a broken examples file": ([str(c["challenger"]), *over, "--data", str(broken)], "line 41: not a JSON object"),
        "no data file": ([str(c["challenger"]), *over, "--data", str(tmp_path / "nope.jsonl")], "no such file"),
        "not a deployment": ([str(c["challenger"]), "--over", str(tmp_path / "challenger"), *big],
                             "is not a deployment folder"),
        "the champion itself": ([str(c["deploy"] / "versions" / "v1"), *over, *big], "is the champion v1 itself"),
        "a bad alpha": ([str(c["challenger"]), *over, *big, "--alpha", "2"], "--alpha must be between 0 and 1"),
        "a bad guard": ([str(c["challenger"]), *over, *big, "--guard", "speed"], "--guard must be one of"),
        "no mode": ([str(c["challenger"]), *big], "say one of: --over"),
    }


@pytest.mark.parametrize("case", ["another task", "another model", "another program", "data of another task",
                                  "data in another format", "a broken examples file", "no data file",
                                  "not a deployment", "the champion itself", "a bad alpha", "a bad guard", "no mode"])
def test_bad_promotions_are_one_line_and_write_nothing(cycle, tmp_path, capsys, case):
    args, words = _bad_cases(tmp_path, cycle)[case]
    before = (cycle["deploy"] / "deploy.json").read_bytes()
    assert main(["promote", *args]) == 2
    assert words in one_error_line(capsys)
    assert (cycle["deploy"] / "deploy.json").read_bytes() == before
    assert sorted(p.name for p in (cycle["deploy"] / "versions").iterdir()) == ["v1"]


def test_init_refuses_a_used_folder(cycle, tmp_path, capsys):
    assert main(["promote", str(cycle["challenger"]), "--init", str(cycle["deploy"])]) == 2
    assert "is a deployment already" in one_error_line(capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["promote", str(cycle["challenger"]), "--init", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in one_error_line(capsys)


# -- the served program switches ---------------------------------------------------------------------
def test_the_server_switches_on_promotion_and_rollback_without_dropping_requests(cycle, tmp_path, capsys):
    versicolor = {k: VERSICOLORS[0][k] for k in VERSICOLORS[0].input_keys}
    statuses: list[int] = []
    stop = threading.Event()

    def burst(url: str) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                statuses.append(http.post(f"{url}/v1/predict", json={"inputs": versicolor}).status_code)

    with tandem_server(cycle["deploy"], "--log", str(tmp_path / "log")) as (url, proc):
        assert httpx.get(f"{url}/health").json()["program_version"] == "v1"
        threads = [threading.Thread(target=burst, args=(url,)) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            assert promote(cycle, "big", "--notify", url) == 0
            assert "now serves version v2 (was v1)" in capsys.readouterr().err
            r = httpx.post(f"{url}/v1/predict", json={"inputs": versicolor}).json()
            assert r["program_version"] == "v2" and r["outputs"]["species"] == "versicolor"
            assert main(["promote", "--rollback", str(cycle["deploy"]), "--notify", url]) == 0
            r = httpx.post(f"{url}/v1/predict", json={"inputs": versicolor}).json()
            assert r["program_version"] == "v1" and r["outputs"]["species"] == "virginica"
            # without --notify the server keeps v1 until it is told: SIGHUP
            assert promote(cycle, "big") == 0
            assert httpx.get(f"{url}/health").json()["program_version"] == "v1"
            os.kill(proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 20
            while httpx.get(f"{url}/health").json()["program_version"] != "v3":
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert len(statuses) > 20 and set(statuses) == {200}


def test_a_reload_to_a_program_with_other_inputs_is_refused(tmp_path):
    from fastapi.testclient import TestClient

    from tandem.serve_app import create_app

    fresh = {"program": (Mod3().set_lm(FakeLM("y", name="m")), "other")}
    app = create_app(iris_program(), version="v1", reloader=lambda: fresh["program"])
    with TestClient(app) as client:
        r = client.post("/v1/reload")
        assert r.status_code == 409 and "other input fields" in r.json()["error"]["message"]
        assert "still serving version v1" in r.json()["error"]["message"]
        assert client.get("/health").json()["program_version"] == "v1"
        fresh["program"] = (iris_program(careful=True), "v2")
        assert client.post("/v1/reload").json() == {"program_version": "v2", "previous_version": "v1"}
    app = create_app(iris_program(), version="v1")  # nothing to reload from
    with TestClient(app) as client:
        assert client.post("/v1/reload").status_code == 409


# -- a challenger from the champion ------------------------------------------------------------------
def test_optimize_from_the_champion_on_examples_from_the_log(cycle, tmp_path, capsys):
    data = tmp_path / "log-data.jsonl"
    rows = [(r, s) for s, part in (("train", ROWS[0:150:5]), ("dev", ROWS[1:150:10]), ("test", ROWS[2:150:10]))
            for r in part]
    with open(data, "w") as fh:
        for ex, split in rows:
            fh.write(json.dumps({"data": dict(ex), "inputs": list(ex.input_keys), "split": split}) + "\n")
    # the champion after a promotion is the careful program: the run starts from it
    assert promote(cycle, "big") == 0
    run_dir = tmp_path / "run-from"
    assert main(["optimize", "iris", "--from", str(cycle["deploy"]), "--data", str(data), "--strategy", "p",
                 "--model", "fake:m", "--run-dir", str(run_dir), "--set", "threads=4",
                 "--set", "num_candidates=2"]) == 0
    capsys.readouterr()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["sizes"] == {"train": 30, "dev": 15, "test": 15}
    assert results["program_from"] == str(cycle["deploy"].resolve())
    assert results["start_dev_score"] == 100.0  # the careful champion, not the task's program (it scores lower)
    final = json.loads((run_dir / "final" / "program.json").read_text())
    assert MARKER in final["predictors"]["classify"]["signature"]["instructions"]
    # the new run is a challenger the gate accepts as the champion's kind
    from tandem.promote import check_pair

    check_pair(cycle["deploy"] / "versions" / "v2", run_dir / "final")


def test_optimize_from_a_program_of_another_model_or_class_is_one_line(tmp_path, capsys):
    iris_program(careful=True).save(tmp_path / "careful")
    Mod3().set_lm(FakeLM("y", name="m")).save(tmp_path / "mod3")
    base = ["optimize", "iris", "--strategy", "p", "--set", "sizes=30,15,15", "--run-dir", str(tmp_path / "r")]
    assert main([*base, "--from", str(tmp_path / "careful"), "--model", "fake:other"]) == 2
    assert "runs on fake:m, this run's model is fake:other" in one_error_line(capsys)
    assert main([*base, "--from", str(tmp_path / "mod3"), "--model", "fake:m"]) == 2
    assert "holds a fakes:Mod3 program; task iris's program is tandem.tasks.iris:IrisClassifier" in one_error_line(capsys)
    assert not (tmp_path / "r" / "config.json").exists()


def test_optimize_from_starts_with_the_saved_prompts_demos_and_adapter(tmp_path):
    from tandem.experiments.run import start_program
    from tandem.tasks.registry import get_task

    adapter = tmp_path / "trained" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    saved = iris_program(careful=True)
    saved.classify.lm = saved.classify.lm.with_adapter(adapter)
    saved.classify.demos = [{"sepal_length": "5.0", "sepal_width": "3.0", "petal_length": "1.2",
                             "petal_width": "0.2", "reasoning": "short petals", "species": "setosa"}]
    saved.save(tmp_path / "saved")
    cfg = load_config(task="iris", strategy="p", model="fake:m", program_from=str(tmp_path / "saved"))
    lm = factory("m")
    start = start_program(cfg, get_task("iris"), None, lm)
    assert start.classify.lm.adapter == str(tmp_path / "saved" / "adapters" / "adapter")
    assert start.classify.lm.with_adapter(None).name == lm.name == "m"
    assert MARKER in start.classify.signature.instructions
    assert start.classify.demos == saved.classify.demos
    plain = start_program(load_config(task="iris", strategy="p", model="fake:m"), get_task("iris"), None, lm)
    assert plain.classify.lm is lm and MARKER not in plain.classify.signature.instructions


def test_eval_reads_a_deployment_folder_and_every_example_of_a_log_file(cycle, tmp_path, capsys):
    """``tandem eval --program DEPLOY`` evaluates the champion; ``--split all`` on an examples file
    of ``tandem data from-log`` takes every line whatever its split (the champion: setosas right,
    versicolors wrong)."""
    rows = SETOSAS[:6] + VERSICOLORS[:4]
    data = write_examples(tmp_path / "mixed.jsonl", rows[:5], split="train")
    with open(data, "a") as fh:
        for ex in rows[5:]:
            fh.write(json.dumps({"data": dict(ex), "inputs": list(ex.input_keys), "split": None}) + "\n")
    out = tmp_path / "records.json"
    assert main(["eval", "--program", str(cycle["deploy"]), "--data", str(data), "--split", "all",
                 "--json", str(out)]) == 0
    assert "60.0" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    scores = [r["score"] for r in doc["records"]]
    assert scores == [1.0] * 6 + [0.0] * 4
