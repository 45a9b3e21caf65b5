"""The RL step against TRL's GRPOTrainer: time per RL step on the same model, data and settings.

    .venv/bin/python benchmarks/rl.py                    # -> benchmarks/results/rl_vs_trl.json
    .venv/bin/python benchmarks/rl.py --model-dir DIR --steps 2 --max-tokens 16 --plumbing-reward --out /tmp/rl.json

Issue #14 item 2 asks for a kept library where it fits: TRL's GRPOTrainer (with
peft, and vLLM for generation) for the RL step, unless tandem's own loop is at
least 2x faster per RL step at equal settings. One run, each side in its own
process, one model process alive at a time (the shape of benchmarks/vs_dspy/
run.py's weight-step comparison against SFTTrainer):

1. tandem (this venv; ``--side tandem`` of this file): the RL step as a user
   runs it, ``tandem.optimize.GRPO`` on a one-module program (Iris's
   ``IrisClassifier``, zero-shot, one LM call per rollout: ``fill_missing``
   off, so each rollout is one sampled completion as on TRL's side). Rollouts
   on the in-process vLLM engine (default; ``--tandem-lm hf`` uses tandem's
   transformers backend, for models vLLM's CPU build refuses); the update is
   ``tandem.train.grpo.Policy``; after each update the LoRA is saved and put
   on the engine (merge and weight reload on CPU vLLM). No checkpoints (as
   TRL's ``save_strategy="no"``). It first writes the program's prompts as the
   engine sees them (chat template and reply prefix included) and, after the
   run, the examples each step drew.
2. TRL (benchmarks/vs_dspy/trl_grpo_side.py): ``GRPOTrainer`` + peft
   ``LoraConfig`` on those same prompt strings, in the same order
   (``shuffle_dataset=False``), so every step sees the examples tandem's step
   saw, once per generation mode (``--trl-modes``):
   ``transformers``: TRL's default, ``generate`` on the model being trained,
   in benchmarks/vs_dspy/.venv; ``vllm-colocate``: ``use_vllm=True,
   vllm_mode="colocate"``, a vLLM engine in the trainer's process that gets
   the merged weights pushed before each generation. TRL's venv has no vLLM,
   so this mode runs in tandem's venv (vLLM's CPU build, the same torch,
   transformers and peft) with TRL's venv packages on PYTHONPATH (links in
   the work dir; neither venv is changed). vLLM 0.32 is outside the range TRL
   1.16 names (0.22-0.31): it warns, and ran in the plumbing check. TRL's
   ``server`` mode cannot run here: its weight sync needs CUDA (NCCL).

Tiny models for plumbing checks (``tandem.lm.models.build_tiny_model``): the
tests' default (hidden 64, head_dim 16) is refused by vLLM's CPU attention
("Unsupported CPU attention configuration: head_dim=16"): use ``--tandem-lm hf
--trl-modes transformers`` on it; ``build_tiny_model(dir, hidden=256)``
(head_dim 64) runs on every path. A random model never writes a parseable
species, so every group has equal rewards and nothing trains: add
``--plumbing-reward`` (reward = completion length % 7 / 6 on both sides).

Same on both sides: the checkpoint; the Iris training split (50, data seed 0);
examples per step (``--batch-size``), rollouts per example (TRL's
``num_generations``), sampling temperature, max new tokens (no top-p/top-k);
the reward (tandem's parser of the reply, then ``iris_metric``; a reply that
does not parse scores 0); advantages ``(r - mean) / (std + 1e-4)`` per group;
AdamW at a constant ``--learning-rate``, no weight decay, grad-norm clip 1.0;
LoRA rank 32, alpha 64, dropout 0 on the seven linear projections (tandem's
LoRAConfig); clip epsilon 0.2, beta 0 (no reference model), one optimizer step
per generation batch (mu = 1), the loss averaged over each completion's tokens
then over completions (TRL's ``loss_type="grpo"``); micro-batches of
``--micro-batch`` completions (TRL: ``per_device_train_batch_size`` with
gradient accumulation over the generation batch); bf16 autocast where the CPU
has native bf16 (both sides, as tandem decides; TRL's own default would
emulate it), fp32 weights otherwise; no gradient checkpointing (TRL's GRPOConfig
turns it on by default: ``--trl-gradient-checkpointing`` restores that); the
same torch thread count.

Different by design (each library's own choice, recorded in the JSON):
tandem leaves groups whose rewards are all equal out of the update, TRL trains
on them with advantage 0; with mu = 1 both skip the "old" log-prob forward
(the ratio is 1), except TRL in vLLM mode, which computes it for its
importance-sampling correction (on by default); tandem's
trainer picks eager attention on CPU, TRL uses transformers' default; tandem
stores the frozen base in bf16 when it autocasts to bf16; tandem's engine
options (32-token KV blocks, no chunked prefill) against TRL's ``LLM(...)``
defaults; tandem merges the LoRA into a copy of the weights on disk and reloads
it, TRL's colocate mode pushes the merged weights in memory.

Time per RL step: the wall time of one whole step (rollouts or generation,
rewards, the update, and putting the new weights on the engine where there is one),
averaged over steps 2..N. Step 1 is reported apart: tandem's trainer loads its
copy of the model inside step 1's update, and both sides pay first-call kernel
set-up there. ``speedup`` = TRL's time per RL step / tandem's. Engine start and
TRL's trainer construction (model load) are reported as set-up, outside the
steps. ``speedup`` is against TRL's fastest mode (each mode's own figure is
kept too). Mean reward per step is recorded on both sides; with a few steps it
says nothing about learning, only that the reward is the same computation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
TANDEM_PY = ROOT / ".venv" / "bin" / "python"
TRL_PY = HERE / "vs_dspy" / ".venv" / "bin" / "python"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from machine import write_result  # noqa: E402
from vs_dspy.run import run_side  # noqa: E402  (a side in its own process group, logged, with a timeout)

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- settings shared by both sides -------------------------------------------------------
def settings_from(args) -> dict:
    return {
        "steps": args.steps, "batch_size": args.batch_size, "rollouts": args.rollouts,
        "temperature": args.temperature, "max_tokens": args.max_tokens, "learning_rate": args.learning_rate,
        "lora_rank": 32, "lora_alpha": 64, "lora_dropout": 0.0, "lora_targets": list(TARGETS),
        "clip_epsilon": 0.2, "beta": 0.0, "updates_per_step": 1, "micro_batch": args.micro_batch,
        "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": args.seed, "data_seed": 0, "format_penalty": 0.0,
        "bf16": args.bf16, "threads": args.threads,
        "reward": "plumbing_length" if args.plumbing_reward else "iris",
    }


def plumbing_reward(completion: str) -> float:
    """--plumbing-reward (tiny-model checks only): varies between samples, so groups have a signal to train on."""
    return len(completion) % 7 / 6


# -- tandem's side (runs in this venv as a subprocess: --side tandem) ------------------------
def tandem_side(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tandem.lm.registry import get_lm
    from tandem.optimize.grpo import GRPO, GRPOSettings
    from tandem.settings import tandem_home
    from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris
    from tandem.train import LoRAConfig

    s = json.loads(Path(args.settings).read_text())
    work = Path(args.work_dir)
    merged_root = tandem_home() / "merged"
    merged_before = set(os.listdir(merged_root)) if merged_root.exists() else set()

    t0 = time.perf_counter()
    lm = get_lm(f"{args.tandem_lm}:{args.model_dir}", cache=False)
    lm.start()
    engine_start_s = time.perf_counter() - t0

    program = IrisClassifier().set_lm(lm)
    program.classify.fill_missing = False  # one sampled completion per rollout, as on TRL's side
    train = split_iris(load_iris(), seed=s["data_seed"])["train"]
    prompts = []
    for ex in train:
        req = program.classify.request(ex.inputs(), lm)
        prompts.append({"prompt": req.text, "prefix": req.prompt.prefix, "species": ex["species"]})

    usage_per_step: list[dict] = []

    class Recorded(GRPO):
        """GRPO as is; each step's rollout usage (tokens) is recorded (measurement only)."""

        def rollouts(self, program, batch, step, seed, usage):
            before = usage.to_dict()
            out = super().rollouts(program, batch, step, seed, usage)
            if s["reward"] == "plumbing_length":  # --plumbing-reward: a reward that varies, for tiny-model checks
                for r in out:
                    r.reward = plumbing_reward("".join(e.completion for e in r.entries))
            usage_per_step.append({k: v - before[k] for k, v in usage.to_dict().items()})
            return out

    from dataclasses import fields

    # No checkpoints of the LoRA and AdamW state during the run, as TRL's save_strategy="no" on its side.
    no_checkpoints = {"checkpoint_every": 0} if "checkpoint_every" in {f.name for f in fields(GRPOSettings)} else {}
    lora = LoRAConfig(rank=s["lora_rank"], alpha=s["lora_alpha"], dropout=s["lora_dropout"],
                      target_modules=tuple(s["lora_targets"]), max_grad_norm=s["max_grad_norm"],
                      weight_decay=s["weight_decay"], bf16=s["bf16"], seed=s["seed"])
    settings = GRPOSettings(
        steps=s["steps"], batch_size=s["batch_size"], rollouts=s["rollouts"], temperature=s["temperature"],
        learning_rate=s["learning_rate"], clip_epsilon=s["clip_epsilon"], beta=s["beta"],
        format_penalty=s["format_penalty"], max_tokens=s["max_tokens"], updates=s["updates_per_step"],
        micro_batch=s["micro_batch"], sync_every=1, lora=lora, **no_checkpoints)
    rl_dir = work / "tandem_rl"
    shutil.rmtree(rl_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = Recorded(iris_metric, settings).compile(program, trainset=train, seed=s["seed"], out_dir=rl_dir)
    run_s = time.perf_counter() - t0
    rec = res.history[-1]
    steps = rec.extra["steps"]
    engine_errors = sum(h["failures"].get("lm", 0) for h in steps)

    if args.tandem_lm == "vllm":
        from tandem.lm.vllm import shutdown_engines

        shutdown_engines()
    # The merged copies this run's syncs wrote (CPU vLLM; ~540 MB each for SmolLM2-135M) are removed.
    merged_new = sorted(set(os.listdir(merged_root)) - merged_before) if merged_root.exists() else []
    for name in merged_new:
        shutil.rmtree(merged_root / name, ignore_errors=True)

    per_step = []
    for i, h in enumerate(steps):
        upd = next(iter(h["updates"].values()), {})
        per_step.append({
            "step": h["step"], "wall_s": h["wall_s"], "rollout_s": h["rollout_s"], "train_s": h["train_s"],
            "sync_s": h.get("sync_s", 0.0), "mean_reward": round(h["mean_reward"], 4), "groups": h["groups"],
            "zero_variance_groups": h["zero_variance_groups"], "failures": h["failures"],
            "completions_trained": upd.get("items", 0), "completion_tokens_trained": upd.get("tokens", 0),
            "loss": upd.get("loss"), "grad_norm": upd.get("grad_norm"),
            "examples": h["examples"], "usage": usage_per_step[i] if i < len(usage_per_step) else None,
        })
    if engine_errors:  # rollouts the engine failed on: the step times would mean nothing
        raise SystemExit(f"tandem side: {engine_errors} rollouts failed in the engine ({args.tandem_lm}); "
                         "see the log above (vLLM's CPU build refuses some models, e.g. head_dim 16: "
                         "use --tandem-lm hf)")
    ordered = [prompts[i] for h in steps for i in h["examples"]]
    Path(args.prompts_out).write_text(json.dumps(ordered, indent=1))
    return {
        "side": "tandem", "optimizer": "tandem.optimize.GRPO (tandem.train.grpo.Policy updates)",
        "lm": f"{args.tandem_lm}:{args.model_dir}",
        "generation_engine": ("vLLM (in-process engine, CPU build)" if args.tandem_lm == "vllm"
                              else "tandem's transformers backend (its own KV-cache decoding loop)"),
        "engine_options": {k: str(v) for k, v in getattr(lm, "options", {}).items()},
        "engine_start_s": round(engine_start_s, 2), "run_s": round(run_s, 2), "steps": per_step,
        "status": rec.status, "detail": rec.detail, "trainable_params": rec.trainable_params,
        "usage": rec.usage, "merged_copies_removed": len(merged_new), "settings": settings.to_dict(),
        "torch_threads": torch.get_num_threads(), "prompts": len(prompts),
    }


# -- the comparison -----------------------------------------------------------------------
def versions(python: Path, mods: list[str], env: dict | None = None) -> dict:
    code = ("import importlib.metadata as m, json\nout = {}\nfor k in %r:\n    try: out[k] = m.version(k)\n"
            "    except m.PackageNotFoundError: out[k] = None\nprint(json.dumps(out))" % mods)
    try:
        return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                                         env={**os.environ, **(env or {})}).stdout)
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)}


