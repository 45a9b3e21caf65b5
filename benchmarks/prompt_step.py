"""The prompt step with and without a filler line for a demo's missing fields, and with shared teachers.

    .venv/bin/python benchmarks/prompt_step.py                    # 4 rounds of each variant
    .venv/bin/python benchmarks/prompt_step.py --rounds 6 --num-candidates 6

Iris's prompt step (RandomSearch, at most 3 demos, on the 15 / 35 split of
benchmarks/vs_dspy) on one in-process engine, in these variants:

    before       a labelled demo's reply leaves out the reasoning it does not
                 have
    after        a labelled demo shows its missing reasoning as "Not given for
                 this example." (tandem.program.render.NOT_GIVEN; the default)
    shared       after, and every bootstrap teacher shows the same labelled
                 demos (less the example itself), so the engine caches their
                 prefix (BootstrapFewShot.teacher_demos = "shared"; not the
                 default: it saved no time with 9 candidates, and chose worse)

Two other schedules (scoring the zero-shot and labelled candidates while the
bootstrap runs; issuing re-samples with the greedy try) are not variants
here: benchmarks/results/prompt_step_scheduling.json and docs/benchmarks.md
have their measurements (this script at commit f6dd344).

The variants take turns round by round, the order rotating each round, so
load from other jobs hits all alike. Each round starts from an empty prefix
cache; the call cache is off. The chosen program can differ between variants
only through the labelled candidate (its demos are now drawn from the whole
training set). Prints a table and writes benchmarks/results/prompt_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from machine import write_result  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "vs_dspy"))

VARIANTS = {  # the labelled teacher's demos, and how a demo's missing fields are rendered
    "before": {"teacher_demos": "per_example", "not_given": False},
    "after": {"teacher_demos": "per_example", "not_given": True},
    "shared": {"teacher_demos": "shared", "not_given": True},
}


def summarize(rounds: list[dict], names: list[str]) -> list[dict]:
    summary = []
    for n in names:
        rs = [x for x in rounds if x["variant"] == n]
        summary.append({
            "variant": n, "rounds": len(rs),
            "wall_s_median": round(statistics.median(x["wall_s"] for x in rs), 2),
            "wall_s_all": [x["wall_s"] for x in rs],
            "bootstrap_s_median": round(statistics.median(x["bootstrap_s"] for x in rs), 2),
            "calls_median": statistics.median(x["calls"] for x in rs),
            "output_tokens_median": statistics.median(x["output_tokens"] for x in rs),
            "val_median": round(statistics.median(x["val"] for x in rs), 2),
        })
    ref = summary[0]
    print("\n| variant | rounds | wall s: median (all) | bootstrap s | x faster | LM calls | output tokens | val % |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for s in summary:
        print(f"| {s['variant']} | {s['rounds']} | {s['wall_s_median']} ({', '.join(map(str, s['wall_s_all']))}) "
              f"| {s['bootstrap_s_median']} | {ref['wall_s_median'] / s['wall_s_median']:.2f} | {s['calls_median']:.0f} "
              f"| {s['output_tokens_median']:.0f} | {s['val_median']} |")
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--num-candidates", type=int, default=None, help="RandomSearch's num_candidates (default: its own)")
    p.add_argument("--threads", type=int, default=None, help="RandomSearch's num_threads (default: its own)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_step.json")
    p.add_argument("--summarize", action="store_true", help="recompute the summary of --out from its rounds")
    args = p.parse_args()
    names = args.variants.split(",")
    if args.summarize:
        doc = json.loads(args.out.read_text())
        doc["summary"] = summarize(doc["rounds"], [s["variant"] for s in doc["summary"]])
        args.out.write_text(json.dumps(doc, indent=1))
        return 0
    os.environ["TANDEM_CACHE"] = "0"

    from run import iris_rows  # noqa: E402 - benchmarks/vs_dspy: the comparison's data and split
    from tandem_side import examples, time_bootstrap  # noqa: E402

    from tandem.lm.vllm import VLLM, shutdown_engines
    from tandem.optimize import RandomSearch
    from tandem.program import render
    from tandem.program.render import complete_demo
    from tandem.tasks.iris import IrisClassifier, iris_metric

    data = iris_rows()
    train, val = examples(data["prompt_train"]), examples(data["prompt_val"])
    lm = VLLM("smollm2-135m")
    t0 = time.perf_counter()
    lm.start()
    print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    kw = {} if args.num_candidates is None else {"num_candidates": args.num_candidates}
    if args.threads is not None:
        kw["num_threads"] = args.threads

    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            time.sleep(0.1)  # the engine's loop thread goes idle once the last future is set
            lm.engine().engine.reset_prefix_cache()
            v = VARIANTS[n]
            # measurement only: the "before" variant renders a demo's fields as they are
            render.complete_demo = complete_demo if v["not_given"] else (lambda _sig, demo: demo)
            rs = RandomSearch(iris_metric, **kw)
            rs.fewshot.teacher_demos = v["teacher_demos"]
            phases = time_bootstrap(rs)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            res = rs.compile(IrisClassifier().set_lm(lm), trainset=train, valset=val, seed=0)
            wall = time.perf_counter() - t0
            u = res.history[0].usage
            rec = {"variant": n, "round": r + 1, "wall_s": round(wall, 2), **phases, "calls": u["calls"],
                   "prompt_tokens": u["prompt_tokens"], "output_tokens": u["output_tokens"],
                   "val": round(res.score, 2), "chosen": res.history[0].detail,
                   "candidates": res.history[0].extra["candidates"], "load_1min": round(load, 2)}
            rounds.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "candidates"}), flush=True)
    render.complete_demo = complete_demo

    summary = summarize(rounds, names)
    write_result(args.out, {
        "summary": summary, "rounds": rounds,
        "settings": {"task": "iris prompt step, 15 / 35 (benchmarks/vs_dspy split)", "call_cache": "off",
                     "variants": {n: VARIANTS[n] for n in names}, "num_candidates": rs.num_candidates,
                     "engine": {k: str(v) for k, v in lm.options.items()}},
    })
    shutdown_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
