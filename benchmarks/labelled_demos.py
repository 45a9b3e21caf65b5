"""How a labelled demo shows the reasoning it lacks, and what that does to accuracy and tokens.

    .venv/bin/python benchmarks/labelled_demos.py            # 6 demo sets

A labelled example holds the measurements and the species, not the
chain-of-thought reasoning that ``IrisClassifier`` writes first. Sessions
1-3 rendered such a demo's reply as ``Species: setosa`` alone, while the
model is asked to start with ``Reasoning:``; now the reply reads
``Reasoning: Not given for this example.`` then ``Species: setosa``
(``tandem.program.render.NOT_GIVEN``). For each of 6 seeded samples of 3
labelled demos from Iris's 50 training examples, this scores the program on
the 85 held-out examples of benchmarks/vs_dspy (its 35 prompt-validation and
50 dev examples) both ways, and three wordings of the filler, on one engine,
greedy, call cache off. Prints a table and writes
benchmarks/results/labelled_demos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from machine import write_result  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "vs_dspy"))

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
WAYS = {  # name -> the reasoning a labelled demo shows (None: left out, no filler line)
    "left out": None,
    "Not given for this example.": "Not given for this example.",  # tandem's NOT_GIVEN
    "Not supplied for this particular example.": "Not supplied for this particular example.",  # DSPy's words
    "(not recorded)": "(not recorded)",
    "inputs restated": "restate",  # each demo's own inputs, "Sepal Length is 5.1, ..."
}


def restated(demo: dict) -> str:
    """The demo's inputs as one sentence (the "inputs restated" way)."""
    parts = [f"{f.replace('_', ' ').title()} is {demo[f]}" for f in FEATURES]
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", type=int, default=6)
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated names from WAYS")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "labelled_demos.json")
    args = p.parse_args()
    os.environ["TANDEM_CACHE"] = "0"

    from run import iris_rows  # noqa: E402 - benchmarks/vs_dspy: the comparison's data and split
    from tandem_side import examples  # noqa: E402

    from tandem.evaluate import evaluate
    from tandem.experiments.stats import RunOutcomes, compare_strategies, mean_ci
    from tandem.lm.vllm import VLLM, shutdown_engines
    from tandem.program import render
    from tandem.program.render import NOT_GIVEN
    from tandem.tasks.iris import IrisClassifier, iris_metric

    assert WAYS["Not given for this example."] == NOT_GIVEN
    data = iris_rows()
    held_out = examples(data["prompt_val"] + data["dev"])
    lm = VLLM("smollm2-135m")
    lm.start()
    real_complete = render.complete_demo
    rows = []
    ways = {w: WAYS[w] for w in args.ways.split(",")}
    outcomes: dict[str, list] = {w: [] for w in ways}
    for s in range(args.sets):
        sample = random.Random(s).sample(data["train"], 3)
        for way, filler in ways.items():
            demos = [{**{f: d[f] for f in FEATURES}, "species": d["species"]} for d in sample]
            if filler is None:
                render.complete_demo = lambda _sig, demo: demo  # measurement only: the old rendering
            else:
                render.complete_demo = real_complete
                demos = [{**d, "reasoning": restated(d) if filler == "restate" else filler} for d in demos]
            prog = IrisClassifier().set_lm(lm)
            prog.classify.demos = demos
            t0 = time.perf_counter()
            r = evaluate(prog, held_out, iris_metric)
            outcomes[way].append(RunOutcomes(split=0, seed=s, score=r.score,
                                             outcomes={rec.index: rec.score for rec in r.records}))
            rows.append({"set": s, "demo_species": [d["species"] for d in sample], "way": way,
                         "acc": round(r.score, 2), "failed": r.n_failed, "calls": r.usage.calls,
                         "output_tokens": r.usage.output_tokens, "wall_s": round(time.perf_counter() - t0, 2)})
            print(json.dumps(rows[-1]), flush=True)
    render.complete_demo = real_complete

    summary = []
    base = next(iter(ways))
    print(f"\n| labelled demo's reasoning | acc % on {len(held_out)}: mean [95% CI] (per set) "
          f"| vs {base}: diff [95% CI], McNemar p | LM calls per example | output tokens per example |")
    print("|---|---|---|---:|---:|")
    for way in ways:
        rs = [r for r in rows if r["way"] == way]
        mean, lo, hi = mean_ci(r["acc"] for r in rs)
        cmp = compare_strategies(outcomes[way], outcomes[base]) if way != base else None
        summary.append({
            "way": way, "acc_mean": round(mean, 1), "acc_ci95": [round(lo, 1), round(hi, 1)],
            "acc_all": [r["acc"] for r in rs],
            "vs_first": None if cmp is None else {
                "diff": round(cmp.diff, 1), "diff_ci95": [round(v, 1) for v in cmp.diff_ci95],
                "p_value": round(cmp.test.p_value, 4), "method": cmp.test.method, "pairs": cmp.test.n},
            "calls_per_example": round(statistics.mean(r["calls"] for r in rs) / len(held_out), 2),
            "output_tokens_per_example": round(statistics.mean(r["output_tokens"] for r in rs) / len(held_out), 1),
        })
        x = summary[-1]
        vs = "-" if cmp is None else (f"{x['vs_first']['diff']:+.1f} [{x['vs_first']['diff_ci95'][0]:+.1f}, "
                                      f"{x['vs_first']['diff_ci95'][1]:+.1f}], p={x['vs_first']['p_value']:.3g}")
        print(f"| {way} | {x['acc_mean']} [{lo:.1f}, {hi:.1f}] ({', '.join(f'{a:.0f}' for a in x['acc_all'])}) "
              f"| {vs} | {x['calls_per_example']} | {x['output_tokens_per_example']} |")
    write_result(args.out, {
        "summary": summary, "rows": rows,
        "settings": {"model": "smollm2-135m", "held_out": "benchmarks/vs_dspy prompt_val (35) + dev (50)",
                     "demos": "3 labelled, random.Random(set).sample(train, 3)", "decoding": "greedy, 128 new tokens",
                     "call_cache": "off"},
    })
    shutdown_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
