"""The TRL side of benchmarks/rl.py (runs in benchmarks/vs_dspy/.venv; rl.py starts it).

A plain TRL GRPOTrainer + peft LoRA run on the prompts tandem's side wrote
(the IrisClassifier's zero-shot prompts as tandem's engine saw them, chat
template and reply prefix included, as plain strings), in the order tandem's
steps drew them (``shuffle_dataset=False``), with the settings rl.py wrote
(settings.json): one RL step = one generation batch of ``batch_size`` prompts
x ``rollouts`` completions (``num_generations``) and one optimizer step over
it, in micro-batches of ``micro_batch`` (``per_device_train_batch_size``,
gradient accumulation over the rest of the batch). Generation is TRL's default,
transformers' ``generate`` on the model being trained, or with
``--vllm-colocate`` TRL's vLLM colocate mode (an ``LLM`` in this process, the
merged weights pushed to it before each generation). This venv has no vLLM:
rl.py runs that mode with tandem's venv python and this venv's TRL packages on
PYTHONPATH.

The reward is Iris's metric on the parsed species: tandem's own parser of the
reply (prefix + completion) and ``iris_metric``, imported from the tandem
source tree (plain Python, no model code), so both sides score a completion
identically; a reply that does not parse scores 0, as on tandem's side.

Per-step times come from a TrainerCallback (``on_step_end`` to
``on_step_end``) and from timing the trainer's own generate-and-score,
generate and (vLLM) weight-push calls (the same calls, wrapped; measurement
only). Writes one JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def iris_reward_function():
    """``reward(prompts, completions, prefix, species, **kw) -> [0.0 | 1.0]`` with tandem's parser and metric."""
    from tandem.program import Example, Prediction
    from tandem.program.render import ParseError
    from tandem.tasks.iris import IrisClassifier, iris_metric

    predictor = IrisClassifier().classify
    sig, fmt = predictor.signature, predictor.format

    def iris_reward(prompts, completions, prefix, species, **kwargs):
        out = []
        for completion, pre, gold in zip(completions, prefix, species):
            try:
                outputs = fmt.parse(sig, pre + completion)
            except ParseError:
                out.append(0.0)
                continue
            try:
                out.append(float(iris_metric(Example(species=gold), Prediction(outputs))))
            except Exception:  # noqa: BLE001 - a raising metric scores 0, as in tandem's rollouts
                out.append(0.0)
        return out

    return iris_reward


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--settings", required=True, help="settings.json written by benchmarks/rl.py")
    p.add_argument("--prompts", required=True, help="prompts.json: the prompts in the order tandem's steps drew them")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's GRPOConfig default (off here)")
    p.add_argument("--vllm-colocate", action="store_true",
                   help="generate with TRL's vLLM colocate mode (needs vllm importable: not in this venv)")
    args = p.parse_args()
    s = json.loads(Path(args.settings).read_text())

    import torch

    if s["threads"]:
        torch.set_num_threads(s["threads"])
    import accelerate
    import peft
    import pyarrow
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = json.loads(Path(args.prompts).read_text())
    need = s["steps"] * s["batch_size"]
    if len(rows) < need:
        raise SystemExit(f"{args.prompts} has {len(rows)} prompts; {s['steps']} steps x {s['batch_size']} need {need}")
    # A fixed fingerprint instead of datasets hashing the table: in tandem's venv (--vllm-colocate, TRL on
    # PYTHONPATH) that hashing fails on a pyarrow type; the rows are the same either way.
    ds = Dataset(pyarrow.Table.from_pylist([{"prompt": r["prompt"], "prefix": r["prefix"], "species": r["species"]}
                                            for r in rows[:need]]), fingerprint=f"rl-prompts-{len(rows)}")
    per_step = s["batch_size"] * s["rollouts"]  # completions per RL step
    micro = min(s["micro_batch"], per_step)
    if per_step % micro:
        raise SystemExit(f"micro_batch {micro} must divide batch_size x rollouts = {per_step}")

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rl-trl-") as out_dir:
        cfg = GRPOConfig(
            output_dir=out_dir, max_steps=s["steps"], per_device_train_batch_size=micro,
            gradient_accumulation_steps=per_step // micro,  # steps_per_generation defaults to this: one batch/step
            num_generations=s["rollouts"], max_completion_length=s["max_tokens"], temperature=s["temperature"],
            top_p=1.0, top_k=0, learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], beta=s["beta"],
            epsilon=s["clip_epsilon"], num_iterations=s["updates_per_step"], loss_type="grpo",
            scale_rewards="group", mask_truncated_completions=False, bf16=s["bf16"],
            gradient_checkpointing=args.gradient_checkpointing, shuffle_dataset=False,
            use_vllm=args.vllm_colocate, vllm_mode="colocate",
            logging_steps=1, save_strategy="no", report_to="none", seed=s["seed"], use_cpu=True,
            dataloader_num_workers=0,
        )
        peft_config = LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                                 target_modules=list(s["lora_targets"]), bias="none", task_type="CAUSAL_LM")
        if s["reward"] == "plumbing_length":  # rl.py --plumbing-reward (tiny-model checks): as rl.plumbing_reward
            def plumbing_length(prompts, completions, **kwargs):
                return [len(c) % 7 / 6 for c in completions]

            reward = plumbing_length
        else:
            reward = iris_reward_function()
        trainer = GRPOTrainer(model=args.model_dir, reward_funcs=reward, args=cfg,
                              train_dataset=ds, peft_config=peft_config, callbacks=[timer])
        setup_s = time.perf_counter() - t_setup

        # The trainer's own calls, timed per RL step (generation happens once per optimizer step).
        gen_score: dict[int, float] = {}
        gen: dict[int, float] = {}

        def timed(name: str, into: dict, owner=trainer):
            """``owner.name``, the same call, with its seconds added to ``into`` under the current step."""
            fn = getattr(owner, name)

            def wrapper(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    step = trainer.state.global_step
                    into[step] = into.get(step, 0.0) + time.perf_counter() - t

            setattr(owner, name, wrapper)

        timed("_generate_and_score_completions", gen_score)
        timed("_generate_single_turn", gen)  # includes pushing the weights to vLLM (colocate mode)
        sync: dict[int, float] = {}
        if args.vllm_colocate:
            timed("sync_weights", sync, owner=trainer.vllm_generation)
        out = trainer.train()
        logs = [h for h in trainer.state.log_history if "reward" in h]
        base = trainer.model.get_base_model()
        attention = getattr(base.config, "_attn_implementation", None)
        base_dtype = str(next(base.parameters()).dtype)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        optim = str(cfg.optim)

    starts = [timer.start] + timer.ends[:-1]
    steps = []
    for i, (a, b) in enumerate(zip(starts, timer.ends)):
        wall = b - a
        g, gs, w = gen.get(i, 0.0), gen_score.get(i, 0.0), sync.get(i, 0.0)
        h = logs[i] if i < len(logs) else {}
        length = h.get("completions/mean_length")
        steps.append({
            "step": i + 1, "wall_s": round(wall, 2), "generate_s": round(g - w, 2), "sync_s": round(w, 2),
            "score_other_s": round(gs - g, 2),
            "train_s": round(wall - gs, 2), "mean_reward": round(h.get("reward", float("nan")), 4),
            "reward_std": h.get("reward_std"), "frac_reward_zero_std": h.get("frac_reward_zero_std"),
            "completions_trained": per_step, "mean_completion_tokens": length,
            "completion_tokens": round(length * per_step) if length is not None else None,
            "loss": h.get("loss"), "grad_norm": h.get("grad_norm"),
        })
    res = {
        "side": "trl", "reward": s["reward"], "trainer": f"trl.GRPOTrainer {trl.__version__} + peft LoRA",
        "generation_engine": ("vLLM in the trainer's process (use_vllm=True, vllm_mode='colocate')"
                              if args.vllm_colocate
                              else "transformers generate on the training model (TRL's default, use_vllm=False)"),
        "setup_s": round(setup_s, 2), "train_runtime_reported_by_trl": round(out.metrics.get("train_runtime", 0.0), 2),
        "steps": steps, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "per_device_train_batch_size": micro, "steps_per_generation": cfg.steps_per_generation,
        "generation_batch_size": cfg.generation_batch_size, "loss_type": cfg.loss_type, "optim": optim,
        "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.bf16, "attention": attention,
        "base_weights_dtype": base_dtype, "trainable_params": trainable, "torch_threads": torch.get_num_threads(),
        "log_history": trainer.state.log_history,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "peft": peft.__version__, "accelerate": accelerate.__version__},
    }
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
