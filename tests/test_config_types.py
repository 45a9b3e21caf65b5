"""The typed configuration (#15 item 9, #16 item 3): every key of a run config, an experiment file and
``--set`` is checked against its type, and ``--set`` is read by one parser.

An unknown key or a wrong type is one line naming the key, the value and the
expected type (tandem.experiments.typed); the CLI tests of the same messages,
before any model loads and before any run directory, are in test_cli_checks.py.
"""

from __future__ import annotations

import typing

import pytest

from tandem.experiments.config import LoraTable, RLTable, RunConfig, WeightStepTable, load_config
from tandem.experiments.experiment_file import GRID_KEYS, RUN_KEYS, ExperimentFile
from tandem.experiments.grid import load_experiment
from tandem.experiments.overrides import parse_override, parse_value
from tandem.experiments.typed import describe, unwrap, validate


def accepts_text(tp) -> bool:
    base, _ = unwrap(tp)
    args = typing.get_args(base)
    return base is str or base is typing.Any or (typing.get_origin(base) is typing.Literal
                                                 and any(isinstance(a, str) for a in args)) or str in args


def bad_value(tp):
    """A TOML value of the wrong type for ``tp``: text where text is not taken, else a list of numbers."""
    return [1.5] if accepts_text(tp) else "x"


def shown(value) -> str:
    return '"x"' if value == "x" else "[1.5]"


RUN_HINTS = typing.get_type_hints(RunConfig, include_extras=True)
TABLES = {"lora": LoraTable, "weight_step": WeightStepTable, "rl": RLTable}


# -- every key of a run config ------------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(RUN_HINTS))
def test_every_run_setting_of_the_wrong_type_is_one_line_naming_it(key):
    tp = RUN_HINTS[key]
    value = bad_value(tp)
    with pytest.raises(ValueError) as err:
        load_config(defaults={key: value})
    assert str(err.value) == f"{key}: expected {describe(tp)}, got {shown(value)}"


@pytest.mark.parametrize("table, key", [(t, k) for t, cls in TABLES.items() for k in sorted(cls.__annotations__)])
def test_every_key_of_every_table_of_the_wrong_type_is_one_line_naming_it(table, key):
    tp = typing.get_type_hints(TABLES[table], include_extras=True)[key]
    value = bad_value(tp)
    with pytest.raises(ValueError) as err:
        load_config(defaults={table: {key: value}})
    assert str(err.value) == f"[{table}] {key}: expected {describe(tp)}, got {shown(value)}"


@pytest.mark.parametrize("table", [*TABLES, "backend_options"])
def test_a_table_that_is_not_a_table(table):
    with pytest.raises(ValueError, match=f"^{table}: expected a table, got 3$"):
        load_config(defaults={table: 3})


@pytest.mark.parametrize("values, expected", [
    ({"seed": "0"}, 'seed: expected an integer, got "0"'),
    ({"seed": True}, "seed: expected an integer, got true"),
    ({"seed": 1.0}, "seed: expected an integer, got 1.0"),
    ({"sizes": [50, 50]}, "sizes: expected 3 positive integers, got [50, 50]"),
    ({"sizes": [50, 0, 50]}, "sizes: expected 3 positive integers, got [50, 0, 50]"),
    ({"sizes": [50, 50, 50, 50]}, "sizes: expected 3 positive integers, got [50, 50, 50, 50]"),
    ({"threads": "many"}, 'threads: expected an integer >= 1, got "many"'),
    ({"max_demos": -1}, "max_demos: expected an integer >= 0, got -1"),
    ({"program_from": ""}, 'program_from: expected a non-empty string, got ""'),
    ({"lora": {"rank": 8.0}}, "[lora] rank: expected an integer, got 8.0"),
    ({"lora": {"target_modules": "q_proj"}}, '[lora] target_modules: expected a list of strings, got "q_proj"'),
    ({"weight_step": {"balance": "sometimes"}},
     '[weight_step] balance: expected "auto" or true or false, got "sometimes"'),
    ({"weight_step": {"teacher_demos": "some"}},
     '[weight_step] teacher_demos: expected one of "complete", "all", got "some"'),
    ({"rl": {"per_module": 1}}, "[rl] per_module: expected true or false, got 1"),
])
def test_messages_name_the_key_the_value_and_the_type(values, expected):
    with pytest.raises(ValueError) as err:
        load_config(defaults=values)
    assert str(err.value) == expected


