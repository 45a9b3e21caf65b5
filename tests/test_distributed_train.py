"""LoRA training across processes (torchrun, DDP over gloo) against one process, on the tiny model.

The slow tests launch real torchrun groups of 2 CPU processes. The same
data, seed and global batch must give the same per-step losses and the same
adapter as one process, within a tolerance that floating-point summation
order explains: the all-reduce adds the two ranks' partial gradient sums
instead of one sum over the batch, and each rank pads its rows to its own
width. Measured here: losses within 1.3e-6 of each other, adapter weights
within 3.9e-5 (relative Frobenius difference 6.6e-6). One process under
torchrun (the same DDP code, no split) gave bitwise the single-process
adapter. Without the all-reduce (each rank stepping on its own shard) the
same check fails by four orders of magnitude more (weights 0.135 apart,
losses 0.11), which ``test_without_all_reduce_the_comparison_fails`` shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tandem.experiments.config import RunConfig  # noqa: E402
from tandem.train import LoRAConfig, SFTExample, load_adapter_meta, train_lora  # noqa: E402
from tandem.train import launch as launch_module  # noqa: E402
from tandem.train.distributed import lora_config, parser, read_sft  # noqa: E402
from tandem.train.launch import LaunchFailed, child_env, launch, write_sft  # noqa: E402
from tandem.train.ranks import Ranks, join, leave, rank_device  # noqa: E402

#: 7 examples in global batches of 3: shards of 2 and 1 rows, and a last batch of 1 that leaves rank 1 empty.
CONFIG = LoRAConfig(method="lora", rank=4, alpha=8, epochs=3, batch_size=3, learning_rate=1e-2, device="cpu", bf16=False, seed=0,
                    attention="eager")
LOSS_TOL = 1e-5  # per step, absolute (losses ~10.8); measured 1.3e-6
WEIGHT_TOL = 5e-4  # per adapter weight, absolute (largest |w| ~0.19); measured 3.9e-5
WEIGHT_REL_TOL = 1e-4  # ||a - b|| / ||a|| over the whole adapter; measured 6.6e-6


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def prompt(i: int) -> str:
        msgs = [{"role": "user", "content": f"What is {i} plus {3 * i}?" + " Think step by step." * (i % 4)}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "Reasoning:"

    return [SFTExample(prompt(i), f" add them.\nAnswer: {4 * i}", "qa") for i in range(7)]


@pytest.fixture(scope="module")
def single(tiny_model_dir, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "adapter"
    return train_lora(tiny_model_dir, examples, CONFIG, out)


def adapter_weights(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(adapter_dir) / "adapter_model.safetensors")


def differences(a_dir: Path, b_dir: Path) -> list[str]:
    """What differs beyond the tolerances between two trained adapter folders: losses step by step, weights."""
    a_losses = load_adapter_meta(a_dir)["training"]["losses"]
    b_losses = load_adapter_meta(b_dir)["training"]["losses"]
    found = []
    if len(a_losses) != len(b_losses):
        return [f"{len(a_losses)} steps against {len(b_losses)}"]
    for step, (x, y) in enumerate(zip(a_losses, b_losses), 1):
        if abs(x - y) > LOSS_TOL:
            found.append(f"step {step}: loss {x:.6f} against {y:.6f}")
    a, b = adapter_weights(a_dir), adapter_weights(b_dir)
    if a.keys() != b.keys():
        return found + ["other tensors"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    rel = (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum((a[k] ** 2).sum() for k in a)).sqrt().item()
    if worst > WEIGHT_TOL or rel > WEIGHT_REL_TOL:
        found.append(f"weights differ by up to {worst:.3g} (relative {rel:.3g})")
    return found


# --- settings, data and plumbing (fast) ---


def test_processes_setting_is_checked():
    assert RunConfig(lora={"processes": 2}).lora_config().processes == 2
    with pytest.raises(ValueError, match=r"\[lora\] processes must be a whole number >= 1, not 0"):
        RunConfig(lora={"processes": 0}).lora_config()
    with pytest.raises(ValueError, match=r"\[lora\] processes = 3 is more than batch_size = 2"):
        LoRAConfig(processes=3, batch_size=2)
    assert LoRAConfig(processes=2).to_dict()["processes"] == 2  # recorded in tandem_adapter.json and plan.json


def test_rank_devices():
    assert rank_device("cpu", 1, 2) == "cpu"
    assert rank_device("cuda", 1, 2) == "cuda:1"
    assert rank_device("cuda:3", 0, 1) == "cuda:3"
    with pytest.raises(ValueError, match=r"device = 'cuda:3' with 2 training processes"):
        rank_device("cuda:3", 0, 2)


def test_each_rank_takes_every_world_th_row():
    rows = list(range(5))
    shards = [Ranks(r, 2, r, "cpu").shard(rows) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert Ranks(2, 3, 2, "cpu").shard([7, 8]) == []  # joins the step with a zero-weighted row


def test_entry_reads_settings_and_data(tmp_path):
    args = parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--lora", '{"rank": 16, "epochs": 2}',
                                "--epochs", "3", "--target-modules", "q_proj,v_proj", "--bf16", "false"])
    cfg = lora_config(args, processes=2)
    assert (cfg.rank, cfg.epochs, cfg.target_modules, cfg.bf16, cfg.processes) == (16, 3, ("q_proj", "v_proj"),
                                                                                  False, 2)
    with pytest.raises(SystemExit, match=r"--lora: unknown LoRAConfig fields \['rnak'\]"):
        lora_config(parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--lora", '{"rnak": 1}']), 1)

    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"group": "a", "module": "m1", "prompt": "p", "completion": "c"}) + "\n"
                    + json.dumps({"group": "b", "module": "m2", "prompt": "q", "completion": "d"}) + "\n")
    with pytest.raises(SystemExit, match=r"holds 2 groups \(one LoRA each\): pick one with --group \(a, b\)"):
        read_sft(data, None)
    assert read_sft(data, "b") == [SFTExample("q", "d", "m2")]
    data.write_text('{"prompt": "p"}\n')
    with pytest.raises(SystemExit, match=r"sft.jsonl line 1: needs string fields prompt and completion"):
        read_sft(data, None)


def test_processes_above_one_hand_training_to_the_launcher(tiny_model_dir, examples, tmp_path, monkeypatch):
    calls = []

    def fake_launch(model_dir, exs, config, out_dir, progress, *, overwrite):
        calls.append((config.processes, len(exs), overwrite))
        return {"n_examples": 7, "n_dropped": 0, "steps": 9, "completion_tokens": 1, "total_tokens": 2,
                "losses": [1.0], "wall_s": 0.5, "trainable_params": 3, "bf16": False, "attention": "eager",
                "final_loss": 1.0}

    monkeypatch.setattr(launch_module, "launch", fake_launch)
    result = train_lora(tiny_model_dir, examples, replace(CONFIG, processes=2), tmp_path / "a")
    assert calls == [(2, 7, False)]
    assert (result.steps, result.losses, result.adapter_dir) == (9, [1.0], tmp_path / "a")


def test_launcher_passes_steps_on_and_reports_a_failure(tmp_path, monkeypatch):
    script = tmp_path / "fake_torchrun.py"
    script.write_text(textwrap.dedent("""\
        print("step 1/2 loss 3.5", flush=True)
        print("step 2/2 loss 2.25", flush=True)
        print("Traceback ...\\nRuntimeError: rank 1 ran out of memory", flush=True)
        raise SystemExit(3)
    """))
    monkeypatch.setattr(launch_module, "torchrun_command", lambda n, args: [sys.executable, str(script)])
    seen = []
    with pytest.raises(LaunchFailed, match=r"(?s)in 2 processes \(torchrun\) failed with exit code 3.*out of memory"):
        launch(tmp_path, [SFTExample("p", "c")], replace(CONFIG, processes=2), tmp_path / "out",
               lambda s, t, loss: seen.append((s, t, loss)))
    assert seen == [(1, 2, 3.5), (2, 2, 2.25)]


def test_an_interrupted_launch_stops_the_processes(tmp_path, monkeypatch):
    import time

    script = tmp_path / "fake_torchrun.py"
    script.write_text('import time\nprint("step 1/2 loss 3.5", flush=True)\ntime.sleep(120)\n')
    monkeypatch.setattr(launch_module, "torchrun_command", lambda n, args: [sys.executable, str(script)])

    def interrupt(step, total, loss):
        raise KeyboardInterrupt

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        launch(tmp_path, [SFTExample("p", "c")], replace(CONFIG, processes=2), tmp_path / "out", interrupt)
    assert time.perf_counter() - start < 60  # terminated and waited for, not left to sleep


def test_one_rank_under_ddp_gives_the_single_process_adapter(tiny_model_dir, examples, single, tmp_path,
                                                             monkeypatch):
    """The DDP code path in this process (a gloo group of 1): the loss scaling is exact."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    ranks = join("cpu")
    try:
        train_lora(tiny_model_dir, examples, CONFIG, tmp_path / "a", ranks=ranks)
    finally:
        leave()
    assert differences(single.adapter_dir, tmp_path / "a") == []


