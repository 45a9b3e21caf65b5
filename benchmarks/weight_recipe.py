"""Which training recipe makes SmolLM2-135M learn Iris from its own traces.

    python benchmarks/weight_recipe.py --recipes lora:r32:3e-4:5,lora:r32:1e-3:10,full:1e-4:10
    python benchmarks/weight_recipe.py --completion gold --serve both     # served merged (vLLM) and unmerged (HF)

Each recipe trains on the training split (50 examples) from one SFT example
per training example: the zero-shot chain-of-thought prompt, and a
completion with the gold species (``--completion gold``: a one-line
reasoning that restates the petal measurements; ``hint``: the model's own
reasoning written with the gold species given as a hint, as the weight
step's rationalization does). The tuned model is evaluated on the test split
(50 examples) through the vLLM engine (``--serve vllm``), the transformers
backend with the adapter unmerged (``hf``), or both. Prints a table and
writes ``benchmarks/results/weight_recipe.json``.

A recipe is ``lora:r<rank>:<lr>:<epochs>`` or ``full:<lr>:<epochs>``, with
``--batch`` examples per optimizer step (8, the paper's, by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import write_result  # noqa: E402


def parse_recipe(text: str) -> dict:
    parts = text.split(":")
    if parts[0] == "lora" and len(parts) == 4:
        return {"kind": "lora", "rank": int(parts[1].lstrip("r")), "lr": float(parts[2]), "epochs": int(parts[3])}
    if parts[0] == "full" and len(parts) == 3:
        return {"kind": "full", "lr": float(parts[1]), "epochs": int(parts[2])}
    raise SystemExit(f"--recipes: {text!r} is not lora:r<rank>:<lr>:<epochs> or full:<lr>:<epochs>")


def gold_completion(ex) -> str:
    return (f" The petals are {ex['petal_length']} cm long and {ex['petal_width']} cm wide."
            f"\nSpecies: {ex['species']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="lora:r32:3e-4:5")
    ap.add_argument("--completion", choices=("gold", "hint"), default="gold")
    ap.add_argument("--serve", choices=("vllm", "hf", "both"), default="vllm")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "weight_recipe.json"))
    args = ap.parse_args()

    from tandem.evaluate import evaluate
    from tandem.lm.registry import get_lm
    from tandem.program.render import build_prompt
    from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris
    from tandem.train import LoRAConfig, SFTExample, train_lora

    data = split_iris(load_iris(), seed=args.data_seed)
    lm = get_lm("smollm2-135m")
    program = IrisClassifier()
    pred = program.classify
    examples = [SFTExample(lm.render(build_prompt(pred.signature, [], ex.inputs())), gold_completion(ex), "classify")
                for ex in data["train"]]
    rows = []
    base = evaluate(program.deepcopy().set_lm(lm), data["test"], iris_metric)
    rows.append({"recipe": "base model", "served": "vllm", "test": base.score})
    print(f"base model: test {base.score:.1f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="tandem-recipe-"))
    for i, text in enumerate(args.recipes.split(",")):
        r = parse_recipe(text)
        t0 = time.perf_counter()
        adir = work / f"a{i}"
        cfg = LoRAConfig(rank=r.get("rank", 32), alpha=2 * r.get("rank", 32), learning_rate=r["lr"],
                         epochs=r["epochs"], method=r["kind"], batch_size=args.batch)
        res = train_lora(lm.model_dir, examples, cfg, adir)
        train_s = time.perf_counter() - t0
        served = ["vllm", "hf"] if args.serve == "both" else [args.serve]
        for how in served:
            if r["kind"] == "full":
                tuned = get_lm(str(adir) if how == "vllm" else f"hf:{adir}")
            else:
                tuned = lm.with_adapter(adir) if how == "vllm" else get_lm("hf:smollm2-135m").with_adapter(adir)
            t1 = time.perf_counter()
            score = evaluate(program.deepcopy().set_lm(tuned), data["test"], iris_metric).score
            row = {"recipe": text, "batch": args.batch, "served": how, "test": score, "train_s": round(train_s, 1),
                   "eval_s": round(time.perf_counter() - t1, 1), "final_loss": res.losses[-1],
                   "steps": res.steps}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| recipe | served | test % | train s | final loss |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['recipe']} | {row['served']} | {row['test']:.1f} | {row.get('train_s', '')} | "
              f"{row.get('final_loss', '')} |")
    write_result(Path(args.out), {"data_seed": args.data_seed, "completion": args.completion, "rows": rows})


if __name__ == "__main__":
    main()