def test_unknown_keys_name_the_key_the_value_and_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_config(defaults={"sead": 1})
    assert str(err.value).startswith("sead: unknown setting (got 1); known: backend_options, data, data_seed, ")
    for table, cls in TABLES.items():
        with pytest.raises(ValueError) as err:
            load_config(defaults={table: {"nope": "x"}})
        assert str(err.value) == (f'[{table}] nope: unknown setting (got "x"); known: '
                                  f"{', '.join(sorted(cls.__annotations__))}")


def test_good_values_are_typed():
    cfg = load_config(defaults={"sizes": [6, 6, 9], "lora": {"learning_rate": 1, "target_modules": ["q_proj"]},
                                "weight_step": {"balance": True}, "backend_options": {"x": {"y": [1]}}})
    assert cfg.sizes == (6, 6, 9) and cfg.lora == {"learning_rate": 1.0, "target_modules": ("q_proj",)}
    assert cfg.lora_config().learning_rate == 1.0 and cfg.lora_config().target_modules == ("q_proj",)
    assert cfg.weight_step_options()["balance"] is True and cfg.backend_options == {"x": {"y": [1]}}


def test_a_run_config_built_in_code_is_checked_the_same_way():
    with pytest.raises(ValueError, match='^seed: expected an integer, got "0"$'):
        RunConfig(seed="0").check()
    with pytest.raises(ValueError, match=r"^\[lora\] rank: expected an integer, got \"8\"$"):
        RunConfig(lora={"rank": "8"}).lora_config()
    assert RunConfig(sizes=(5, 5, 5)).check().sizes == (5, 5, 5)


def test_full_fine_tuning_is_a_lora_method_the_rl_step_cannot_follow():
    assert RunConfig(strategy="p -> w -> p", lora={"method": "full"}).check().lora_config().method == "full"
    assert RunConfig(strategy="r -> w", lora={"method": "full"}).check().rl_settings().lora.method == "lora"
    with pytest.raises(ValueError, match=r'^\[lora\] method = "full" with strategy .w -> r.: the RL step'):
        RunConfig(strategy="w -> r", lora={"method": "full"}).check()
    assert RunConfig(strategy="p -> w -> r").check().lora_config().method == "lora"  # auto: r follows w
    assert RunConfig(strategy="p -> w -> p").check().lora_config().method == "auto"  # chosen by model size
    with pytest.raises(ValueError, match=r'^\[lora\] method must be one of auto, lora, full, not .fool.$'):
        RunConfig(lora={"method": "fool"}).check()


# -- the experiment file --------------------------------------------------------------------------
def experiment(tmp_path, text: str):
    path = tmp_path / "exp.toml"
    path.write_text('tasks = ["iris"]\nmodels = ["m"]\nstrategies = ["p"]\nseeds = [0]\n' + text)
    return path


def test_the_experiment_file_type_holds_the_grid_and_every_run_setting():
    keys = set(typing.get_type_hints(ExperimentFile))
    assert keys == {*GRID_KEYS, "per_task", *RUN_KEYS}
    assert {"task", "model", "strategy", "seed", "run_dir"}.isdisjoint(RUN_KEYS) and "data_seed" in RUN_KEYS


