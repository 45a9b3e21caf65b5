"""KV block size and the prompt step: vLLM's CPU default (128 tokens) against 32.

    .venv/bin/python benchmarks/prefix_blocks.py                  # 4 rounds, blocks 128 and 32
    .venv/bin/python benchmarks/prefix_blocks.py --blocks 128,64,32 --rounds 2

vLLM's prefix cache reuses whole KV blocks, so with 128-token blocks the tail
of every shared demo prefix is computed again, and a zero-shot prompt whose
system message is shorter than a block shares nothing. This runs Iris's
prompt step (RandomSearch: 6 candidates, at most 3 demos, on the 15 / 35
split of benchmarks/vs_dspy) on one in-process engine per block size, all
started in this one process, and alternates them round by round (the order
flips every round) so that load from other jobs hits both alike. Each round
starts from an empty prefix cache; the call cache is off. Prints a table and
writes benchmarks/results/prefix_blocks.json.
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


def summarize(rounds: list[dict], blocks: list[int]) -> list[dict]:
    """Per block size: median wall time and time per LM call, share of prompt tokens cached; prints the table."""
    summary = []
    for b in blocks:
        rs = [x for x in rounds if x["block_size"] == b]
        hits = [x["prefix_cache_hits"] / x["prompt_tokens"] for x in rs if x["prefix_cache_hits"] is not None]
        summary.append({
            "block_size": b, "rounds": len(rs), "wall_s_median": round(statistics.median(x["wall_s"] for x in rs), 2),
            "wall_s_all": [x["wall_s"] for x in rs],
            "s_per_call_median": round(statistics.median(x["s_per_call"] for x in rs), 4),
            "prompt_tokens_cached": round(statistics.mean(hits), 3) if hits else None,
        })
    ref = summary[0]
    print("\n| block | rounds | wall s: median (all) | s per LM call: median | x faster per call | prompt tokens cached |")
    print("|---:|---:|---|---:|---:|---:|")
    for s in summary:
        cached = f"{100 * s['prompt_tokens_cached']:.0f}%" if s["prompt_tokens_cached"] is not None else "-"
        print(f"| {s['block_size']} | {s['rounds']} | {s['wall_s_median']} ({', '.join(map(str, s['wall_s_all']))}) "
              f"| {s['s_per_call_median']} | {ref['s_per_call_median'] / s['s_per_call_median']:.2f} | {cached} |")
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="128,32", help="block sizes, comma-separated (default 128,32)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_blocks.json")
    p.add_argument("--summarize", action="store_true", help="recompute the summary of --out from its rounds")
    args = p.parse_args()
    if args.summarize:
        doc = json.loads(args.out.read_text())
        for r in doc["rounds"]:
            r["prefix_cache_hits"] = r["prefix_cache_hits"] or None  # 0: not readable (see below)
        doc["summary"] = summarize(doc["rounds"], [s["block_size"] for s in doc["summary"]])
        args.out.write_text(json.dumps(doc, indent=1))
        return 0
    os.environ["TANDEM_CACHE"] = "0"
    os.environ["TANDEM_MAX_ENGINES"] = str(len(args.blocks.split(",")))

    from run import iris_rows  # noqa: E402 - benchmarks/vs_dspy: the comparison's data and split
    from tandem_side import diff, engine_counters, examples  # noqa: E402

    from tandem.lm.vllm import VLLM
    from tandem.optimize import RandomSearch
    from tandem.tasks.iris import IrisClassifier, iris_metric

    data = iris_rows()
    train, val = examples(data["prompt_train"]), examples(data["prompt_val"])
    blocks = [int(b) for b in args.blocks.split(",")]
    lms = {}
    for b in blocks:
        t0 = time.perf_counter()
        lms[b] = VLLM("smollm2-135m", block_size=b)
        lms[b].start()
        print(f"engine with {b}-token blocks ready in {time.perf_counter() - t0:.1f} s", flush=True)

    rounds = []
    for r in range(args.rounds):
        order = blocks if r % 2 == 0 else blocks[::-1]
        for b in order:
            lm = lms[b]
            time.sleep(0.1)  # the engine's loop thread goes idle once the last future is set
            lm.engine().engine.reset_prefix_cache()
            before, load = engine_counters(), os.getloadavg()[0]
            t0 = time.perf_counter()
            res = RandomSearch(iris_metric).compile(IrisClassifier().set_lm(lm), trainset=train, valset=val, seed=0)
            wall = time.perf_counter() - t0
            counters = diff(engine_counters(), before)
            # vLLM's metrics reader shows one engine's counters when a process runs several:
            # a counter that did not move is unknown here, not zero.
            hits = counters.get("vllm:prefix_cache_hits") or None
            u = res.history[0].usage
            rec = {"block_size": b, "round": r + 1, "wall_s": round(wall, 2), "calls": u["calls"],
                   "prompt_tokens": u["prompt_tokens"], "output_tokens": u["output_tokens"],
                   "prefix_cache_hits": hits,
                   "s_per_call": round(wall / u["calls"], 4), "chosen": res.history[0].detail,
                   "load_1min": round(load, 2)}
            rounds.append(rec)
            print(json.dumps(rec), flush=True)

    summary = summarize(rounds, blocks)
    write_result(args.out, {
        "summary": summary, "rounds": rounds,
        "settings": {"task": "iris prompt step, 15 / 35 (benchmarks/vs_dspy split)", "call_cache": "off",
                     "engine": {k: str(v) for k, v in lms[blocks[0]].options.items() if k != "block_size"}},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
