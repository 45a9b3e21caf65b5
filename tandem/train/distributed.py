"""``python -m tandem.train.distributed``: the LoRA trainer, data parallel, under torchrun.

    torchrun --standalone --nproc_per_node=2 -m tandem.train.distributed \\
        --model smollm2-135m --data runs/iris-pwp-s0/steps/01-w/out/sft.jsonl \\
        --out adapters/iris-2proc --epochs 4 --batch-size 2 --learning-rate 1e-3

Every process reads the whole SFT file (JSONL: ``prompt``, ``completion``,
optional ``module`` and ``group``, as the weight step writes
``out/sft.jsonl``), joins the process group the launcher set up (gloo on
CPU, nccl on CUDA: ``tandem.train.ranks``) and runs ``train_lora`` as one
rank. The LoRA settings are LoRAConfig's fields as flags (``--batch-size 4``,
``--target-modules q_proj,v_proj``, ``--bf16 false``) or one JSON object
(``--lora '{"rank": 16}'``; flags win). ``batch_size`` is the global batch,
split over the processes, so N processes take the steps one process takes.
Rank 0 prints ``step N/TOTAL loss X`` after every step and writes the
adapter (PEFT files and ``tandem_adapter.json``, whose ``training.losses``
is the per-step loss log).

Without a launcher, ``--processes N`` starts torchrun itself (what the weight
step does with ``[lora] processes = N``), and ``--processes 1`` (the
default) trains in this one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from tandem.train.lora import LoRAConfig, train_lora
from tandem.train.sft import SFTExample


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


#: How a flag's text becomes a LoRAConfig value, by the field's annotation.
CONVERT = {"int": int, "float": float, "str": str, "str | None": str, "bool | None": parse_bool,
           "int | None": int, "float | None": float,
           "tuple[str, ...]": lambda text: tuple(t.strip() for t in text.split(",") if t.strip())}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tandem.train.distributed",
                                description="Train a LoRA on SFT examples, one process per rank under torchrun.")
    p.add_argument("--model", required=True, help="embedded model name or checkpoint folder")
    p.add_argument("--data", required=True, type=Path, help="SFT examples, JSONL (prompt, completion[, module, group])")
    p.add_argument("--out", required=True, type=Path, help="adapter folder to write")
    p.add_argument("--group", help="train only the rows of this group (a weight step's sft.jsonl with several LoRAs)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter folder that holds files")
    p.add_argument("--lora", type=json.loads, default={}, help="LoRAConfig fields as one JSON object")
    for f in fields(LoRAConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=CONVERT[str(f.type)], default=None,
                       metavar=f.name.upper(), help=f"LoRAConfig.{f.name} (default {f.default!r})")
    return p


def read_sft(path: Path, group: str | None) -> list[SFTExample]:
    """The examples of an SFT JSONL file (of one ``group``); a bad row is a one-line error naming it."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SystemExit(f"error: --data {path}: {exc.strerror}") from None
    rows, groups = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: --data {path} line {n}: not JSON ({exc.msg})") from None
        missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str)]
        if not isinstance(row, dict) or missing:
            raise SystemExit(f"error: --data {path} line {n}: needs string fields prompt and completion")
        groups.add(row.get("group"))
        if group is None or row.get("group") == group:
            rows.append(SFTExample(row["prompt"], row["completion"], str(row.get("module") or "")))
    if group is None and len(groups) > 1:
        raise SystemExit(f"error: --data {path} holds {len(groups)} groups (one LoRA each): "
                         f"pick one with --group ({', '.join(sorted(map(str, groups)))})")
    if group is not None and not rows:
        raise SystemExit(f"error: --data {path} has no rows of --group {group}")
    return rows


def lora_config(args: argparse.Namespace, processes: int | None) -> LoRAConfig:
    """``--lora`` with the flags over it; ``processes``: the launcher's world size, which wins."""
    if not isinstance(args.lora, dict):
        raise SystemExit("error: --lora must be a JSON object of LoRAConfig fields")
    values = dict(args.lora)
    names = {f.name for f in fields(LoRAConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"error: --lora: unknown LoRAConfig fields {unknown}; known: {sorted(names)}")
    values.update({n: getattr(args, n) for n in names if getattr(args, n) is not None})
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    if processes is not None:
        values["processes"] = processes
    try:
        return LoRAConfig(**values)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def print_step(step: int, total: int, loss: float) -> None:
    print(f"step {step}/{total} loss {loss:.6f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from tandem.lm.models import resolve_model
    from tandem.train.ranks import join, leave, under_launcher

    args = parser().parse_args(argv)
    examples = read_sft(args.data, args.group)
    try:
        model_dir = resolve_model(args.model)
    except ValueError as exc:
        raise SystemExit(f"error: --model: {exc}") from None
    launched = under_launcher()
    config = lora_config(args, int(os.environ["WORLD_SIZE"]) if launched else None)
    ranks = join(config.device) if launched else None
    try:
        result = train_lora(model_dir, examples, config, args.out, progress=print_step, overwrite=args.overwrite,
                            ranks=ranks)
    except (ValueError, FileExistsError) as exc:  # NothingToTrain, a folder that holds files, a bad device
        raise SystemExit(f"error: {exc}") from None
    finally:
        leave()
    if ranks is None or ranks.is_main:
        print(f"trained {result.steps} steps on {result.n_examples} examples in {config.processes} "
              f"process(es), {result.wall_s:.1f}s, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
              f"adapter {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
