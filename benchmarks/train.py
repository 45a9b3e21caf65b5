"""LoRA training speed and learning-rate check on the embedded model.

    TANDEM_HOME=... python benchmarks/train.py              # throughput table -> benchmarks/results/train.json
    TANDEM_HOME=... python benchmarks/train.py --lr-sweep   # completion loss before/after 5 epochs per rate

On a machine shared with other jobs, ``--threads 1`` gives steadier numbers:
torch's OpenMP threads stall badly when the cores are oversubscribed.

Examples are iris-style SFT pairs: a zero-shot chain-of-thought prompt
(rendered as tandem renders it, chat template and "Reasoning:" prefix
included) and a short reasoning + answer completion, the shape of the data a
BetterTogether weight step trains on.

FLOP counts (attention's sequence-length terms are left out; they are small
at these lengths): ``body`` = non-embedding parameters, applied to every
token; ``head`` = the LM head (vocab x hidden), applied only at completion
positions, as the trainer does. Forward = 2 x (body x all tokens + head x
completion tokens). LoRA count = 2 x forward (forward + the input-gradient
backward; frozen weights need no weight gradient). The conventional count,
6 x params x tokens, adds the weight-gradient backward that full fine-tuning
would do, so it overstates LoRA's work by 1.5x.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECIES = ("setosa", "versicolor", "virginica")


def iris_examples(tokenizer, n: int, seed: int = 0):
    """``n`` SFT examples from the iris data (sklearn's copy), in a seeded order."""
    from sklearn.datasets import load_iris

    from tandem.program.render import build_prompt
    from tandem.program.signature import Field, Signature
    from tandem.train import SFTExample

    sig = Signature(
        (Field("sepal_length", "cm"), Field("sepal_width", "cm"), Field("petal_length", "cm"),
         Field("petal_width", "cm"), Field("reasoning", "think step by step", False, multiline=True),
         Field("species", "setosa, versicolor or virginica", False)),
        "Classify the iris flower from its measurements.", name="ClassifyIris",
    )
    data = load_iris()
    rows = list(zip(data.data.tolist(), data.target.tolist()))
    random.Random(seed).shuffle(rows)
    out = []
    for (sl, sw, pl, pw), y in rows[:n]:
        inputs = dict(sepal_length=sl, sepal_width=sw, petal_length=pl, petal_width=pw)
        p = build_prompt(sig, [], inputs)
        msgs = [{"role": r, "content": c} for r, c in p.messages]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + p.prefix
        size = "short" if pl < 2.5 else ("medium" if pl < 5.0 else "long")
        completion = (
            f" The petals are {pl} cm long and {pw} cm wide, which is {size}, "
            f"so this is most likely {SPECIES[y]}.\nSpecies: {SPECIES[y]}"
        )
        out.append(SFTExample(text, completion, "classify"))
    return out


def matmul_tflops(dtype_name: str = "bfloat16", n: int = 4096, reps: int = 5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # oneDNN builds its kernel on the first call
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def param_counts(model_dir: Path) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    attn = h * hd * cfg.num_attention_heads * 2 + h * hd * cfg.num_key_value_heads * 2
    body = L * (attn + 3 * h * i)
    return {"body": body, "head": cfg.vocab_size * h}


def throughput(model_dir: Path, steps: int, batch: int) -> dict:
    from transformers import AutoTokenizer

    from tandem.train import LoRAConfig, train_lora

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = iris_examples(tok, steps * batch + batch)
    cfg = LoRAConfig(epochs=1, batch_size=batch, method="lora")
    with tempfile.TemporaryDirectory() as tmp:
        # A one-step run first: oneDNN builds its kernels on first use.
        train_lora(model_dir, examples[:batch], cfg, Path(tmp) / "warm")
        r = train_lora(model_dir, examples[batch:], cfg, Path(tmp) / "adapter")
    n = param_counts(model_dir)
    fwd = 2 * (n["body"] * r.total_tokens + n["head"] * r.completion_tokens)
    peak = matmul_tflops()
    lora_tflops = 2 * fwd / r.wall_s / 1e12
    full_tflops = 6 * (n["body"] * r.total_tokens + n["head"] * r.completion_tokens) / r.wall_s / 1e12
    return {
        "model": model_dir.name, "steps": r.steps, "batch_size": batch, "bf16": r.bf16,
        "trainable_params": r.trainable_params, "body_params": n["body"], "head_params": n["head"],
        "total_tokens": r.total_tokens, "completion_tokens": r.completion_tokens, "wall_s": r.wall_s,
        "tokens_per_s": r.total_tokens / r.wall_s, "completion_tokens_per_s": r.completion_tokens / r.wall_s,
        "s_per_step": r.wall_s / r.steps, "bf16_matmul_tflops": peak, "fp32_matmul_tflops": matmul_tflops("float32"),
        "lora_tflops": lora_tflops, "lora_fraction_of_bf16_peak": lora_tflops / peak,
        "6N_tflops": full_tflops, "6N_fraction_of_bf16_peak": full_tflops / peak,
        "losses": r.losses,
    }


def mean_loss(model, tok, examples) -> float:
    """Completion-token mean loss over ``examples`` (batches of 8, no grad)."""
    import torch

    from tandem.train import tokenize_example
    from tandem.train.lora import collate_batch, completion_loss

    total = count = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for b in range(0, len(examples), 8):
            rows = [tokenize_example(tok, e) for e in examples[b : b + 8]]
            n = sum(r.n_completion for r in rows)
            total += completion_loss(model, *collate_batch(rows, tok.pad_token_id, "cpu")).item() * n
            count += n
    return total / count


def lr_sweep(model_dir: Path, rates: list[float], n_train: int, n_eval: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tandem.train import LoRAConfig, train_lora
    from tandem.train.recipe import resolve_config

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = iris_examples(tok, n_train + n_eval)
    train, held = examples[:n_train], examples[n_train:]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    before = {"train": mean_loss(base, tok, train), "held_out": mean_loss(base, tok, held)}
    print(f"before: train {before['train']:.3f}  held-out {before['held_out']:.3f}", flush=True)
    runs = []
    for lr in rates:
        with tempfile.TemporaryDirectory() as tmp:
            r = train_lora(model_dir, train, LoRAConfig(learning_rate=lr, method="lora"), Path(tmp) / "a")
            m = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), r.adapter_dir
            )
            after = {"train": mean_loss(m, tok, train), "held_out": mean_loss(m, tok, held)}
        runs.append({"lr": lr, "after": after, "steps": r.steps, "wall_s": r.wall_s,
                     "first_step_loss": r.losses[0], "last_step_loss": r.losses[-1]})
        print(f"lr {lr:g}: train {after['train']:.3f}  held-out {after['held_out']:.3f}  "
              f"({r.steps} steps, {r.wall_s:.0f}s)", flush=True)
    cfg = resolve_config(LoRAConfig(method="lora"), model_dir)
    return {"model": model_dir.name, "n_train": n_train, "n_eval": n_eval, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "before": before, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr-sweep", action="store_true")
    ap.add_argument("--rates", default="1e-5,1e-4,3e-4,1e-3")
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-eval", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/train[_lr].json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        __import__("torch").set_num_threads(args.threads)

    from tandem.lm.models import resolve_model

    model_dir = resolve_model(args.model)
    if args.lr_sweep:
        res = lr_sweep(model_dir, [float(x) for x in args.rates.split(",")], args.n_train, args.n_eval)
        out = Path(args.out or ROOT / "benchmarks/results/train_lr.json")
    else:
        res = throughput(model_dir, args.steps, args.batch)
        out = Path(args.out or ROOT / "benchmarks/results/train.json")
        rows = [
            ("model / steps x batch", f"{res['model']} / {res['steps']} x {res['batch_size']} ({'bf16' if res['bf16'] else 'fp32'})"),
            ("tokens/s (all / completion)", f"{res['tokens_per_s']:.0f} / {res['completion_tokens_per_s']:.0f}"),
            ("s per step", f"{res['s_per_step']:.2f}"),
            ("bf16 / fp32 matmul TFLOP/s", f"{res['bf16_matmul_tflops']:.2f} / {res['fp32_matmul_tflops']:.2f}"),
            ("LoRA count (4N) TFLOP/s, share of bf16", f"{res['lora_tflops']:.3f}, {res['lora_fraction_of_bf16_peak']:.0%}"),
            ("6N count TFLOP/s, share of bf16", f"{res['6N_tflops']:.3f}, {res['6N_fraction_of_bf16_peak']:.0%}"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    res["torch_threads"] = __import__("torch").get_num_threads()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
