"""Bad input is a one-line error naming the setting, file or field, before any model loads.

Issue #16, items D3, D4, D5, D6, D7, D8, D9 and item 4 (the help and the options).

Every test here replaces the LM factory with one that fails the test if it is
called, and (for ``tandem optimize``) asserts that no run directory appeared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import tandem
from tandem.cli import error, main
from tandem.experiments.config import RunConfig, load_config
from tandem.experiments.run import run_cell
from tandem.lm import FakeLM
from tandem.persist import ProgramFileError
from tandem.tasks.iris import IrisClassifier


from fakes import one_error_line  # noqa: E402  (the no_lm fixture is in conftest.py)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# -- D3, D4: optimize settings are checked before the model loads and before the run directory --------
@pytest.mark.parametrize("args, expected", [
    (["--strategy", "p -> x"], ["unknown step 'x'", "'p -> x'", "known steps: p, "]),
    (["--strategy", ""], ["empty step in strategy ''"]),
    (["--strategy", "p ->"], ["empty step in strategy 'p ->'"]),
    (["--set", "lora.rnak=32"], ["[lora] rnak: unknown setting (got 32); known: ", " rank,"]),  # D6: "[lora]" as is
    (["--set", "weight_step.atempts=2"], ["[weight_step] atempts: unknown setting (got 2); known: attempts, "]),
    (["--set", "rl.rollout=2"], ["[rl] rollout: unknown setting (got 2); known: ", " rollouts,"]),
    (["--set", "lora.rank=abc"], ['[lora] rank: expected an integer, got "abc"']),
    (["--set", "lora.learning_rate=fast"], ['[lora] learning_rate: expected a number, got "fast"']),
    (["--set", "weight_step.attempts=0"], ["[weight_step] attempts must be an integer >= 1"]),
    (["--set", "sizes=0,0,0"], ["sizes: expected 3 positive integers, got [0, 0, 0]"]),
    (["--set", "sizes=-5,50,50"], ["sizes: expected 3 positive integers, got [-5, 50, 50]"]),  # D4
    (["--set", "sizes=50,50"], ["sizes: expected 3 positive integers, got [50, 50]"]),
    (["--set", "threads=0"], ["threads: expected an integer >= 1, got 0"]),
    (["--set", "threads=many"], ['threads: expected an integer >= 1, got "many"']),
    (["--set", 'seed="0"'], ['seed: expected an integer, got "0"']),
    (["--set", "nonsense=1"], ["nonsense: unknown setting (got 1); known: "]),
    (["--set", "format=nope"], ["unknown prompt format 'nope'"]),
])
def test_optimize_rejects_bad_settings_before_the_model_and_the_run_dir(args, expected, tmp_path, monkeypatch,
                                                                        capsys, no_lm):
    monkeypatch.chdir(tmp_path)  # the default run dir is runs/<task>-<strategy>-s<seed> under here
    run_dir = tmp_path / "run"
    assert main(["optimize", "iris", "--model", "fakebackend:m", *args]) == 2
    assert main(["optimize", "iris", "--model", "fakebackend:m", "--run-dir", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0] == err[1] and err[0].startswith("error: "), err
    for text in expected:
        assert text in err[0], (text, err[0])
    assert not (tmp_path / "runs").exists() and not run_dir.exists()


def test_config_file_settings_are_checked_too(tmp_path, capsys, no_lm):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'task = "iris"\nsizes = [30, -1, 15]\nrun_dir = "{tmp_path / "run"}"\n')
    assert main(["optimize", "--config", str(cfg)]) == 2
    assert one_error_line(capsys) == "error: sizes: expected 3 positive integers, got [30, -1, 15]"
    cfg.write_text(f'task = "iris"\nsizes = 30\nrun_dir = "{tmp_path / "run"}"\n')
    assert main(["optimize", "--config", str(cfg)]) == 2
    assert one_error_line(capsys) == "error: sizes: expected 3 positive integers, got 30"
    cfg.write_text(f'task = "iris"\nrun_dir = "{tmp_path / "run"}"\n[lora]\nrnak = 32\n')
    assert main(["optimize", "--config", str(cfg)]) == 2
    assert one_error_line(capsys).startswith("error: [lora] rnak: unknown setting (got 32); known: alpha, ")
    cfg.write_text(f'task = "iris"\nthreads = "many"\nrun_dir = "{tmp_path / "run"}"\n')
    assert main(["optimize", "--config", str(cfg)]) == 2
    assert one_error_line(capsys) == 'error: threads: expected an integer >= 1, got "many"'
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, sets, expected", [
    ("", ["seeds=0,x"], 'seeds: expected a non-empty list of integers, got [0, "x"]'),
    ("", ["tasks="], "tasks: expected a non-empty list of strings, got []"),
    ("", ["per_task.iris.sizes=1,2"], "[per_task.iris] sizes: expected 3 positive integers, got [1, 2]"),
    ("", ["lora.rnak=1"], "[lora] rnak: unknown setting (got 1); known: alpha, "),
    ("", ["weight_step.balance=maybe"], '[weight_step] balance: expected "auto" or true or false, got "maybe"'),
    ("", ["rl.steps=0"], "[rl] setting `steps` must be an integer >= 1, got 0"),
    ("", ["backend_options=3"], "backend_options: expected a table, got 3"),
    ('threads = "many"\n', [], 'threads: expected an integer >= 1, got "many"'),
    ("[per_task.iris.lora]\nrank = 1.5\n", [], "[per_task.iris.lora] rank: expected an integer, got 1.5"),
    ("[per_task.iris]\nsead = 1\n", [], "[per_task.iris] sead: unknown setting (got 1); known: backend_options, "),
])
def test_experiment_rejects_bad_settings_before_the_model_and_the_out_dir(text, sets, expected, tmp_path, capsys,
                                                                          no_lm):
    exp = tmp_path / "exp.toml"
    exp.write_text(f'tasks = ["iris"]\nmodels = ["fakebackend:m"]\nstrategies = ["p"]\nseeds = [0]\n'
                   f'out = "{tmp_path / "out"}"\n{text}')
    args = [a for item in sets for a in ("--set", item)]
    assert main(["experiment", str(exp), *args]) == 2
    line = one_error_line(capsys)  # printed literally: "[per_task.iris]" is not read as markup
    assert line.startswith(f"error: {expected}"), line
    assert not (tmp_path / "out").exists()


def test_good_settings_pass_the_checks():
    cfg = load_config(None, ["sizes=30,15,15", "lora.rank=8", "weight_step.attempts=2"], task="iris",
                      strategy="p -> w")
    assert cfg.sizes == (30, 15, 15) and cfg.check() is cfg
    assert load_config(None, [], strategy="zero-shot").strategy == "zero-shot"


def test_run_cell_checks_before_it_creates_the_run_dir(tmp_path):
    """Library callers who build a RunConfig themselves get the same checks (the LM is never used)."""
    for cfg in (RunConfig(strategy="p -> x"), RunConfig(sizes=(-5, 50, 50)), RunConfig(lora={"rnak": 32})):
        with pytest.raises(ValueError):
            run_cell(cfg, lm=object(), run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists()


# -- D6: error text is printed literally ----------------------------------------------------------
def test_error_text_is_not_read_as_markup(capsys):
    error("unknown [lora] setting(s) ['rnak']; [bold]not bold[/bold] " + "x" * 200)
    line = one_error_line(capsys)  # long messages are not wrapped either
    assert "unknown [lora] setting(s) ['rnak']; [bold]not bold[/bold] " in line and line.endswith("x" * 200)


# -- D8: eval --limit ------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["0", "-1", "abc"])
def test_eval_limit_must_be_a_positive_integer(limit, capsys, no_lm):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "iris", "--model", "fakebackend:m", f"--limit={limit}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --limit: must be a positive integer, got '{limit}'" in err


def test_eval_limit_accepts_a_positive_integer():
    from tandem.cli import build_parser

    assert build_parser().parse_args(["eval", "iris", "--limit", "3"]).limit == 3


# -- D9: program.json structure -------------------------------------------------------------------
def saved(tmp_path):
    """A saved Iris program (a fake LM reference) and its program.json document."""
    IrisClassifier().set_lm(FakeLM("Species: setosa", name="m")).save(tmp_path / "p")
    return tmp_path / "p", json.loads((tmp_path / "p" / "program.json").read_text())


@pytest.mark.parametrize("change, field, expected", [
    ({"demos": "oops"}, "`demos`", 'a list of objects, got a string "oops"'),
    ({"demos": [1]}, "`demos[0]`", "an object (field name -> value), got a number 1"),
    ({"demos": None}, "`demos`", "a list of objects, got null"),
    ({"signature": None}, "`signature`", "an object, got null"),
    ({"signature": {"fields": "x"}}, "`signature.fields`", "a non-empty list of field objects"),
    ({"signature": {"fields": [{"name": "a"}]}}, "`signature.fields[0]`", "a boolean `input`"),
    ({"max_tokens": 0}, "`max_tokens`", "an integer >= 1, got a number 0"),
    ({"max_tokens": "128"}, "`max_tokens`", 'an integer >= 1, got a string "128"'),
    ({"temperature": -1}, "`temperature`", "a number >= 0, got a number -1"),
    ({"temperature": True}, "`temperature`", "a number >= 0, got a boolean true"),
    ({"format": "nope"}, "`format`", "a prompt format's name, one of ['fields', 'json', 'markers']"),
    ({"lm": "fake:m"}, "`lm`", "an object (backend, model, adapter) or null"),
    ({"lm": {"backend": "fake"}}, "`lm.model`", "a non-empty string, got nothing (the field is missing)"),
    ({"lm": {"backend": "fake", "model": "m", "adapter": 3}}, "`lm.adapter`", "a folder path"),
])
def test_program_file_structure_is_checked(change, field, expected, tmp_path, capsys, no_lm):
    directory, doc = saved(tmp_path)
    doc["predictors"]["classify"].update(change)
    (directory / "program.json").write_text(json.dumps(doc))
    with pytest.raises(ProgramFileError) as exc:
        tandem.load(directory)
    message = str(exc.value)
    assert str(directory / "program.json") in message and "predictor 'classify'" in message
    assert field in message and expected in message, message
    assert main(["serve", str(directory)]) == 2  # tandem serve: the same one line, no model built
    assert one_error_line(capsys) == f"error: {message}"


def test_program_file_top_level_structure(tmp_path, no_lm):
    directory, doc = saved(tmp_path)
    for change, expected in (({"predictors": []}, "`predictors` must be an object"),
                             ({"predictors": {"classify": "x"}}, "predictor 'classify' must be an object"),
                             ({"program": 3}, "`program` must be a class path 'module:QualName'")):
        (directory / "program.json").write_text(json.dumps({**doc, **change}))
        with pytest.raises(ProgramFileError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            tandem.load(directory)


def test_a_good_program_file_still_loads(tmp_path):
    directory, doc = saved(tmp_path)
    doc["predictors"]["classify"]["format"] = None  # null: the default format
    (directory / "program.json").write_text(json.dumps(doc))
    lm = FakeLM("Species: setosa", name="m")
    program = tandem.load(directory, lms={"fake:m": lm})
    assert program.classify.lm is lm and program.classify.params.max_tokens == 128


# -- D7: a bad setting, a binary data file, an unknown task: one plain line naming it -----------------
@pytest.mark.parametrize("command", [
    ["eval", "iris", "--model", "fakebackend:m"],
    ["optimize", "iris", "--model", "fakebackend:m"],
    ["experiment", str(EXAMPLES / "iris_table.toml"), "--dry-run"],
])
def test_a_setting_that_is_not_a_number_is_named(command, tmp_path, monkeypatch, capsys, no_lm):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--set", "sizes=abc"]) == 2
    line = one_error_line(capsys)
    assert line == 'error: sizes: expected 3 positive integers, got ["abc"]', line
    assert "invalid literal" not in line and not (tmp_path / "runs").exists()


def binary_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)))
    return path


@pytest.mark.parametrize("task, name, split", [("iris", "flowers.csv", "dev"), ("iris", "flowers.csv", "all"),
                                               ("gsm8k", "train.jsonl", "dev")])
def test_a_binary_data_file_is_one_line_naming_it(task, name, split, tmp_path, capsys, no_lm):
    data = binary_file(tmp_path / name)
    assert main(["eval", task, "--model", "fakebackend:m", "--data", str(data), "--split", split]) == 2
    line = one_error_line(capsys)
    assert str(data) in line and "not UTF-8 text" in line, line
    assert "codec" not in line


@pytest.mark.parametrize("command", [["eval", "nosuch"], ["optimize", "nosuch", "--run-dir", "run"]])
def test_an_unknown_task_is_printed_plainly(command, tmp_path, monkeypatch, capsys, no_lm):
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    assert one_error_line(capsys) == "error: unknown task 'nosuch'; known tasks: ['gsm8k', 'hotpotqa', 'iris']"


def test_an_unknown_task_message_is_plain_for_library_callers():
    from tandem.tasks.registry import get_task

    with pytest.raises(KeyError) as exc:  # still a KeyError for callers that catch one
        get_task("nosuch")
    assert str(exc.value) == "unknown task 'nosuch'; known tasks: ['gsm8k', 'hotpotqa', 'iris']"


# -- D5: --data names a data file or a folder, as the help says -------------------------------------
IRIS_CSV = "sepal_length,sepal_width,petal_length,petal_width,species\n" + "".join(
    f"{5 + i % 3}.{i % 10},3.{i % 7},{1 + i % 5}.{i % 4},0.{i % 9},{('setosa', 'versicolor', 'virginica')[i % 3]}\n"
    for i in range(30))


def test_iris_data_may_be_a_folder_holding_the_csv(tmp_path):
    from tandem.tasks.registry import get_task

    task = get_task("iris")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "iris.csv").write_text(IRIS_CSV)
    (tmp_path / "one" / "README.txt").write_text("not data")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "flowers.csv").write_text(IRIS_CSV)  # the folder's only CSV
    by_file = task.load(data=tmp_path / "one" / "iris.csv", seed=0, sizes=(10, 10, 10))
    for folder in ("one", "other"):
        by_folder = task.load(data=str(tmp_path / folder), seed=0, sizes=(10, 10, 10))
        assert {k: [dict(e) for e in v] for k, v in by_folder.items()} == \
               {k: [dict(e) for e in v] for k, v in by_file.items()}
        assert len(task.read(tmp_path / folder)) == 30


@pytest.mark.parametrize("files, expected", [
    ((), "holds no iris.csv and no *.csv file"),
    (("a.csv", "b.csv"), "holds no iris.csv but 2 *.csv files (a.csv, b.csv)"),
])
def test_an_iris_folder_without_one_csv_is_one_line_naming_it(files, expected, tmp_path, capsys, no_lm):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in files:
        (folder / name).write_text(IRIS_CSV)
    for split in ("dev", "all"):
        assert main(["eval", "iris", "--model", "fakebackend:m", "--data", str(folder), "--split", split]) == 2
        line = one_error_line(capsys)
        assert str(folder) in line and expected in line, line
        assert "IsADirectoryError" not in line and "Errno" not in line


def test_a_folder_where_a_data_file_belongs_is_named_as_a_folder(tmp_path):
    from tandem.tasks.data import DataError, iter_records

    with pytest.raises(DataError, match="a folder, not a data file"):
        list(iter_records(tmp_path))


# -- item 4: the help, --version, -v anywhere -------------------------------------------------------
def subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_the_top_level_help_describes_tandem(capsys):
    from tandem.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "The tandem command" not in out
    assert "prompts" in out and "weights" in out and "tandem COMMAND --help" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tandem {tandem.__version__}"


@pytest.mark.parametrize("argv, verbose", [
    (["eval", "iris"], False), (["-v", "eval", "iris"], True), (["eval", "iris", "-v"], True),
    (["eval", "-v", "iris"], True), (["--verbose", "optimize", "iris"], True), (["serve", "run", "--verbose"], True),
    (["experiment", "x.toml", "-v"], True), (["report", "run"], False), (["compare", "a", "b", "-v"], True),
])
def test_verbose_anywhere_on_the_line(argv, verbose):
    from tandem.cli import build_parser

    assert build_parser().parse_args(argv).verbose is verbose


def test_every_option_has_help_and_shows_its_default():
    from tandem.cli import build_parser

    for name, sub in subcommands(build_parser()).items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
        text = sub.format_help()
        for action in sub._actions:
            default = action.default
            if action.option_strings and default not in (None, False, [], argparse.SUPPRESS):
                assert f"default {default}" in text or f"default: {default}" in text, (name, action.dest, default)
    helps = {name: sub.format_help() for name, sub in subcommands(build_parser()).items()}
    assert "(default: 64)" in " ".join(helps["eval"].split())  # --threads
    assert "(default: 8000)" in " ".join(helps["serve"].split())
    assert "--split" in helps["eval"] and "which examples" in " ".join(helps["eval"].split())