@pytest.mark.parametrize("text, expected", [
    ('tasks = "iris"\n', 'tasks: expected a non-empty list of strings, got "iris"'),
    ("models = []\n", "models: expected a non-empty list of strings, got []"),
    ("strategies = [1]\n", "strategies: expected a non-empty list of strings, got [1]"),
    ('seeds = [0, "1"]\n', 'seeds: expected a non-empty list of integers, got [0, "1"]'),
    ("out = 3\n", "out: expected a string, got 3"),
    ("sizes = [1, 2]\n", "sizes: expected 3 positive integers, got [1, 2]"),
    ('threads = "many"\n', 'threads: expected an integer >= 1, got "many"'),
    ("nonsense = 1\n", "nonsense: unknown setting (got 1); known: backend_options, data, data_seed, "),
    ('seed = 0\n', "seed: unknown setting (got 0); known: "),  # an experiment's seeds are `seeds`
    ("[lora]\nrank = 1.5\n", "[lora] rank: expected an integer, got 1.5"),
    ("[rl]\nstep = 1\n", "[rl] step: unknown setting (got 1); known: batch_size, "),
    ("[per_task.iris]\nsizes = [1, 2]\n", "[per_task.iris] sizes: expected 3 positive integers, got [1, 2]"),
    ("[per_task.iris]\nseeds = [1]\n", "[per_task.iris] seeds: unknown setting (got [1]); known: "),
    ("[per_task.iris.lora]\nrank = \"8\"\n", '[per_task.iris.lora] rank: expected an integer, got "8"'),
    ('[per_task."wine.py"]\nthreads = 0\n', '[per_task."', ),
    ("per_task = 3\n", "per_task: expected a table, got 3"),
])
def test_experiment_keys_are_typed(text, expected, tmp_path):
    if expected == '[per_task."':  # a task file's table: its key quoted as TOML writes it
        text = '[per_task."wine.py"]\nthreads = 0\n'
        with pytest.raises(ValueError) as err:
            load_experiment(experiment(tmp_path, text))
        assert str(err.value) == f'[per_task."{tmp_path / "wine.py"}"] threads: expected an integer >= 1, got 0'
        return
    path = experiment(tmp_path, "") if text.startswith(("tasks", "models", "strategies", "seeds")) else None
    if path is not None:  # replace the grid key rather than repeat it
        key = text.split(" ")[0]
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(key + " ")]
        path.write_text("\n".join(lines) + "\n" + text)
    with pytest.raises(ValueError) as err:
        load_experiment(path or experiment(tmp_path, text))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)


def test_a_bad_setting_of_any_run_in_an_experiment_is_found_when_it_loads(tmp_path):
    with pytest.raises(ValueError, match=r"^\[weight_step\] attempts must be an integer >= 1"):
        load_experiment(experiment(tmp_path, "[per_task.iris.weight_step]\nattempts = 0\n"))
    with pytest.raises(ValueError, match=r"^\[rl\] setting `rollouts` must be an integer >= 2"):
        load_experiment(experiment(tmp_path, ""), ["rl.rollouts=1"])


# -- the one --set parser ---------------------------------------------------------------------------
@pytest.mark.parametrize("item, model, expected", [
    ("seeds=0,1,2", ExperimentFile, (("seeds",), [0, 1, 2])),
    ("seeds=3", ExperimentFile, (("seeds",), [3])),
    ("seeds=[0, 1]", ExperimentFile, (("seeds",), [0, 1])),
    ("strategies=p,p -> w -> p", ExperimentFile, (("strategies",), ["p", "p -> w -> p"])),
    ("tasks=iris", ExperimentFile, (("tasks",), ["iris"])),
    ("sizes=60,50,60", RunConfig, (("sizes",), [60, 50, 60])),
    ("sizes=abc", RunConfig, (("sizes",), ["abc"])),
    ("lora.rank=32", RunConfig, (("lora", "rank"), 32)),
    ("lora.learning_rate=3e-4", RunConfig, (("lora", "learning_rate"), 3e-4)),
    ("lora.target_modules=q_proj,v_proj", RunConfig, (("lora", "target_modules"), ["q_proj", "v_proj"])),
    ("weight_step.balance=TRUE", RunConfig, (("weight_step", "balance"), True)),
    ("weight_step.balance=auto", RunConfig, (("weight_step", "balance"), "auto")),
    ("rl.per_module=true", RunConfig, (("rl", "per_module"), True)),
    ("strategy=p -> w", RunConfig, (("strategy",), "p -> w")),
    ('strategy="p -> w"', RunConfig, (("strategy",), "p -> w")),
    ("data=2024.csv", RunConfig, (("data",), "2024.csv")),
    ("data=12", RunConfig, (("data",), "12")),  # a string setting takes the text as written
    ('seed="0"', RunConfig, (("seed",), "0")),  # a TOML string stays one: the type check names it
    ("seed=0", RunConfig, (("seed",), 0)),
    ("threads=many", RunConfig, (("threads",), "many")),
    ("backend_options.extra_body={\"top_k\": 1}", RunConfig, (("backend_options", "extra_body"), {"top_k": 1})),
    ("backend_options.extra_body={top_k = 1}", RunConfig, (("backend_options", "extra_body"), {"top_k": 1})),
    ("backend_options.base_url=http://h:8000/v1", RunConfig, (("backend_options", "base_url"), "http://h:8000/v1")),
    ('per_task."my_task.py".sizes=6,6,9', ExperimentFile, (("per_task", "my_task.py", "sizes"), [6, 6, 9])),
    ("per_task.gsm8k.lora.rank=8", ExperimentFile, (("per_task", "gsm8k", "lora", "rank"), 8)),
    ("format=markers", RunConfig, (("format",), "markers")),
])
def test_one_parser_reads_every_form(item, model, expected):
    assert parse_override(item, model) == expected


