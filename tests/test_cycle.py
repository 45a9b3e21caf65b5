"""The improvement cycle (issue #18), serving side: the request log, feedback, SIGKILL, and ``data from-log``.

Real ``tandem serve`` processes on the scripted ``fake:m`` model (``cycle_helpers``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from cycle_helpers import FLOWER, iris_program, tandem_server  # noqa: E402
from fakes import one_error_line  # noqa: E402
from tandem.cli import main  # noqa: E402
from tandem.serve_log import LogError, RequestLog  # noqa: E402

VERSICOLOR = {**FLOWER, "petal_length": "4.2"}


def test_a_served_request_is_logged_and_takes_feedback(tmp_path):
    iris_program().save(tmp_path / "champ")
    log_dir = tmp_path / "log"
    with tandem_server(tmp_path / "champ", "--log", str(log_dir)) as (url, _):
        health = httpx.get(f"{url}/health").json()
        assert health["request_log"] is True
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/predict", json={"inputs": VERSICOLOR})
        elapsed = time.perf_counter() - start
        assert r.status_code == 200, r.text
        body = r.json()
        rid, version = body["request_id"], body["program_version"]
        assert 0 < body["latency_s"] <= elapsed
        assert body["outputs"]["species"] == "virginica" and version == health["program_version"]
        batch = httpx.post(f"{url}/v1/predict_batch", json={"items": [FLOWER, FLOWER]}).json()
        batch_ids = [item["request_id"] for item in batch["results"]]
        assert len(set(batch_ids)) == 2 and rid not in batch_ids

        # feedback: a label (case does not matter), then a score; the last wins and all are kept
        fb = httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "label": "Versicolor"})
        assert fb.status_code == 200 and fb.json() == {"request_id": rid, "label": {"species": "versicolor"},
                                                       "score": None, "feedback_count": 1}
        fb = httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "label": {"species": "versicolor"},
                                                    "score": 0, "comment": "it was a versicolor"})
        assert fb.status_code == 200 and fb.json()["feedback_count"] == 2

        # an unknown id is a 404; a malformed body or a label of the wrong type a 422; nothing is written
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": "no-such-id", "label": "setosa"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_request"
        for bad, words in [
            ({"request_id": rid, "label": ["versicolor"]}, "not a list"),
            ({"request_id": rid, "label": True}, "not a boolean"),
            ({"request_id": rid, "label": "rose"}, "must be one of setosa, versicolor, virginica"),
            ({"request_id": rid, "label": {"colour": "red"}}, "unknown label field 'colour'"),
            ({"request_id": rid, "label": {"species": None}}, "not null"),
            ({"request_id": rid, "score": 1.5}, "from 0 to 1"),
            ({"request_id": rid, "score": "good"}, "from 0 to 1"),
            ({"request_id": rid}, "give a 'label'"),
            ({"label": "setosa"}, "'request_id'"),
            ({"request_id": rid, "label": "setosa", "extra": 1}, "unknown key 'extra'"),
            ([1, 2], "must be a JSON object"),
        ]:
            r = httpx.post(f"{url}/v1/feedback", json=bad)
            assert r.status_code == 422, (bad, r.text)
            assert words in r.json()["error"]["message"], (bad, r.json())
        r = httpx.post(f"{url}/v1/feedback", content=b'{"request_id": ', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]

    log = RequestLog.open(log_dir)
    try:
        row = log.get(rid)
        assert row["inputs"] == VERSICOLOR and row["outputs"]["species"] == "virginica" and row["status"] == 200
        assert row["program_version"] == version and row["latency_s"] == body["latency_s"] and row["endpoint"] == "/v1/predict"
        assert log.get(batch_ids[0])["endpoint"] == "/v1/predict_batch"
        assert log.count() == {"requests": 3, "feedback": 2, "requests_with_feedback": 1}
        assert [f["score"] for f in log.feedback_of(rid)] == [None, 0.0]
        (last,) = list(log.with_feedback())
        assert last.label == {"species": "versicolor"} and last.score == 0.0 and last.feedback_count == 2
    finally:
        log.close()


def test_a_server_without_a_log_takes_no_feedback(tmp_path):
    iris_program().save(tmp_path / "champ")
    with tandem_server(tmp_path / "champ") as (url, _):
        rid = httpx.post(f"{url}/v1/predict", json={"inputs": FLOWER}).json()["request_id"]
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "label": "setosa"})
        assert r.status_code == 404 and "--log DIR" in r.json()["error"]["message"]


def test_kill_9_during_a_burst_loses_no_answered_request(tmp_path):
    """SIGKILL while 8 clients send requests: every request that got a 200 is in the log."""
    iris_program().save(tmp_path / "champ")
    log_dir = tmp_path / "log"
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=10) as http:
            n = 0
            while not stop.is_set():
                inputs = {**FLOWER, "sepal_length": f"{i}.{n}"}
                n += 1
                try:
                    r = http.post(f"{url}/v1/predict", json={"inputs": inputs})
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code == 200:
                    with lock:
                        answered.append(r.json()["request_id"])

    with tandem_server(tmp_path / "champ", "--log", str(log_dir), env={"CYCLE_SLEEP": "0.005"}) as (url, proc):
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(answered) < 150 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst: requests are in flight
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(20)
    assert len(answered) >= 150
    log = RequestLog.open(log_dir)  # what a restarted server or from-log sees
    try:
        logged = log.ids()
        missing = set(answered) - logged
        assert not missing, f"{len(missing)} answered requests are not in the log"
        assert all(log.get(rid)["outputs"]["species"] for rid in answered[:20])
    finally:
        log.close()


# -- tandem data from-log ---------------------------------------------------------------------------
def make_log(path: Path) -> tuple[RequestLog, list[str]]:
    """A log of 10 requests one second apart (versicolors 0-4, setosas 5-9), without a server."""
    log = RequestLog.create(path, program="tandem.tasks.iris:IrisClassifier", input_fields=list(FLOWER),
                            label_fields=["species"])
    ids = []
    for i in range(10):
        flower = {**(VERSICOLOR if i < 5 else FLOWER), "sepal_width": f"3.{i}"}
        guess = "virginica" if i < 5 else "setosa"
        rid = f"r{i}"
        log.record(rid, 1000.0 + i, "/v1/predict", flower, 200, {"reasoning": "r", "species": guess}, None,
                   {"calls": 1}, 0.01, "v1")
        ids.append(rid)
    log.record("failed", 1100.0, "/v1/predict", FLOWER, 502, None, {"type": "parse_error"}, {}, 0.01, "v1")
    return log, ids


def test_from_log_writes_labelled_examples_drops_duplicates_and_splits_by_time(tmp_path, capsys):
    log, ids = make_log(tmp_path / "log")
    for i in range(5):
        log.add_feedback(ids[i], score=0.0)  # wrong, and then corrected: the last feedback wins
        log.add_feedback(ids[i], label={"species": "versicolor"})
    for i in range(5, 9):
        log.add_feedback(ids[i], score=1.0)  # right: the served answer is the label
    log.add_feedback(ids[9], score=0.0)  # wrong, no label: left out
    log.add_feedback("failed", score=1.0)  # no outputs to take a label from: left out
    # an exact duplicate of r0 (same inputs, same label), later
    log.record("dup", 2000.0, "/v1/predict", {**VERSICOLOR, "sepal_width": "3.0"}, 200,
               {"reasoning": "r", "species": "versicolor"}, None, {}, 0.01, "v2")
    log.add_feedback("dup", label={"species": "versicolor"})
    log.close()

    out = tmp_path / "data.jsonl"
    assert main(["data", "from-log", str(tmp_path / "log"), "--out", str(out), "--split", "0.6,0.2,0.2"]) == 0
    text = capsys.readouterr().out
    assert "9 examples written" in text and "1 duplicates" in text and "1 scored below 1.0" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["request_id"] for r in rows] == ids[:9]  # in request-time order, the duplicate dropped
    assert rows[0]["data"] == {**VERSICOLOR, "sepal_width": "3.0", "species": "versicolor"}
    assert rows[0]["inputs"] == list(FLOWER) and rows[0]["source"] == "label"
    assert rows[5]["data"]["species"] == "setosa" and rows[5]["source"] == "score"
    assert [r["split"] for r in rows] == ["train"] * 5 + ["dev"] * 2 + ["test"] * 2  # oldest to train
    # a request is in one split only: ids are unique across the file
    assert len({r["request_id"] for r in rows}) == len(rows)

    from tandem.log_examples import examples_splits

    splits = examples_splits(out)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [5, 2, 2]
    assert splits["train"][0].inputs() == {**VERSICOLOR, "sepal_width": "3.0"}
    assert splits["train"][0].labels() == {"species": "versicolor"}

    # without --split: no splits recorded; a run shuffles them with its seed
    assert main(["data", "from-log", str(tmp_path / "log"), "--out", str(out)]) == 0
    assert {json.loads(line)["split"] for line in out.read_text().splitlines()} == {None}


@pytest.mark.parametrize("setup, words", [
    (lambda p: None, "no such folder"),
    (lambda p: p.mkdir(), "has no requests.sqlite"),
    (lambda p: (p.mkdir(), (p / "requests.sqlite").write_text("not a database")), "is not a tandem request log"),
    (lambda p: (p.mkdir(), sqlite3.connect(p / "requests.sqlite").execute("CREATE TABLE t (x)").connection.commit()),
     "is not a tandem request log"),
])
def test_from_log_on_a_folder_that_is_not_a_log_is_one_line(tmp_path, capsys, setup, words):
    setup(tmp_path / "log")
    out = tmp_path / "data.jsonl"
    assert main(["data", "from-log", str(tmp_path / "log"), "--out", str(out)]) == 2
    assert words in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("split", ["0.5,0.5", "0.6,0.3,0.3", "a,b,c", "1.2,-0.1,-0.1"])
def test_from_log_refuses_a_bad_split(tmp_path, capsys, split):
    make_log(tmp_path / "log")[0].close()
    assert main(["data", "from-log", str(tmp_path / "log"), "--out", str(tmp_path / "d.jsonl"), "--split", split]) == 2
    assert "--split must be three fractions" in one_error_line(capsys)
    assert not (tmp_path / "d.jsonl").exists()


def test_serve_log_folder_checks(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(LogError, match="holds other files"):
        RequestLog.create(other, program="a:B", input_fields=["x"], label_fields=["y"])
    log = RequestLog.create(tmp_path / "log", program="a:B", input_fields=["x"], label_fields=["y"])
    log.close()
    with pytest.raises(LogError, match="holds requests of another program"):
        RequestLog.create(tmp_path / "log", program="a:C", input_fields=["x"], label_fields=["y"])
    RequestLog.create(tmp_path / "log", program="a:B", input_fields=["x"], label_fields=["y"]).close()  # reopens


def test_cli_serve_with_a_bad_log_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import tandem.lm.registry as registry
    from cycle_helpers import factory

    monkeypatch.setitem(registry._BACKENDS, "fake", factory)
    iris_program().save(tmp_path / "champ")
    (tmp_path / "file").write_text("x")
    assert main(["serve", str(tmp_path / "champ"), "--log", str(tmp_path / "file")]) == 2
    assert "is a file" in one_error_line(capsys)
