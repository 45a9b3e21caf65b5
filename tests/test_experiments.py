"""Experiment grids, the Table-1 markdown, statistics, reports and the task registry, on the scripted FakeLM."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
from scipy import stats as sps

from fakes import fake_trainer
from tandem.experiments.config import load_config
from tandem.experiments.grid import load_experiment, run_experiment
from tandem.experiments.report import write_report
from tandem.experiments.run import run_cell
from tandem.lm import FakeLM
from tandem.tasks.errors import DataError
from tandem.tasks.registry import default_data, get_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _petal(text: str) -> float:
    return float(re.findall(r"Petal Length: ([\d.]+)", text)[-1])


def _species(pl: float, cut: float) -> str:
    return "setosa" if pl < 2.5 else ("versicolor" if pl < cut else "virginica")


def base_reply(text: str) -> str:
    """Zero-shot: always 'setosa'. With demos in the prompt: a petal-length rule."""
    pl = _petal(text)
    guess = _species(pl, 4.85) if text.count("Petal Length:") > 1 else "setosa"
    return f" petal length {pl}\nSpecies: {guess}"


def tuned_reply(text: str) -> str:
    """After a (fake) weight step: a slightly different rule, so some examples break."""
    return f" tuned\nSpecies: {_species(_petal(text), 5.15)}"


class _AnyAdapter(dict):
    def get(self, key, default=None):
        return tuned_reply


def make_lm(tmp_path: Path) -> FakeLM:
    lm = FakeLM(base_reply)
    lm.model_dir = tmp_path  # allows weight steps
    lm.adapter_replies = _AnyAdapter()
    return lm


def write_experiment(tmp_path: Path, strategies=("zero-shot", "p", "w -> p"), seeds=(0, 1), extra: str = "") -> Path:
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        "# tandem experiment exp.toml\n"
        f"tasks = [\"iris\"]\nmodels = [\"fake-model\"]\nstrategies = {json.dumps(list(strategies))}\n"
        f"seeds = {list(seeds)}\nout = \"{tmp_path / 'out'}\"\nthreads = 8\nnum_candidates = 3\n{extra}"
        "[per_task.iris]\nsizes = [30, 15, 15]\n"
    )
    return cfg


def kinds(history: list[dict]) -> list[str]:
    """The strategy's steps (BetterTogether's history may start with the given program, kind "start")."""
    return [h["kind"] for h in history if h["kind"] != "start"]


def step_dir(run_dir: Path, kind: str) -> Path:
    """steps/NN-<kind> of a run (NN: 00 or 01 for the first step, depending on the start record)."""
    return next(p for p in sorted((run_dir / "steps").iterdir()) if p.name.endswith(f"-{kind}"))


# -- one run -------------------------------------------------------------------------------------
def test_run_cell_writes_results_and_per_example_records(tmp_path):
    lm = make_lm(tmp_path)
    calls: list = []
    cfg = load_config(None, ["sizes=30,15,15", "threads=8", "num_candidates=3"], task="iris", strategy="p -> w")
    res = run_cell(cfg, lm, run_dir=tmp_path / "run", trainer=fake_trainer(calls))
    run = tmp_path / "run"
    assert res["status"] == "ok" and kinds(res["history"]) == ["p", "w"]
    assert res["sizes"] == {"train": 30, "dev": 15, "test": 15}
    # the paper's 15/35 prompt sizes do not fit 30 training examples: scaled, with a note
    assert res["prompt_sizes"] == [9, 21] and "scaled" in res["notes"][0]
    assert json.loads((run / "results.json").read_text())["test_score"] == res["test_score"]
    final = json.loads((run / "test_records.json").read_text())
    base = json.loads((run / "baseline_records.json").read_text())
    assert len(final) == len(base["records"]) == 15
    assert {"example", "prediction", "score", "failure"} <= set(final[0])
    fixed = sum(f["score"] > b["score"] for f, b in zip(final, base["records"]))
    broken = sum(f["score"] < b["score"] for f, b in zip(final, base["records"]))
    assert (res["fixed"], res["broken"]) == (fixed, broken) and fixed > 0
    # the paired test against the zero-shot program on the same 15 test examples (exact McNemar)
    t = res["test_vs_baseline"]
    assert t["method"] == "mcnemar-exact" and t["n"] == 15
    assert t["diff"] == round(100 * (fixed - broken) / 15, 2) and 0 < t["p_value"] <= 1
    assert res["zero_shot_test_score"] == base["score"]
    assert calls, "the weight step trained"
    assert (run / "final" / "program.json").exists()


def test_zero_shot_run_is_the_program_as_it_is(tmp_path):
    lm = make_lm(tmp_path)
    cfg = load_config(None, ["sizes=30,15,15"], task="iris", strategy="zero-shot")
    res = run_cell(cfg, lm, run_dir=tmp_path / "zs")
    assert res["history"] == [] and res["best_step"] is None and res["fixed"] == res["broken"] == 0
    assert res["test_score"] == res["zero_shot_test_score"]
    assert not any(p.count("Petal Length:") > 1 for p in lm.prompts)  # no demos anywhere


# -- the grid ------------------------------------------------------------------------------------
def test_grid_shares_the_lm_skips_finished_runs_and_resumes_a_killed_one(tmp_path):
    exp = load_experiment(write_experiment(tmp_path))
    made, calls = [], []

    def factory(model, **opts):
        made.append(model)
        return make_lm(tmp_path)

    doc = run_experiment(exp, lm_factory=factory, trainer=fake_trainer(calls))
    assert made == ["fake-model"]  # one LM for all six runs
    assert [c["status"] for c in doc["cells"]] == ["ok"] * 6
    assert [(c["strategy"], c["seed"]) for c in doc["cells"]] == [
        ("zero-shot", 0), ("p", 0), ("w -> p", 0), ("zero-shot", 1), ("p", 1), ("w -> p", 1)]
    out = tmp_path / "out"
    assert (out / "results.json").exists() and (out / "table.md").exists()
    cell = out / "iris" / "fake-model" / "wp-s1"
    assert (step_dir(cell, "w") / "record.json").exists()
    before = json.loads((cell / "results.json").read_text())
    n_trained = len(calls)

    # Again: everything is finished, so no LM is even built.
    run_experiment(exp, lm_factory=factory, trainer=fake_trainer(calls))
    assert made == ["fake-model"]

    # A run killed during its second step: only that step runs again.
    for name in ("results.json", "test_records.json"):
        (cell / name).unlink()
    shutil.rmtree(step_dir(cell, "p"))
    shutil.rmtree(cell / "final")
    doc = run_experiment(exp, lm_factory=factory, trainer=fake_trainer(calls))
    assert made == ["fake-model", "fake-model"]
    assert len(calls) == n_trained  # the finished weight step was not redone
    after = json.loads((cell / "results.json").read_text())
    assert after["test_score"] == before["test_score"]
    assert [h["val_score"] for h in after["history"]] == [h["val_score"] for h in before["history"]]
    assert all(c["status"] == "ok" for c in doc["cells"])


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, strategies=("w", "p"), seeds=(0,)))

    def boom(*a, **k):
        raise RuntimeError("trainer exploded")

    doc = run_experiment(exp, lm_factory=lambda m, **o: make_lm(tmp_path), trainer=boom)
    status = {c["strategy"]: c["status"] for c in doc["cells"]}
    assert status == {"w": "failed", "p": "ok"}
    assert "trainer exploded" in doc["cells"][0]["error"]
    assert "Failed runs" in (tmp_path / "out" / "table.md").read_text()


def test_overrides_win_over_the_file(tmp_path):
    exp = load_experiment(write_experiment(tmp_path), ["seeds=3", "sizes=20,10,10", "lora.epochs=1",
                                                       "strategies=p,w -> p"])
    cells = exp.cells()
    assert [(c.strategy, c.seed) for c in cells] == [("p", 3), ("w -> p", 3)]
    assert cells[0].cfg.sizes == (20, 10, 10) and cells[0].cfg.lora == {"epochs": 1}
    with pytest.raises(ValueError, match="unknown setting"):
        load_experiment(write_experiment(tmp_path), ["nonsense=1"])
    with pytest.raises(ValueError, match="unknown step"):
        load_experiment(write_experiment(tmp_path), ["strategies=p -> x"])
    assert load_experiment(write_experiment(tmp_path), ["format=markers"]).cells()[0].cfg.format == "markers"
    with pytest.raises(ValueError, match="unknown prompt format 'chat'"):
        load_experiment(write_experiment(tmp_path), ["format=chat"])


def test_a_grid_over_data_seeds_pairs_runs_and_writes_statistics(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, extra="data_seeds = [0, 1]\n"))
    assert exp.data_seeds == [0, 1] and exp.seeds == [0, 1]
    doc = run_experiment(exp, lm_factory=lambda m, **o: make_lm(tmp_path), trainer=fake_trainer([]))
    out = tmp_path / "out"
    assert [(c["strategy"], c["split_seed"], c["seed"], c["status"]) for c in doc["cells"][:4]] == [
        ("zero-shot", 0, 0, "ok"), ("p", 0, 0, "ok"), ("w -> p", 0, 0, "ok"), ("zero-shot", 1, 0, "ok")]
    runs = out / "iris" / "fake-model"
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        f"{slug}-d{d}-s{s}" for slug in ("zero-shot", "p", "wp") for d in (0, 1) for s in (0, 1))
    assert json.loads((runs / "p-d1-s0" / "config.json").read_text())["resolved"]["split_seed"] == 1

    def records(name):
        return json.loads((runs / name / "test_records.json").read_text())

    def examples(name):
        return [r["example"] for r in records(name)]

    assert examples("zero-shot-d0-s0") == examples("zero-shot-d0-s1") != examples("zero-shot-d1-s0")

    saved = json.loads((out / "results.json").read_text())
    assert saved["statistics"] == doc["statistics"] and saved["experiment"]["data_seeds"] == [0, 1]
    st = doc["statistics"]["iris"]["fake-model"]
    t3 = sps.t.ppf(0.975, 3)
    for s in ("zero-shot", "p", "w -> p"):
        scores = [c["test_score"] for c in doc["cells"] if c["strategy"] == s]
        half = t3 * statistics.stdev(scores) / 2
        assert st["strategies"][s]["runs"] == 4
        assert st["strategies"][s]["test_mean"] == round(statistics.fmean(scores), 2)
        if half:
            assert st["strategies"][s]["test_ci95"] == pytest.approx(
                [statistics.fmean(scores) - half, statistics.fmean(scores) + half], abs=0.006)
        else:
            assert st["strategies"][s]["test_ci95"] == [st["strategies"][s]["test_mean"]] * 2
    assert st["best_combined"] == "w -> p"
    assert [(c["a"], c["b"]) for c in st["comparisons"]] == [("p", "zero-shot"), ("w -> p", "zero-shot"),
                                                            ("w -> p", "p")]
    # p against zero-shot, by hand: run pairs by (data seed, seed), every test example of each pooled
    comp = st["comparisons"][0]
    a_better = b_better = 0
    diffs = []
    for d in (0, 1):
        for seed in (0, 1):
            mine, base = records(f"p-d{d}-s{seed}"), records(f"zero-shot-d{d}-s{seed}")
            a_better += sum(x["score"] > y["score"] for x, y in zip(mine, base))
            b_better += sum(x["score"] < y["score"] for x, y in zip(mine, base))
            diffs.append(100 * (sum(x["score"] for x in mine) - sum(y["score"] for y in base)) / len(mine))
    assert (comp["pairs"], comp["run_pairs"], comp["method"]) == (60, 4, "mcnemar-exact")
    assert (comp["a_better"], comp["b_better"]) == (a_better, b_better) and a_better > b_better
    p = sps.binomtest(b_better, a_better + b_better, 0.5).pvalue
    assert comp["p_value"] == float(f"{p:.3g}")
    assert comp["diff"] == pytest.approx(statistics.fmean(diffs), abs=0.006)
    half = t3 * statistics.stdev(diffs) / 2
    assert comp["diff_ci95"] == pytest.approx([statistics.fmean(diffs) - half, statistics.fmean(diffs) + half],
                                              abs=0.006)

    table = (out / "table.md").read_text()
    assert "Data splits (seeds): [0, 1]." in table
    row = next(line for line in table.splitlines() if line.startswith("| p |")).replace("**", "")
    assert row.endswith("(n=4) |") and f"{st['strategies']['p']['test_mean']:.1f} [" in row
    paired = table.split("### Paired tests: Iris, fake-model")[1]
    assert f"| p | zero-shot | {comp['diff']:+.1f} | [{comp['diff_ci95'][0]:+.1f}, {comp['diff_ci95'][1]:+.1f}] |" in paired
    assert f"| {a_better} / {b_better} | 60 | 4 |" in paired

    html_path, md = write_report(out)
    html = html_path.read_text()
    assert "Intervals and paired tests" in html and "data split 1" in html
    assert html.count("mcnemar-exact") == 3  # the paired tests once, in the task's section
    assert "### Paired tests: Iris, fake-model" in md


def test_data_seeds_must_be_integers_and_data_seed_stays_one_split(tmp_path):
    for bad in ('data_seeds = [0, "a"]', "data_seeds = 3", "data_seeds = [0, 1.5]", "data_seeds = []",
                "data_seeds = [true]"):
        with pytest.raises(ValueError) as err:
            load_experiment(write_experiment(tmp_path, extra=bad + "\n"))
        shown = bad.split(" = ")[1].replace(", ", ",").replace(",", ", ")
        assert str(err.value) == f"data_seeds: expected a non-empty list of integers, got {shown}"
    with pytest.raises(ValueError, match=re.escape('data_seeds: expected a non-empty list of integers, got [0, "x"]')):
        load_experiment(write_experiment(tmp_path), ["data_seeds=0,x"])
    with pytest.raises(ValueError, match=re.escape("data_seeds: repeats a value: [1, 1]")):
        load_experiment(write_experiment(tmp_path), ["data_seeds=1,1"])
    with pytest.raises(ValueError, match="not both"):
        load_experiment(write_experiment(tmp_path, extra="data_seed = 0\ndata_seeds = [0, 1]\n"))
    with pytest.raises(ValueError, match=re.escape('data_seed: expected an integer, got "a"')):
        load_experiment(write_experiment(tmp_path, extra='data_seed = "a"\n'))

    # data_seed = n: one split for every run, directory names as before
    one = load_experiment(write_experiment(tmp_path, extra="data_seed = 3\n"))
    assert one.data_seeds == [3] and "data_seed" not in one.settings
    assert [(c.run_dir.name, c.cfg.split_seed()) for c in one.cells()[:2]] == [("zero-shot-s0", 3), ("p-s0", 3)]
    # --set wins over the file, either way round
    many = load_experiment(write_experiment(tmp_path, extra="data_seed = 3\n"), ["data_seeds=4,5"])
    assert [c.run_dir.name for c in many.cells()][:4] == ["zero-shot-d4-s0", "p-d4-s0", "wp-d4-s0", "zero-shot-d5-s0"]
    back = load_experiment(write_experiment(tmp_path, extra="data_seeds = [0, 1]\n"), ["data_seed=2"])
    assert back.data_seeds == [2] and {c.cfg.data_seed for c in back.cells()} == {2}
    # no data seed at all: each seed draws its own split, as before
    plain = load_experiment(write_experiment(tmp_path))
    assert plain.data_seeds is None and [c.cfg.split_seed() for c in plain.cells()] == [0, 0, 0, 1, 1, 1]


# -- the report ----------------------------------------------------------------------------------
def test_report_of_an_experiment_and_of_one_run(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, strategies=("zero-shot", "p", "p -> w"), seeds=(0, 1)))
    run_experiment(exp, lm_factory=lambda m, **o: make_lm(tmp_path), trainer=fake_trainer([]))
    path, md = write_report(tmp_path / "out")
    text = path.read_text()
    assert path == tmp_path / "out" / "report.html"
    for section in ("Results table", "Paper (Table 1)", "Scores after each step", "Time and tokens per step",
                    "Intervals and paired tests", "Instructions and demos", "Fixed and broken test examples",
                    "fixed"):
        assert section in text, section
    stats = json.loads((tmp_path / "out" / "results.json").read_text())["statistics"]["iris"]["fake-model"]
    p = stats["strategies"]["p"]
    interval = f"{p['test_mean']:.1f} [{p['test_ci95'][0]:.1f}, {p['test_ci95'][1]:.1f}] (n=2)"
    # in the results table (maybe bold: the best) and in the task's intervals (test, then dev)
    assert re.search(r"<tr><td>p</td><td>(<b>)?" + re.escape(interval) + r"(</b>)?</td></tr>", text)
    assert f"<tr><td>p</td><td>{interval}</td><td>{p['dev_mean']:.1f}" in text
    assert [(c["a"], c["b"]) for c in stats["comparisons"]] == [("p", "zero-shot"), ("p -> w", "zero-shot"),
                                                               ("p -> w", "p")]
    assert text.count("mcnemar-exact") == 3
    assert text.count("src='data:image/png;base64,") >= 2
    assert not re.search(r"(src|href)=['\"]https?:", text)  # self-contained
    assert "| strategy | Iris |" in md and "fixed" in md

    single, md1 = write_report(tmp_path / "out" / "iris" / "fake-model" / "pw-s0", out=tmp_path / "one.html")
    html = single.read_text()
    for section in ("Scores after each step", "Time and tokens per step", "Returned program", "demo 1",
                    "Test examples fixed and broken", "zero-shot prediction"):
        assert section in html, section
    assert html.count("data:image/png;base64,") == 3  # scores, time and tokens, the LoRA loss
    assert "| 1 | p | ok |" in md1 and "fixed" in md1


def test_cli_experiment_and_report(tmp_path, monkeypatch, capsys):
    from tandem.cli import main
    from tandem.lm.registry import register_backend

    register_backend("fakebackend", lambda model, **kw: make_lm(tmp_path))
    cfg = tmp_path / "exp.toml"
    cfg.write_text(f"tasks = [\"iris\"]\nmodels = [\"fakebackend:m\"]\nstrategies = [\"zero-shot\", \"p\"]\n"
                   f"seeds = [0]\nout = \"{tmp_path / 'out'}\"\nsizes = [30, 15, 15]\nnum_candidates = 2\n")
    assert main(["experiment", str(cfg), "--dry-run"]) == 0
    assert main(["experiment", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "| zero-shot |" in out and "| p |" in out
    assert (tmp_path / "out" / "iris" / "fakebackend_m" / "p-s0" / "results.json").exists()
    assert main(["report", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").exists()
    run_dir = tmp_path / "single"
    assert main(["optimize", "iris", "--model", "fakebackend:m", "--strategy", "p", "--run-dir", str(run_dir),
                 "--set", "sizes=30,15,15", "--set", "num_candidates=2"]) == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["strategy"] == "p" and "model_load_s" in res and (run_dir / "baseline_records.json").exists()


# -- the registry --------------------------------------------------------------------------------
needs_gsm8k = pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").is_file(), reason="shared GSM8K data missing")
needs_hotpot = pytest.mark.skipif(not (DATA / "hotpotqa" / "train.jsonl").is_file(),
                                  reason="shared HotPotQA data missing")


@needs_gsm8k
def test_registry_loads_gsm8k_from_the_shared_data():
    task = get_task("gsm8k")
    data = task.load(data=None, seed=0)  # found at ../shared/data/gsm8k
    assert [len(data[s]) for s in ("train", "dev", "test")] == [1000, 500, 1319] == list(task.sizes)
    assert task.prompt_sizes == (100, 250)
    small = task.load(data=str(DATA / "gsm8k"), seed=0, sizes=(20, 10, 5))
    assert [len(small[s]) for s in ("train", "dev", "test")] == [20, 10, 5]
    program = task.make_program(data)
    assert [n for n, _ in program.named_predictors()] == ["solve"]
    assert task.metric(data["test"][0], {"answer": data["test"][0]["answer"]}) == 1.0


@needs_hotpot
def test_registry_loads_hotpotqa_and_builds_its_program_from_the_data():
    task = get_task("hotpotqa")
    data = task.load(seed=0)
    assert [len(data[s]) for s in ("train", "dev", "test")] == [400, 200, 300]
    assert task.program_takes_data and task.prompt_sizes == (100, 250)
    program = task.make_program(data)
    assert [n for n, _ in program.named_predictors()] == ["generate_query[0]", "generate_query[1]",
                                                         "generate_answer"]
    assert program.retriever is data.retriever()
    with pytest.raises(ValueError, match="loaded data"):
        task.make_program()


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="--data PATH"):
        default_data("no-such-task")
    assert default_data("gsm8k", "given/path") == "given/path"


def _hotpot_reply(text: str) -> str:
    question = re.findall(r"Question: (.*)", text)[-1]
    if "Search Query: " in text.split("<|user|>")[0]:
        return f" look it up\nSearch Query: {question}"
    return " from the context\nAnswer: yes"


@needs_hotpot
def test_hotpotqa_runs_through_run_cell_and_resumes_with_its_retriever(tmp_path):
    lm = FakeLM(_hotpot_reply)
    lm.model_dir = tmp_path
    cfg = load_config(None, ["sizes=30,10,10", "threads=8", "num_candidates=2"], task="hotpotqa",
                      strategy="p -> w", data=str(DATA / "hotpotqa"))
    calls: list = []
    res = run_cell(cfg, lm, run_dir=tmp_path / "run", trainer=fake_trainer(calls))
    assert kinds(res["history"]) == ["p", "w"] and res["test_n"] == 10
    assert res["prompt_sizes"] == [9, 21]  # the paper's 100/250, scaled to 30
    rec = json.loads((tmp_path / "run" / "test_records.json").read_text())[0]
    assert rec["prediction"]["retrieved_titles"] and "gold_titles" in rec["example"]
    (tmp_path / "run" / "results.json").unlink()
    again = run_cell(cfg, lm, run_dir=tmp_path / "run", trainer=fake_trainer(calls))  # resumes: no step reruns
    assert again["test_score"] == res["test_score"] and len(calls) <= 1


def test_a_stale_baseline_in_the_run_dir_is_not_reused(tmp_path):
    lm = make_lm(tmp_path)
    run = tmp_path / "run"
    run_cell(load_config(None, ["sizes=30,15,15"], task="iris", strategy="p"), lm, run_dir=run)
    assert json.loads((run / "baseline_records.json").read_text())["n"] == 15
    res = run_cell(load_config(None, ["sizes=30,15,10"], task="iris", strategy="p"), lm, run_dir=run, resume=False)
    assert json.loads((run / "baseline_records.json").read_text())["n"] == 10 == res["test_n"]


def test_finished_runs_with_other_settings_are_flagged(tmp_path):
    cfg = write_experiment(tmp_path, strategies=("zero-shot",), seeds=(0,))
    run_experiment(load_experiment(cfg), lm_factory=lambda m, **o: make_lm(tmp_path))
    assert not load_experiment(cfg).cells()[0].stale()
    notes: list = []
    run_experiment(load_experiment(cfg, ["sizes=20,10,10"]), lm_factory=lambda m, **o: make_lm(tmp_path),
                   info=notes.append)
    assert load_experiment(cfg, ["sizes=20,10,10"]).cells()[0].stale()
    assert any("other settings" in n for n in notes)


def test_per_task_section_of_a_task_left_out_is_ignored_a_typo_is_an_error(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('tasks = ["iris", "gsm8k"]\nmodels = ["m"]\n[per_task.gsm8k]\nsizes = [4, 4, 4]\n')
    exp = load_experiment(cfg, ["tasks=iris"])  # narrowed on the command line: the gsm8k section is unused
    assert exp.tasks == ["iris"]
    cfg.write_text('tasks = ["iris"]\nmodels = ["m"]\n[per_task.irs]\nsizes = [4, 4, 4]\n')
    with pytest.raises(ValueError, match="irs"):
        load_experiment(cfg)
