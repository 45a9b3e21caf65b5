"""``tandem eval --program`` and ``tandem compare`` (issue #15, items 3 and 4) on scripted FakeLMs.

Program A says "setosa" for short petals and "versicolor" otherwise; B also
says "virginica" for petals of 4.85 cm or more: B fixes virginicas A got
wrong and breaks the long-petalled versicolors A got right.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from scipy import stats as sps

from tandem.cli import main
from tandem.compare import compare_programs, eval_config, wilson_interval
from tandem.experiments.config import load_config
from tandem.experiments.run import run_cell
from tandem.lm import FakeLM
from tandem.tasks.iris import IrisClassifier
from tandem.tasks.registry import get_task


def _petal(text: str) -> float:
    return float(re.findall(r"Petal Length: ([\d.]+)", text)[-1])


def guess_a(pl: float) -> str:
    return "setosa" if pl < 2.5 else "versicolor"


def guess_b(pl: float) -> str:
    return "setosa" if pl < 2.5 else ("virginica" if pl >= 4.85 else "versicolor")


REPLIES = {"a": lambda t: f" a\nSpecies: {guess_a(_petal(t))}", "b": lambda t: f" b\nSpecies: {guess_b(_petal(t))}"}
SIZES = (30, 15, 30)


@pytest.fixture
def fake_backend(monkeypatch):
    """``fake:a`` and ``fake:b``: the two scripted models, rebuilt by name when a saved program loads."""
    import tandem.lm.registry as registry

    monkeypatch.setitem(registry._BACKENDS, "fake", lambda model, **kw: FakeLM(REPLIES[model], name=model))


def expected(split: str = "test", sizes=SIZES, seed: int = 0):
    """A's and B's 0/1 outcomes on the split, worked out from the data."""
    rows = get_task("iris").load(seed=seed, sizes=sizes)[split]
    a = [int(guess_a(float(r["petal_length"])) == r["species"]) for r in rows]
    b = [int(guess_b(float(r["petal_length"])) == r["species"]) for r in rows]
    return a, b


def save(tmp_path: Path, name: str) -> Path:
    return IrisClassifier().set_lm(FakeLM(REPLIES[name], name=name)).save(tmp_path / f"saved-{name}")


def zero_shot_run(tmp_path: Path, name: str) -> Path:
    cfg = load_config(task="iris", strategy="zero-shot", sizes=SIZES, threads=4)
    run_cell(cfg, FakeLM(REPLIES[name], name=name), run_dir=tmp_path / f"run-{name}")
    return tmp_path / f"run-{name}"


def test_compare_two_saved_programs(tmp_path, fake_backend, capsys):
    a, b = expected()
    fixed = [i for i, (x, y) in enumerate(zip(a, b)) if y > x]
    broke = [i for i, (x, y) in enumerate(zip(a, b)) if y < x]
    assert fixed and broke  # the scripts differ both ways
    out = tmp_path / "cmp.json"
    assert main(["compare", str(save(tmp_path, "a")), str(save(tmp_path, "b")), "iris",
                 "--set", "sizes=30,15,30", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"B fixed {len(fixed)} " in text and f"broke {len(broke)} " in text and "exact McNemar p = " in text
    doc = json.loads(out.read_text())
    assert doc["n"] == 30 and doc["setting"]["split"] == "test" and doc["setting"]["task"] == "iris"
    assert doc["score_a"] == pytest.approx(100 * sum(a) / 30) and doc["score_b"] == pytest.approx(100 * sum(b) / 30)
    assert doc["b_fixed"] == fixed and doc["b_broke"] == broke
    p = sps.binomtest(min(len(fixed), len(broke)), len(fixed) + len(broke), 0.5).pvalue
    assert doc["test"]["method"] == "mcnemar-exact" and doc["test"]["p_value"] == pytest.approx(p)
    assert doc["test"]["diff_b_minus_a_points"] == pytest.approx(100 * (sum(b) - sum(a)) / 30, abs=0.01)
    assert doc["interval"] == "wilson"
    assert doc["ci_a"] == pytest.approx(list(wilson_interval(sum(a), 30)))
    assert doc["ci_a"][0] < doc["score_a"] < doc["ci_a"][1]
    assert len(doc["records"]) == 30 and doc["records"][fixed[0]]["b"]["score"] == 1.0
    assert doc["setting"]["model_a"] == "fake:a" and doc["setting"]["model_b"] == "fake:b"


def test_compare_run_directories_uses_the_task_and_split_they_recorded(tmp_path, fake_backend, capsys):
    run_a, run_b = zero_shot_run(tmp_path, "a"), zero_shot_run(tmp_path, "b")
    out = tmp_path / "cmp.json"
    assert main(["compare", str(run_a), str(run_b), "--split", "dev", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    a, b = expected("dev")
    assert doc["n"] == 15 and doc["setting"]["task"] == "iris" and doc["setting"]["sizes"] == list(SIZES)
    assert doc["score_a"] == pytest.approx(100 * sum(a) / 15) and doc["score_b"] == pytest.approx(100 * sum(b) / 15)
    assert "iris / dev split (split seed 0): 15 examples" in capsys.readouterr().out


def test_compare_without_a_task_anywhere_is_an_error(tmp_path, fake_backend, capsys):
    assert main(["compare", str(save(tmp_path, "a")), str(save(tmp_path, "b"))]) == 2
    assert "which task?" in capsys.readouterr().err


def test_eval_program_on_a_saved_program_and_on_a_run_dir(tmp_path, fake_backend, capsys):
    records = tmp_path / "records.json"
    assert main(["eval", "iris", "--program", str(save(tmp_path, "b")), "--split", "test",
                 "--set", "sizes=30,15,30", "--json", str(records)]) == 0
    doc = json.loads(records.read_text())
    _, b = expected()
    assert doc["n"] == 30 and [r["score"] for r in doc["records"]] == [float(x) for x in b]
    assert doc["records"][0]["prediction"]["species"] in ("setosa", "versicolor", "virginica")

    run = zero_shot_run(tmp_path, "a")
    assert main(["eval", "--program", str(run), "--split", "test", "--json", str(records)]) == 0  # the run's task
    doc = json.loads(records.read_text())
    a, _ = expected()
    assert doc["n"] == 30 and doc["score"] == pytest.approx(100 * sum(a) / 30, abs=0.01)
    assert "iris test split: 30 examples, program " in capsys.readouterr().err


def test_eval_program_on_a_data_file_of_the_tasks_format(tmp_path, fake_backend):
    csv = tmp_path / "new.csv"
    csv.write_text("sepal_length,sepal_width,petal_length,petal_width,species\n"
                   "5.1,3.5,1.4,0.2,setosa\n6.0,2.9,4.5,1.5,versicolor\n6.9,3.1,5.4,2.1,virginica\n")
    records = tmp_path / "records.json"
    assert main(["eval", "--program", str(zero_shot_run(tmp_path, "b")), "--data", str(csv), "--split", "all",
                 "--json", str(records)]) == 0
    doc = json.loads(records.read_text())
    assert doc["n"] == 3 and doc["score"] == pytest.approx(100.0)


def test_eval_program_errors(tmp_path, fake_backend, capsys):
    saved = save(tmp_path, "a")
    assert main(["eval", "--program", str(saved)]) == 2
    assert "which task?" in capsys.readouterr().err
    assert main(["eval", "iris", "--program", str(saved), "--model", "fake:b"]) == 2
    assert "--model with --program" in capsys.readouterr().err
    assert main(["eval", "iris", "--program", str(tmp_path / "nothing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_a_task_given_replaces_the_runs_data_settings(tmp_path, fake_backend):
    run = zero_shot_run(tmp_path, "a")
    assert eval_config([run / "final"]).sizes == SIZES
    cfg = eval_config([run / "final"], task="gsm8k")
    assert cfg.task == "gsm8k" and cfg.sizes is None


def test_compare_programs_with_a_continuous_metric_uses_bootstrap_intervals():
    examples = get_task("iris").load(seed=0, sizes=(3, 3, 12))["test"]

    def half_credit(example, prediction, trace=None):
        return 1.0 if prediction.species == example.species else 0.5

    a, b = (IrisClassifier().set_lm(FakeLM(REPLIES[n], name=n)) for n in ("a", "b"))
    c = compare_programs(a, b, examples, half_credit, threads=2)
    assert c.interval == "bootstrap" and c.test.method == "paired-bootstrap" and c.n == 12
    assert c.ci_a[0] <= c.score_a <= c.ci_a[1]
    assert wilson_interval(5, 10) == pytest.approx((23.66, 76.34), abs=0.01)


def test_comparing_a_program_with_itself_prints_no_negative_zero(tmp_path, fake_backend, capsys):
    a = save(tmp_path, "a")
    assert main(["compare", str(a), str(a), "iris", "--set", "sizes=30,15,30"]) == 0
    text = capsys.readouterr().out
    assert "B - A: +0.0 points [95% interval +0.0, +0.0]" in text and "-0.0" not in text
