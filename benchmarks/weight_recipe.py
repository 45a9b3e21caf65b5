"""Which training recipe makes SmolLM2-135M learn Iris from its own traces.

    python benchmarks/weight_recipe.py --recipes lora:r32:3e-4:5,lora:r32:1e-3:10,full:1e-4:10
    python benchmarks/weight_recipe.py --serve both      # served merged (vLLM) and unmerged (HF)
    python benchmarks/weight_recipe.py --completion gold,restate,bare --batch 2 --recipes lora:r32:1e-3:4

Each recipe trains on the training split (50 examples) from one SFT example
per training example: the zero-shot chain-of-thought prompt, and a
completion with the gold species (``--completion``: ``gold``, a one-line
reasoning that restates the petal measurements; ``restate``, one that
restates all four inputs, as a labelled demo with restated inputs shows it;
``bare``, the placeholder ``Not given for this example.``; several,
comma-separated, each with every recipe), or (``--sft FILE``) from the
``sft.jsonl`` a weight step wrote: the model's own passing traces. The tuned model is evaluated on the test split
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

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


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


def restate_completion(ex) -> str:
    """All four inputs restated, as a labelled demo renders its missing reasoning with ``restate``."""
    parts = [f"{f.replace('_', ' ').title()} is {ex[f]}" for f in FEATURES]
    return " " + ", ".join(parts[:-1]) + " and " + parts[-1] + f".\nSpecies: {ex['species']}"


def bare_completion(ex) -> str:
    """The placeholder reasoning a labelled demo shows, then the species."""
    return f" Not given for this example.\nSpecies: {ex['species']}"


COMPLETIONS = {"gold": gold_completion, "restate": restate_completion, "bare": bare_completion}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="lora:r32:3e-4:5")
    ap.add_argument("--completion", default="gold",
                    help="comma-separated: gold (petals restated), restate (all inputs restated), bare (placeholder)")
    ap.add_argument("--sft", default=None,
                    help="an sft.jsonl a weight step wrote (out/sft.jsonl): train on those prompts and completions, "
                         "the model's own traces, instead of --completion's")
    ap.add_argument("--serve", choices=("vllm", "hf", "both"), default="vllm")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "weight_recipe.json"))
    args = ap.parse_args()

    from tandem.evaluate import evaluate
    from tandem.experiments.stats import paired_test
    from tandem.lm.registry import get_lm
    from tandem.program.render import build_prompt
    from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris
    from tandem.train import LoRAConfig, SFTExample, train_lora

    data = split_iris(load_iris(), seed=args.data_seed)
    lm = get_lm("smollm2-135m")
    program = IrisClassifier()
    pred = program.classify
    prompts = [lm.render(build_prompt(pred.signature, [], ex.inputs())) for ex in data["train"]]
    rows = []
    base = evaluate(program.deepcopy().set_lm(lm), data["test"], iris_metric)
    rows.append({"recipe": "base model", "completion": "-", "served": "vllm", "test": base.score,
                 "outcomes": [r.score for r in base.records]})
    print(f"base model: test {base.score:.1f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="tandem-recipe-"))
    completions = ["sft"] if args.sft else args.completion.split(",")
    own = [SFTExample(r["prompt"], r["completion"], r["module"])
           for r in map(json.loads, Path(args.sft).read_text().splitlines())] if args.sft else []
    runs = [(c, t) for c in completions for t in args.recipes.split(",")]
    for i, (completion, text) in enumerate(runs):
        if completion == "sft":
            examples = own
        elif completion not in COMPLETIONS:
            raise SystemExit(f"--completion: {completion!r} is not one of {sorted(COMPLETIONS)}")
        else:
            examples = [SFTExample(pr, COMPLETIONS[completion](ex), "classify")
                        for pr, ex in zip(prompts, data["train"])]
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
            ev = evaluate(program.deepcopy().set_lm(tuned), data["test"], iris_metric)
            row = {"recipe": text, "completion": completion, "batch": args.batch, "served": how, "test": ev.score,
                   "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t1, 1),
                   "final_loss": res.losses[-1], "steps": res.steps, "outcomes": [x.score for x in ev.records]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "outcomes"}), flush=True)
    print("\n| completion | recipe | served | test % | vs base model: diff [95% CI], McNemar p | train s | final loss |"
          "\n|---|---|---|---:|---|---:|---:|")
    for row in rows:
        t = paired_test(row["outcomes"], rows[0]["outcomes"]) if row is not rows[0] else None
        if t is not None:
            row["vs_base"] = {"diff": round(100 * t.diff, 1), "ci95": [round(100 * v, 1) for v in t.ci95],
                              "p_value": round(t.p_value, 4)}
        vs = "-" if t is None else (f"{100 * t.diff:+.1f} [{100 * t.ci95[0]:+.1f}, {100 * t.ci95[1]:+.1f}], "
                                    f"p={t.p_value:.3g}")
        print(f"| {row['completion']} | {row['recipe']} | {row['served']} | {row['test']:.1f} | {vs} | "
              f"{row.get('train_s', '')} | {row.get('final_loss', '')} |")
    write_result(Path(args.out), {"data_seed": args.data_seed, "completion": args.sft or args.completion,
                                  "rows": rows})


if __name__ == "__main__":
    main()
