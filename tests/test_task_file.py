"""Task files (issue #15, item 2): examples/wine_task.py through eval, optimize and experiment, on a scripted FakeLM.

Sizes reach the file's load; paths on the command line resolve against the
current directory, paths in a config file against its folder; a program saved
from a task file loads from any directory; a broken task file, a failing load
and a moved file are one-line errors naming the file.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

import tandem
from tandem.cli import main
from tandem.experiments.config import load_config, resolve_task
from tandem.experiments.grid import load_experiment
from tandem.lm import FakeLM
from tandem.persist import ProgramFileError

WINE = Path(__file__).resolve().parents[1] / "examples" / "wine_task.py"


def wine_reply(text: str) -> str:
    """A rule on the last wine in the prompt: low flavanoids -> class_2, high proline -> class_0, else class_1."""
    flav = float(re.findall(r"Flavanoids: ([\d.]+)", text)[-1])
    proline = float(re.findall(r"Proline: ([\d.]+)", text)[-1])
    guess = "class_2" if flav < 1.4 else ("class_0" if proline > 900 else "class_1")
    return f" flavanoids {flav}, proline {proline}\nCultivar: {guess}"


@pytest.fixture
def fake_backend(monkeypatch):
    """``fake:<name>`` builds a FakeLM answering with ``wine_reply``; the names built are recorded."""
    import tandem.lm.registry as registry

    built: list[str] = []

    def factory(model, **options):
        built.append(model)
        return FakeLM(wine_reply, name=model)

    monkeypatch.setitem(registry._BACKENDS, "fake", factory)
    return built


from fakes import one_error_line  # noqa: E402  (the no_lm fixture is in conftest.py)


def forget_task_modules(monkeypatch) -> None:
    """As in a fresh process: no task file is imported yet."""
    for name in [n for n in sys.modules if n.startswith("tandem_user_task_")]:
        monkeypatch.delitem(sys.modules, name)


def write_task(folder: Path, body: str, name: str = "my_task.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body)
    return path


# -- eval, optimize and experiment on the wine task file ------------------------------------------------
def test_the_wine_task_file_follows_the_contract():
    task = resolve_task(load_config(task=str(WINE)))
    assert task.name == "wine_task" and task.sizes == (60, 50, 60) and task.prompt_sizes == (20, 40)
    data = task.load(data=None, seed=0, sizes=(12, 9, 15))
    assert [len(data[s]) for s in ("train", "dev", "test")] == [12, 9, 15]
    assert len(task.read(None)) == 178
    program = task.make_program(data).set_lm(FakeLM(wine_reply))
    correct = sum(task.metric(ex, program(**ex.inputs())) for ex in data["dev"])
    assert correct >= 6  # the scripted rule is mostly right


def test_eval_of_a_task_file_honours_sizes(tmp_path, monkeypatch, fake_backend, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(WINE), "--model", "fake:m", "--split", "test", "--set", "sizes=12,9,15",
                 "--json", "out.json"]) == 0
    doc = json.loads((tmp_path / "out.json").read_text())  # --json relative to the current directory
    assert doc["n"] == 15 and len(doc["records"]) == 15 and doc["score"] > 50
    assert fake_backend == ["m"]
    assert "wine_task test split: 15 examples" in capsys.readouterr().err


def test_optimize_a_task_file_and_load_its_program_from_another_directory(tmp_path, monkeypatch, fake_backend):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(WINE.parent, work / "examples", ignore=shutil.ignore_patterns("*.toml", "__pycache__"))
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert main(["optimize", "examples/wine_task.py", "--model", "fake:m", "--strategy", "p", "--run-dir", "run",
                 "--set", "sizes=12,9,12", "--set", "num_candidates=2", "--set", "threads=4"]) == 0
    run = work / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["sizes"] == {"train": 12, "dev": 9, "test": 12} and results["task"] == "wine_task"
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == str(work / "examples" / "wine_task.py")  # recorded absolute
    saved = json.loads((run / "final" / "program.json").read_text())
    assert saved["program_file"] == str(work / "examples" / "wine_task.py")
    assert saved["program"].endswith(":WineClassifier")

    forget_task_modules(monkeypatch)  # a fresh process, in another directory
    monkeypatch.chdir(elsewhere)
    program = tandem.load(run / "final")
    assert type(program).__name__ == "WineClassifier"
    assert len(program.classify.demos) == len(saved["predictors"]["classify"]["demos"])  # its state
    assert program(alcohol="13.2", flavanoids="0.8", color_intensity="7", proline="600").cultivar == "class_2"

    # The task file moved: a one-line error naming it, from the library and from the CLI.
    (work / "examples" / "wine_task.py").rename(work / "moved.py")
    forget_task_modules(monkeypatch)
    with pytest.raises(ProgramFileError, match=r"task file .*wine_task\.py, which does not exist"):
        tandem.load(run / "final")


def test_eval_program_whose_task_file_moved_is_one_error_line(tmp_path, monkeypatch, fake_backend, capsys):
    old = write_task(tmp_path / "a", WINE.read_text(), "wine_task.py")
    task = resolve_task(load_config(task=str(old)))
    task.make_program().set_lm(FakeLM(wine_reply, name="m")).save(tmp_path / "saved")
    new = tmp_path / "b" / "wine_task.py"
    new.parent.mkdir()
    old.rename(new)
    forget_task_modules(monkeypatch)
    assert main(["eval", str(new), "--program", str(tmp_path / "saved"), "--set", "sizes=3,3,3"]) == 2
    line = one_error_line(capsys)
    assert str(old) in line and "does not exist" in line and "program.json" in line


def test_an_experiment_over_a_task_file(tmp_path, monkeypatch, fake_backend):
    folder = tmp_path / "cfg"
    folder.mkdir()
    shutil.copy(WINE, folder / "wine_task.py")
    exp = folder / "exp.toml"
    exp.write_text(f'tasks = ["wine_task.py"]\nmodels = ["fake:m"]\nstrategies = ["zero-shot"]\nseeds = [0]\n'
                   f'out = "{tmp_path / "out"}"\nthreads = 4\nsizes = [6, 6, 6]\n'
                   '[per_task.wine_task]\nsizes = [6, 6, 9]\n')  # a task file's section: by its stem
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert main(["experiment", str(exp)]) == 0
    res = json.loads((tmp_path / "out" / "wine_task" / "fake_m" / "zero-shot-s0" / "results.json").read_text())
    assert res["task"] == "wine_task" and res["test_n"] == 9 and res["test_score"] > 50


# -- paths ------------------------------------------------------------------------------------------
def test_paths_in_a_config_file_are_relative_to_it_on_the_command_line_to_the_cwd(tmp_path, monkeypatch):
    folder, cwd = tmp_path / "configs", tmp_path / "cwd"
    cwd.mkdir()
    write_task(folder, "", "task.py")
    cfg_file = folder / "run.toml"
    cfg_file.write_text('task = "task.py"\ndata = "in_config.csv"\n')
    monkeypatch.chdir(cwd)
    cfg = load_config(cfg_file)
    assert cfg.task == str(folder / "task.py") and cfg.data == str(folder / "in_config.csv")
    cfg = load_config(cfg_file, ["data=mydata.csv"])  # --set data=...: the current directory
    assert cfg.data == str(cwd / "mydata.csv") and cfg.task == str(folder / "task.py")
    cfg = load_config(cfg_file, [], data="sub/d.csv", task="t.py")  # --data and the task argument
    assert cfg.data == str(cwd / "sub" / "d.csv") and cfg.task == str(cwd / "t.py")
    assert load_config(task="iris").task == "iris"  # a built-in name stays a name

    exp = folder / "exp.toml"
    exp.write_text('tasks = ["task.py", "iris"]\nmodels = ["m"]\ndata = "d.csv"\n[per_task."task.py"]\nthreads = 2\n')
    e = load_experiment(exp)
    assert e.tasks == [str(folder / "task.py"), "iris"] and e.settings["data"] == str(folder / "d.csv")
    assert e.config(e.tasks[0], "m", "p", 0).data == str(folder / "d.csv")
    assert e.task_settings(e.tasks[0]) == {"threads": 2}
    e = load_experiment(exp, ["tasks=other.py", "data=x.csv"])
    assert e.tasks == [str(cwd / "other.py")] and e.settings["data"] == str(cwd / "x.csv")


# -- errors -----------------------------------------------------------------------------------------
GOOD_PROGRAM = "import tandem\ndef program():\n    return tandem.Predict('x -> y')\n"
GOOD_METRIC = "def metric(example, prediction, trace=None):\n    return True\n"
ROWS = "[tandem.Example(x=str(i), y='a').with_inputs('x') for i in range({n})]"


@pytest.mark.parametrize("body, expected", [
    (GOOD_PROGRAM + "def load(data, seed, sizes=None):\n    return {}\n",
     ["has no metric: a task file defines program(), metric(example, prediction, trace=None) and load(data, seed, sizes)"]),
    (GOOD_PROGRAM, ["has no metric and no load"]),
    (GOOD_PROGRAM + GOOD_METRIC + "def load(data, seed, sizes=None):\n    raise RuntimeError('no wines today')\n",
     ["load(data=None, seed=0, sizes=2,2,2) failed: RuntimeError: no wines today"]),
    (GOOD_PROGRAM + GOOD_METRIC + "def load(data, seed):\n    return {}\n",
     ["sizes 2,2,2 were set, but its load(data, seed) takes no sizes; define load(data, seed, sizes=None)"]),
    (GOOD_PROGRAM + GOOD_METRIC + "def load(data, seed, sizes=None):\n    return {'train': [], 'dev': []}\n",
     ["load returned dict without a 'test' split"]),
    (GOOD_PROGRAM + GOOD_METRIC + "def load(data, seed, sizes=None):\n    return {'train': [], 'dev': [{}], 'test': []}\n",
     ["load's 'dev' split[0] is dict", "with_inputs"]),
    ("import tandem\ndef program(:\n", ["failed to import: SyntaxError"]),
])
def test_a_broken_task_file_is_one_error_line_naming_it(body, expected, tmp_path, capsys, no_lm):
    path = write_task(tmp_path, body)
    assert main(["eval", str(path), "--set", "sizes=2,2,2"]) == 2
    line = one_error_line(capsys)
    assert f"task file {path}" in line, line
    for text in expected:
        assert text in line, (text, line)


def test_a_load_without_sizes_works_until_sizes_are_set(tmp_path):
    path = write_task(tmp_path, GOOD_PROGRAM + GOOD_METRIC + "def load(data, seed):\n"
                      f"    return {{'train': {ROWS.format(n=2)}, 'dev': {ROWS.format(n=3)}, 'test': []}}\n")
    task = resolve_task(load_config(task=str(path)))
    assert len(task.load(data=None, seed=0)["dev"]) == 3


def test_a_data_file_of_the_wrong_format_names_the_file_and_what_is_missing(tmp_path, capsys, no_lm):
    bad = tmp_path / "wines.csv"
    bad.write_text("alcohol,proline,cultivar\n13.2,1000,class_0\n")
    assert main(["eval", str(WINE), "--data", str(bad)]) == 2
    line = one_error_line(capsys)
    assert f"task file {WINE}" in line and f"{bad}: missing column(s) flavanoids, color_intensity" in line