@pytest.mark.parametrize("item, expected", [
    ("noequals", "--set 'noequals': expected KEY=VALUE"),
    ("=3", "--set '=3': '' is not a setting name"),
    ("a b=3", "--set 'a b=3': 'a b' is not a setting name"),
    ("lora..rank=3", "--set 'lora..rank=3': 'lora..rank' is not a setting name"),
])
def test_a_malformed_override_is_one_line(item, expected):
    with pytest.raises(ValueError) as err:
        parse_override(item, RunConfig)
    assert str(err.value).startswith(expected)


def test_an_override_into_a_value_that_is_not_a_table(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("lora = 3\n")
    with pytest.raises(ValueError, match=r"^lora.rank=\.\.\.: `lora` is 3, not a table of settings$"):
        load_config(cfg, ["lora.rank=8"])


def test_overrides_of_optimize_and_experiment_give_the_same_values(tmp_path):
    sets = ["sizes=20,10,10", "lora.rank=8", "lora.target_modules=q_proj,v_proj", "weight_step.balance=false",
            "rl.steps=2", "threads=4", "format=markers", "backend_options.x=1"]
    cfg = load_config(None, sets, task="iris", strategy="p")
    cell = load_experiment(experiment(tmp_path, ""), sets).cells()[0].cfg
    for key in ("sizes", "lora", "weight_step", "rl", "threads", "format", "backend_options"):
        assert getattr(cell, key) == getattr(cfg, key), key
    assert cfg.sizes == (20, 10, 10) and cfg.lora == {"rank": 8, "target_modules": ("q_proj", "v_proj")}


def test_an_override_for_every_run_wins_over_per_task_tables(tmp_path):
    path = experiment(tmp_path, "[per_task.iris]\nsizes = [4, 4, 4]\n[per_task.iris.lora]\nrank = 4\n")
    exp = load_experiment(path, ["sizes=5,5,5", "lora.rank=16"])
    assert exp.cells()[0].cfg.sizes == (5, 5, 5) and exp.cells()[0].cfg.lora == {"rank": 16}
    exp = load_experiment(path, ["per_task.iris.sizes=6,6,6"])
    assert exp.cells()[0].cfg.sizes == (6, 6, 6) and exp.cells()[0].cfg.lora == {"rank": 4}


def test_serve_model_options_use_the_same_parser():
    from tandem.serve import parse_model_options

    assert parse_model_options(["tensor_parallel_size=2", "extra_body.top_k=1", "cache=FALSE"]) == {
        "tensor_parallel_size": 2, "extra_body": {"top_k": 1}, "cache": False}
    assert parse_value("[1, 2]") == [1, 2] and parse_value("a,b") == "a,b"  # no type: commas stay text
