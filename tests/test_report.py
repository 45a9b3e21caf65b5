"""``tandem report`` on run directories made with the scripted FakeLM: what the HTML and the markdown hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tandem.experiments.config import load_config
from tandem.experiments.grid import load_experiment, run_experiment
from tandem.experiments.report import write_report
from tandem.experiments.run import run_cell
from tandem.lm import FakeLM
from tandem.train import TrainResult

LOSSES = [round(1.0 - 0.08 * i, 2) for i in range(12)]  # 1.00 ... 0.12: twelve optimizer steps
SCRIPT = '<script>alert("run")</script>'


def _petal(text: str) -> float:
    return float(re.findall(r"Petal Length: ([\d.]+)", text)[-1])


def base_reply(text: str) -> str:
    """Zero-shot: 'setosa', and no answer at all for long petals (a parse failure). With demos: a rule."""
    pl = _petal(text)
    if text.count("Petal Length:") > 1:
        return f" rule\nSpecies: {'setosa' if pl < 2.5 else 'versicolor' if pl < 4.85 else 'virginica'}"
    return " no idea" if pl >= 5.5 else " guess\nSpecies: setosa"


class _AnyAdapter(dict):
    def get(self, key, default=None):
        return lambda text: f" tuned\nSpecies: {'setosa' if _petal(text) < 2.5 else 'virginica'}"


def make_lm(tmp_path: Path) -> FakeLM:
    lm = FakeLM(base_reply)
    lm.model_dir = tmp_path  # allows weight steps
    lm.adapter_replies = _AnyAdapter()
    return lm


def trainer(model_dir, examples, cfg, out_dir, progress=None, overwrite=False):
    """A ``train_lora`` stand-in that writes tandem_adapter.json with the whole loss curve, as training does."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text("{}")
    result = TrainResult(out, len(examples), 0, len(LOSSES), 10, 20, list(LOSSES), 0.1, 1234, False, "eager")
    training = {**result.to_dict(), "final_loss": LOSSES[-1]}
    training.pop("adapter_dir")
    (out / "tandem_adapter.json").write_text(json.dumps({"format": "tandem-adapter", "training": training}))
    return result


@pytest.fixture
def run_dir(tmp_path) -> Path:
    cfg = load_config(None, ["sizes=30,15,15", "threads=8", "num_candidates=3"], task="iris", strategy="p -> w")
    run_cell(cfg, make_lm(tmp_path), run_dir=tmp_path / "run", trainer=trainer)
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    res["model_load_s"] = 42.5  # what `tandem optimize` adds after the run
    (run / "results.json").write_text(json.dumps(res))
    return run


def test_the_markdown_summary_is_saved_next_to_the_html(run_dir, tmp_path):
    path, md = write_report(run_dir)
    assert path == run_dir / "report.html"
    assert (run_dir / "report.md").read_text() == md
    assert "| 1 | p | ok |" in md and "model load 42.5 s" in md

    other, md2 = write_report(run_dir, out=tmp_path / "elsewhere" / "r.html")
    assert (tmp_path / "elsewhere" / "r.md").read_text() == md2 == md


