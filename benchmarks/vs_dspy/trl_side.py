"""The TRL side of the weight-step comparison (runs in benchmarks/vs_dspy/.venv; run.py starts it).

A plain TRL SFTTrainer + peft LoRA run on the same SFT examples (prompt ->
completion, the prompt already rendered with the chat template, as tandem
trains on them) and the same base checkpoint, with tandem's LoRAConfig
settings: rank 32, alpha 64, dropout 0, all seven linear projections, 5 epochs,
batch 8, lr 3e-4 with 10% linear warm-up then constant, grad-norm clip 1.0, no
weight decay, completion-only loss, bf16 autocast. Everything else is TRL's
default (gradient checkpointing included, unless --no-gradient-checkpointing).
Writes one JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sft", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(args.sft)]
    ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    bf16 = not args.fp32
    gc = not args.no_gradient_checkpointing
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs-dspy-trl-") as out_dir:
        cfg = SFTConfig(
            output_dir=out_dir, num_train_epochs=5, per_device_train_batch_size=8, gradient_accumulation_steps=1,
            learning_rate=3e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=0.1, weight_decay=0.0,
            max_grad_norm=1.0, bf16=bf16, gradient_checkpointing=gc, completion_only_loss=True, max_length=2048,
            logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
        )
        peft_config = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                                 task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=args.model_dir, args=cfg, train_dataset=ds, peft_config=peft_config)
        setup_s = time.perf_counter() - t_setup
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
        completion = [int(sum(m)) for m in trainer.train_dataset["completion_mask"]] \
            if "completion_mask" in trainer.train_dataset.column_names else []
        t0 = time.perf_counter()
        out = trainer.train()
        wall = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        dtype = str(next(trainer.model.parameters()).dtype)
        base_dtype = str(trainer.model.get_base_model().model.embed_tokens.weight.dtype)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    steps_per_epoch = -(-len(lengths) // 8)
    tokens = sum(lengths) * 5
    res = {
        "trainer": f"trl.SFTTrainer {trl.__version__} + peft LoRA",
        "examples": len(lengths), "steps": trainer.state.global_step, "wall_s": round(wall, 2),
        "setup_s_model_load_tokenize": round(setup_s, 2),
        "train_runtime_reported_by_trl": round(out.metrics.get("train_runtime", 0.0), 2),
        "dataset_columns": trainer.train_dataset.column_names,
        "tokens": tokens, "completion_tokens": sum(completion) * 5 if completion else None,
        "tokens_per_s": round(tokens / wall, 1),
        "final_loss": round(losses[-1], 4) if losses else None,
        "last_epoch_mean_loss": round(sum(losses[-steps_per_epoch:]) / steps_per_epoch, 4) if losses else None,
        "first_loss": round(losses[0], 4) if losses else None,
        "mean_train_loss_reported_by_trl": round(out.training_loss, 4),
        "losses": [round(x, 4) for x in losses],
        "bf16": bf16, "gradient_checkpointing": gc, "base_weights_dtype": base_dtype, "first_param_dtype": dtype,
        "trainable_params": trainable, "torch_threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