# The packages TRL needs that tandem's venv lacks (or has in another version), taken from TRL's venv.
OVERLAY = ("trl", "datasets", "pandas", "pyarrow", "multiprocess", "xxhash", "dill")


def trl_overlay(work: Path) -> Path:
    """A folder of links to TRL's venv packages, to put on PYTHONPATH in tandem's venv (which has vLLM).

    TRL's vLLM colocate mode runs vLLM inside the trainer's process, so it
    needs TRL and vLLM importable together: TRL's venv has no vLLM, tandem's
    has vLLM's CPU build (same torch, transformers and peft versions) but no
    TRL. Nothing is installed into or changed in either venv.
    """
    site = next((HERE / "vs_dspy" / ".venv" / "lib").glob("python*/site-packages"))
    out = work / "trl-overlay"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in OVERLAY:
        found = [site / name, *site.glob(f"{name}-*.dist-info"), *site.glob(f"{name}.libs")]
        if not (site / name).exists():
            raise SystemExit(f"{site / name} is missing: run bash benchmarks/vs_dspy/setup.sh")
        for f in found:
            (out / f.name).symlink_to(f)
    return out


TRL_MODES = {
    "transformers": "transformers generate on the training model (TRL's default, use_vllm=False)",
    "vllm-colocate": "vLLM in the trainer's process (use_vllm=True, vllm_mode='colocate')",
}


def mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None


def summarize(steps: list[dict], parts: dict[str, str]) -> dict:
    """Step 1, the mean of steps 2..N (the time per RL step) and of all steps, for the wall time and ``parts``."""
    later = steps[1:] or steps
    out = {"step1_s": steps[0]["wall_s"], "per_step_s": mean([s["wall_s"] for s in later]),
           "per_step_s_all_steps": mean([s["wall_s"] for s in steps]),
           "per_step_over": "steps 2..N" if len(steps) > 1 else "step 1 only (--steps 1)",
           "total_steps_s": round(sum(s["wall_s"] for s in steps), 2),
           "mean_reward_per_step": [s["mean_reward"] for s in steps]}
    for name, key in parts.items():
        out[f"{name}_per_step_s"] = mean([s[key] for s in later if s.get(key) is not None])
    return out


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def table(res: dict) -> str:
    t = res["tandem"]["summary"]
    rewards = lambda x: ", ".join(f"{v:.2f}" for v in x["mean_reward_per_step"])  # noqa: E731
    lines = [
        "| side | generation | step 1 s | s per RL step (steps 2..N) | generation s | training s "
        "| weights to engine s | other s | set-up s | mean reward per step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| tandem GRPO | {res['tandem']['generation_engine']} | {t['step1_s']:.2f} | {t['per_step_s']:.2f} "
        f"| {t['rollout_per_step_s']:.2f} | {t['train_per_step_s']:.2f} | {t['sync_per_step_s']:.2f} | - "
        f"| {res['tandem']['engine_start_s']:.1f} | {rewards(t)} |",
    ]
    for mode, x in res["trl"].items():
        r = x["summary"]
        lines.append(
            f"| TRL GRPOTrainer | {x['generation_engine']} | {r['step1_s']:.2f} | {r['per_step_s']:.2f} "
            f"| {r['generate_per_step_s']:.2f} | {r['train_per_step_s']:.2f} | {r['sync_per_step_s']:.2f} "
            f"| {r['other_per_step_s']:.2f} | {x['setup_s']:.1f} | {rewards(r)} |")
    lines.append("\ngeneration: rollouts (tandem: the whole program run, reward included) or generate; other: TRL's "
                 "rest of generate-and-score (tokenizing, rewards, advantages, old log-probs where computed); "
                 "set-up: tandem's engine start, TRL's trainer construction (model load, and the vLLM engine in "
                 "colocate mode)")
    trained = {"tandem": [x["completions_trained"] for x in res["tandem"]["steps"]],
               **{f"TRL {m}": [x["completions_trained"] for x in v["steps"]] for m, v in res["trl"].items()}}
    lines.append(f"completions trained per step: {trained} (tandem leaves groups with equal rewards out)")
    for mode, x in res.get("trl_failed", {}).items():
        lines.append(f"TRL {mode}: failed ({x['error']}; {x['log']})")
    if res["settings"]["reward"] != "iris":
        lines.append("reward: --plumbing-reward (len % 7 / 6 on both sides), not the Iris metric: every group has "
                     "unequal rewards, so both sides train every completion; the mean reward says nothing about "
                     "learning")
    by_mode = ", ".join(f"{m} {v}x" for m, v in res["speedup_by_trl_mode"].items())
    lines.append(f"\nspeedup = TRL s per RL step / tandem s per RL step ({t['per_step_over']}), against TRL's "
                 f"fastest mode: {res['speedup']}x ({by_mode}); target >= 2")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="RL steps on each side (the first is reported apart)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="checkpoint directory (default: the embedded smollm2-135m, tandem.lm.models.ensure_model)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rl_vs_trl.json",
                   help="the result JSON (default benchmarks/results/rl_vs_trl.json)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "rl_vs_trl", help="logs, prompts, side outputs")
    p.add_argument("--tandem-lm", choices=["vllm", "hf"], default="vllm",
                   help="tandem's rollout backend: the in-process vLLM engine (default), or transformers (hf) for "
                        "models vLLM's CPU build cannot load (the tests' tiny model, head_dim 16)")
    p.add_argument("--trl-modes", default="transformers,vllm-colocate",
                   help=f"TRL generation modes to run, comma-separated, from {sorted(TRL_MODES)}; the speedup is "
                        "against the fastest")
    p.add_argument("--batch-size", type=int, default=4, help="examples per RL step (GRPOSettings.batch_size)")
    p.add_argument("--rollouts", type=int, default=4, help="completions per example (TRL's num_generations)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens (IrisClassifier's own limit)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward pass in the update")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL with gradient checkpointing on (its GRPOConfig default; tandem has none)")
    p.add_argument("--plumbing-reward", action="store_true",
                   help="reward = len(completion) %% 7 / 6 on both sides instead of the Iris metric, so that every "
                        "group has a signal and both sides train every completion (a random model never scores; "
                        "SmolLM2-135M's single completion rarely writes the species field)")
    p.add_argument("--side", choices=["tandem"], help=argparse.SUPPRESS)  # internal: run one side
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--prompts-out", help=argparse.SUPPRESS)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side == "tandem":
        Path(args.side_out).write_text(json.dumps(tandem_side(args), indent=1, default=str))
        return 0

    modes = [m.strip() for m in args.trl_modes.split(",") if m.strip()]
    if not modes or set(modes) - set(TRL_MODES):
        sys.exit(f"--trl-modes: choose from {sorted(TRL_MODES)}, got {args.trl_modes!r}")
    if args.steps < 1:
        sys.exit("--steps must be >= 1")
    per_step = args.batch_size * args.rollouts
    if per_step % min(args.micro_batch, per_step):
        sys.exit(f"--micro-batch {args.micro_batch} must divide batch-size x rollouts ({per_step}): "
                 "TRL accumulates whole micro-batches")
    for py in (TANDEM_PY, TRL_PY):
        if not py.exists():
            sys.exit(f"{py} is missing: run scripts/install.sh (tandem) and bash benchmarks/vs_dspy/setup.sh (TRL)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from tandem.lm.models import ensure_model
    from tandem.train.lora import bf16_supported

    model_dir = (args.model_dir or ensure_model("smollm2-135m")).resolve()
    args.bf16 = bf16_supported("cpu")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    settings = settings_from(args)
    (work / "settings.json").write_text(json.dumps(settings, indent=1))
    env = {"TANDEM_CACHE": "0", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    n = os.cpu_count() or 1
    # vLLM's CPU settings as tandem's engine sets them (tandem.lm.vllm._cpu_env), for TRL's colocated engine too.
    vllm_env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}", "VLLM_CPU_KVCACHE_SPACE": "2",
                "TOKENIZERS_PARALLELISM": "false"}
    overlay = trl_overlay(work) if "vllm-colocate" in modes else None

    res: dict = {
        "what": "time per RL step: tandem's GRPO (rollouts on its engine + Policy updates) against TRL's GRPOTrainer "
                "+ peft LoRA, same model, Iris prompts, reward and settings",
        "model_dir": str(model_dir), "settings": settings,
        "versions": {"tandem_venv": versions(TANDEM_PY, ["torch", "vllm-cpu", "vllm", "transformers", "peft"]),
                     "trl_venv": versions(TRL_PY, ["trl", "torch", "transformers", "peft", "accelerate", "vllm"])},
        "load_1min": {"start": round(os.getloadavg()[0], 2)},
        "trl": {},
    }
    if overlay:
        res["trl_vllm_colocate_how"] = (f"tandem's venv python (vLLM CPU build) with TRL's venv packages {OVERLAY} "
                                        f"on PYTHONPATH (links in {overlay}); env {vllm_env}")
        res["versions"]["tandem_venv_plus_trl"] = versions(TANDEM_PY, ["trl", "vllm-cpu", "torch", "transformers",
                                                                       "peft", "accelerate", "datasets"],
                                                           {"PYTHONPATH": str(overlay)})

    print(f"tandem: GRPO, {args.steps} steps, rollouts on {args.tandem_lm} ...", flush=True)
    res["load_1min"]["tandem_before"] = round(os.getloadavg()[0], 2)
    side_out, prompts = work / "tandem_side.json", work / "prompts.json"
    process_s = run_side([TANDEM_PY, Path(__file__), "--side", "tandem", "--settings", work / "settings.json",
                          "--model-dir", model_dir, "--tandem-lm", args.tandem_lm, "--work-dir", work,
                          "--threads", args.threads, "--prompts-out", prompts, "--side-out", side_out],
                         work / "tandem_side.log", env=env, timeout=7200)
    res["tandem"] = {**json.loads(side_out.read_text()), "process_s": round(process_s, 1)}
    res["load_1min"]["tandem_after"] = round(os.getloadavg()[0], 2)
    res["tandem"]["summary"] = summarize(res["tandem"]["steps"],
                                         {"rollout": "rollout_s", "train": "train_s", "sync": "sync_s"})
    print(f"  {res['tandem']['summary']['per_step_s']} s per RL step", flush=True)

    for mode in modes:
        print(f"TRL: GRPOTrainer ({mode}), {args.steps} steps ...", flush=True)
        res["load_1min"][f"trl_{mode}_before"] = round(os.getloadavg()[0], 2)
        side_out = work / f"trl_{mode}.json"
        cmd = [HERE / "vs_dspy" / "trl_grpo_side.py", "--settings", work / "settings.json", "--prompts", prompts,
               "--model-dir", model_dir, "--out", side_out,
               *(["--gradient-checkpointing"] if args.trl_gradient_checkpointing else [])]
        if mode == "vllm-colocate":
            cmd = [TANDEM_PY, *cmd, "--vllm-colocate"]
            side_env = {**env, **vllm_env, "PYTHONPATH": str(overlay)}
        else:
            cmd, side_env = [TRL_PY, *cmd], env
        try:
            process_s = run_side(cmd, work / f"trl_{mode}.log", env=side_env, timeout=7200)
        except RuntimeError as exc:  # a mode that cannot run here is recorded, and the others still compared
            last = [ln for ln in str(exc).splitlines() if ln.strip()][-1]
            res.setdefault("trl_failed", {})[mode] = {"error": last, "log": str(work / f"trl_{mode}.log")}
            print(f"  failed: {last}", flush=True)
            continue
        x = {**json.loads(side_out.read_text()), "process_s": round(process_s, 1)}
        x["summary"] = summarize(x["steps"], {"generate": "generate_s", "train": "train_s", "sync": "sync_s",
                                              "other": "score_other_s"})
        res["trl"][mode] = x
        res["load_1min"][f"trl_{mode}_after"] = round(os.getloadavg()[0], 2)
        print(f"  {x['summary']['per_step_s']} s per RL step", flush=True)

    if not res["trl"]:
        write_result(args.out, res)
        sys.exit(f"no TRL mode ran: {res.get('trl_failed')}")
    t = res["tandem"]["summary"]
    res["speedup_by_trl_mode"] = {m: ratio(x["summary"]["per_step_s"], t["per_step_s"]) for m, x in res["trl"].items()}
    fastest = min(res["trl"], key=lambda m: res["trl"][m]["summary"]["per_step_s"])
    res["trl_fastest_mode"] = fastest
    res["speedup"] = res["speedup_by_trl_mode"][fastest]
    res["speedup_definition"] = (f"TRL's mean wall time per RL step in its fastest generation mode ({fastest}) / "
                                 f"tandem's, {t['per_step_over']}; engine start and trainer construction excluded")
    r = res["trl"][fastest]["summary"]
    res["speedup_all_steps"] = ratio(r["per_step_s_all_steps"], t["per_step_s_all_steps"])
    res["speedup_total"] = ratio(res["trl"][fastest]["setup_s"] + r["total_steps_s"],
                                 res["tandem"]["engine_start_s"] + t["total_steps_s"])
    res["target"] = "speedup >= 2 (issue #14 item 2), else use TRL"
    write_result(args.out, res)
    print()
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