def test_run_report_has_losses_candidates_failures_settings_and_times(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    history = res["history"]
    text = write_report(run_dir)[0].read_text()

    # the LoRA loss curve: the whole curve from tandem_adapter.json (history.json keeps the last five)
    w = next(h for h in history if h["kind"] == "w")
    assert [len(a["losses"]) for a in w["extra"]["adapters"].values()] == [5]
    loss = text.split("<h2>LoRA training loss</h2>")[1]
    assert "alt='LoRA training loss'" in text
    assert "<td class='num'>12</td>" in loss and "<td class='num'>1.000</td>" in loss  # steps, first loss
    assert "<td class='num'>0.120</td>" in loss  # the last loss

    # the prompt step's candidates, each with its score; the chosen one is marked
    p = next(h for h in history if h["kind"] == "p")
    cands = text.split("Prompt step candidates")[1]
    for c in p["extra"]["candidates"]:
        assert re.search(rf"<td>{re.escape(c['candidate'])}( \(chosen\))?</td><td class='num'>{c['score']:.1f}</td>",
                         cands), c
    assert cands.count("(chosen)") == 1

    # failure kinds per step: zero-shot fails to parse on long petals, on dev and on test
    start = history[0]
    assert start["kind"] == "start" and start["extra"]["val_failures"].get("parse")
    assert f"parse: {start['extra']['val_failures']['parse']}" in text
    assert "zero-shot test failures" in text

    # the settings (config.json)
    settings = text.split("<h2>Settings</h2>")[1]
    assert re.search(r"<th>num_candidates</th><td>3</td>", settings)
    assert re.search(r"<th>strategy</th><td>p -&gt; w</td>", settings)

    # model load and total time, next to the steps' own time, each said what it counts
    times = text.split("<h2>Time</h2>")[1]
    assert "<td class='num'>42.5</td>" in times
    assert f"<td class='num'>{42.5 + res['wall_s']:.1f}</td>" in times
    assert f"<td class='num'>{res['optimize_s']:.1f}</td>" in times
    assert "the CLI's total" in times


def test_run_text_is_escaped(run_dir):
    """Text from a run (examples, predictions, instructions, candidates, settings) is never markup."""
    res = json.loads((run_dir / "results.json").read_text())
    fixed_or_any = json.loads((run_dir / "test_records.json").read_text())
    base = json.loads((run_dir / "baseline_records.json").read_text())
    i = next(r["index"] for r, b in zip(fixed_or_any, base["records"]) if r["score"] > b["score"])
    for rec in (fixed_or_any[i], base["records"][i]):
        rec["example"]["sepal_length"] = SCRIPT  # the same example on both sides, so it still counts as fixed
    fixed_or_any[i]["prediction"] = {"reasoning": SCRIPT, "species": "virginica"}
    (run_dir / "test_records.json").write_text(json.dumps(fixed_or_any))
    (run_dir / "baseline_records.json").write_text(json.dumps(base))
    program = json.loads((run_dir / "final" / "program.json").read_text())
    for state in program["predictors"].values():
        state["signature"]["instructions"] = SCRIPT
    (run_dir / "final" / "program.json").write_text(json.dumps(program))
    p = next(h for h in res["history"] if h["kind"] == "p")
    p["extra"]["candidates"][0]["candidate"] = SCRIPT
    p["detail"] = SCRIPT
    res["model"] = SCRIPT
    (run_dir / "results.json").write_text(json.dumps(res))
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["data"] = SCRIPT
    (run_dir / "config.json").write_text(json.dumps(cfg))

    text = write_report(run_dir)[0].read_text()
    assert "<script" not in text
    # example, prediction, instructions, candidate, detail, model (title and header), settings
    assert text.count("&lt;script&gt;alert(") >= 8


def test_experiment_report_has_settings_load_time_and_saves_markdown(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(f"tasks = [\"iris\"]\nmodels = [\"fake-model\"]\nstrategies = [\"zero-shot\", \"p\"]\n"
                   f"seeds = [0]\nout = \"{tmp_path / 'out'}\"\nthreads = 8\nnum_candidates = 2\n"
                   "[per_task.iris]\nsizes = [30, 15, 15]\n")
    run_experiment(load_experiment(cfg), lm_factory=lambda m, **o: make_lm(tmp_path))
    path, md = write_report(tmp_path / "out")
    assert (tmp_path / "out" / "report.md").read_text() == md
    text = path.read_text()
    settings = text.split("<h2>Settings</h2>")[1]
    assert re.search(r"<th>num_candidates</th><td>2</td>", settings)
    assert "model load, fake-model" in text
    assert "Prompt step candidates" in text  # each run's details


def test_loss_parts_fall_back_to_history_and_skip_other_adapter_records(tmp_path):
    from tandem.experiments.report_run import loss_parts

    history = [
        {"kind": "start"},
        {"kind": "w", "extra": {"adapters": {"gone/steps/01-w/out/adapter": {
            "steps": 12, "losses": LOSSES[-5:], "n_examples": 9, "modules": ["classify"]}}}},
        {"kind": "r", "extra": {"adapters": {"classify": "steps/02-r/out/adapter-step4"}}},  # not a training record
    ]
    (parts,) = loss_parts(tmp_path, history)  # no adapter folder: the last five losses history.json kept
    assert parts["step"] == 1 and parts["losses"] == LOSSES[-5:] and not parts["whole"]
    assert parts["row"][-1] == "last 5 steps only"


# -- the RL step's reward curve ---------------------------------------------------------------------------
def seeded_iris(text: str, params) -> str:
    """Right for odd sampling seeds, 'setosa' for even ones: rollouts of one example differ."""
    pl = _petal(text)
    right = "setosa" if pl < 2.5 else "versicolor" if pl < 4.85 else "virginica"
    return f" r\nSpecies: {right if (params.seed or 0) % 2 else 'setosa'}"


class RecordingPolicy:
    """A Policy stand-in: counts updates, saves tandem_adapter.json as Policy.save does."""

    def __init__(self, model_dir, lora, **kw):
        self.n, self.trainable_params = 0, 10

    def update(self, items):
        from tandem.train.grpo import UpdateStats

        self.n += 1
        return UpdateStats(len(items), 0, 7 * len(items), 0.5 / self.n, None, 0.0, 1.0, 0.01)

    def save(self, out_dir, training=None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text("{}")
        (out / "tandem_adapter.json").write_text(json.dumps({"training": {"updates": self.n, **(training or {})}}))
        return out


def test_run_report_plots_and_tabulates_the_rl_reward_curve(tmp_path, monkeypatch):
    import tandem.optimize as optimize

    class FakeGRPO(optimize.GRPO):
        def __init__(self, metric, settings=None, **kw):
            super().__init__(metric, settings, policy_factory=RecordingPolicy, **kw)

    monkeypatch.setattr(optimize, "GRPO", FakeGRPO)
    lm = FakeLM(seeded_iris)
    lm.model_dir = tmp_path
    cfg = load_config(None, ["sizes=30,15,15", "threads=8", "rl.steps=3", "rl.batch_size=2", "rl.rollouts=4"],
                      task="iris", strategy="r")
    run_cell(cfg, lm, run_dir=tmp_path / "run")
    history = json.loads((tmp_path / "run" / "results.json").read_text())["history"]
    r = history[-1]
    steps = r["extra"]["steps"]
    assert r["kind"] == "r" and r["status"] == "ok" and len(steps) == 3
    assert {"reward_std", "reward_min", "reward_max", "usage", "trained_tokens", "sync_s"} <= set(steps[0])
    assert set(r["extra"]["phases_s"]) == {"rollout", "train", "sync", "checkpoint"}
    assert r["extra"]["tokens"]["trained"] == sum(s["trained_tokens"] for s in steps) > 0

    path, md = write_report(tmp_path / "run")
    text = path.read_text()
    section = text.split("<h2>RL reward curve</h2>")[1].split("<h2>")[0]
    assert "alt='RL reward curve'" in section
    for s in steps:  # one row per RL step: its number, mean reward, std and equal-reward groups
        assert re.search(rf"<td class='num'>{s['step']}</td><td class='num'>{s['mean_reward']:.3f}</td>"
                         rf"<td class='num'>{s['reward_std']:.3f}</td>", section), s
        assert f"<td>{s['zero_variance_groups']}/{s['groups']}</td>" in section
    assert "<td>adapter-step003</td><td class='num'>3</td><td>classify</td>" in section  # the LoRA it ended with
    first, last = steps[0]["mean_reward"], steps[-1]["mean_reward"]
    assert f"step 1 RL mean reward: {first:.3f} -> {last:.3f} over 3 RL steps" in md
    assert "no weight step trained an adapter" in text  # the RL step's adapters are not read as SFT records