# --- real torchrun groups of 2 CPU processes (slow) ---


@pytest.mark.slow
def test_two_processes_train_the_single_process_adapter(tiny_model_dir, examples, single, tmp_path):
    steps = []
    out = tmp_path / "runs" / "adapter"
    two = train_lora(tiny_model_dir, examples, replace(CONFIG, processes=2), out,
                     progress=lambda s, t, loss: steps.append((s, t)))
    assert steps == [(s, 9) for s in range(1, 10)]  # rank 0's progress, once per step
    assert two.steps == single.steps == 9
    assert two.n_examples == 7 and two.completion_tokens == single.completion_tokens
    assert load_adapter_meta(out)["config"]["processes"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # one writer, no leftovers
    assert differences(single.adapter_dir, out) == []


@pytest.mark.slow
def test_without_all_reduce_the_comparison_fails(tiny_model_dir, examples, single, tmp_path):
    """The same entry with DDP taken out: each rank steps on its own shard, and ``differences`` sees it."""
    script = tmp_path / "no_all_reduce.py"
    script.write_text(textwrap.dedent("""\
        import tandem.train.ranks as ranks
        ranks.Ranks.wrap = lambda self, causal_lm: ranks.SummedCompletionLoss(causal_lm)
        from tandem.train.distributed import main
        main()
    """))
    data = tmp_path / "sft.jsonl"
    write_sft(data, examples)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "a"),
           "--lora", json.dumps(CONFIG.to_dict())]
    done = subprocess.run(cmd, env=child_env(2), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "step 9/9 loss" in done.stdout  # the entry's progress lines, from rank 0 only
    assert done.stdout.count("step 1/9 loss") == 1
    found = differences(single.adapter_dir, tmp_path / "a")
    assert any(f.startswith("weights differ") for f in found), found
    assert any(f.startswith("step 9:") for f in found), found


@pytest.mark.slow
def test_the_weight_step_trains_across_processes_with_lora_processes(tiny_model_dir, tmp_path):
    """``[lora] processes = 2`` through BootstrapFinetune: torchrun is started, the adapter is served."""
    from fakes import Mod3, data

    from tandem.lm.hf import HFLM
    from tandem.optimize import BootstrapFinetune

    def any_reply(ex, pred, trace=None):  # the tiny model is random: every trace passes
        return True

    prog = Mod3().set_lm(HFLM(tiny_model_dir))
    config = replace(CONFIG, epochs=1, batch_size=2, processes=2)
    step = BootstrapFinetune(any_reply, config=config, attempts=1, hint_attempts=0, num_threads=4)
    seen = []
    res = step.compile(prog, trainset=data(4), valset=data(2), seed=0, out_dir=tmp_path,
                       progress=lambda what, done, total: seen.append((what, done, total)))
    (rec,) = res.history
    assert rec.status == "ok", rec.detail
    assert ("training", 2, 2) in seen  # rank 0's step lines reached the progress callback
    lm = res.program.solve.lm
    assert isinstance(lm, HFLM) and lm.adapter == tmp_path / "adapter"
    assert load_adapter_meta(lm.adapter)["config"]["processes"] == 2
    assert res.program.solve(x="4").y is not None  # the program runs on the new weights
