"""How many training examples the weight step's bootstrap finds passing traces for.

    python benchmarks/weight_traces.py --task iris --attempts 10 --hints 3 --temperatures 0.7,1.0
    python benchmarks/weight_traces.py --task hotpotqa --sizes 60,10,10 --attempts 6 --hints 2

Runs the task's zero-shot program (the teacher of a weight step that comes
first, as in `w` and `w -> p`) on every training example: greedily, then at
each temperature with the sample seeds 1..attempts-1, then with the gold
answer as a hint (greedy, then samples), every attempt whatever the earlier
ones gave. From that one matrix it derives, for each number of attempts k
and of hint attempts h, what the bootstrap with early stopping
(``traces_per_example`` m = 1, 2) would keep: examples passed greedily, by
sampling, with the hint, not at all, distinct passing traces, and the runs
it would have made. Prints the table and writes
``benchmarks/results/weight_traces_<task>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import write_result  # noqa: E402


def run_matrix(program, train, metric, attempts: int, hints: int, temperature: float, threads: int):
    """``plain[i][a]`` / ``hinted[i][a]``: (passed, completions) of example i's attempt a."""
    from tandem.optimize.bootstrap import run_attempt

    def one(job):
        i, a, hinted = job
        run, _usage = run_attempt(program, train[i], metric, i, a, hinted=hinted, temperature=temperature)
        return job, run.passed, tuple(e.completion for e in run.entries)

    jobs = [(i, a, False) for i in range(len(train)) for a in range(attempts)]
    jobs += [(i, a, True) for i in range(len(train)) for a in range(hints)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        done = list(pool.map(one, jobs))
    plain = [[None] * attempts for _ in train]
    hinted = [[None] * hints for _ in train]
    for (i, a, h), ok, comp in done:
        (hinted if h else plain)[i][a] = (ok, comp)
    return plain, hinted


def derive(plain, hinted, k: int, h: int, m: int) -> dict:
    """What bootstrap(attempts=k, hint_attempts=h, traces_per_example=m) keeps, from the full matrix."""
    out = {"greedy": 0, "sampled": 0, "hint": 0, "none": 0, "traces": 0, "runs": 0}
    for row, hrow in zip(plain, hinted):
        kept, runs, attempt = [], 0, 0
        while attempt < k and len(kept) < m:  # the bootstrap's waves: greedy, then max(2, m - kept)
            wave = 1 if attempt == 0 else min(k - attempt, max(2, m - len(kept)))
            for a in range(attempt, attempt + wave):
                ok, comp = row[a]
                if ok and comp not in kept and len(kept) < m:
                    kept.append(comp)
            runs += wave
            attempt += wave
        if kept:
            first = next(a for a in range(k) if row[a][0])
            out["greedy" if first == 0 else "sampled"] += 1
        else:
            for a in range(h):
                runs += 1
                if hrow[a][0]:
                    kept.append(hrow[a][1])
                    break
            out["hint" if kept else "none"] += 1
        out["traces"] += len(kept)
        out["runs"] += runs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="iris")
    ap.add_argument("--sizes", default=None, help="train,dev,test (default: the task's)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--attempts", type=int, default=10)
    ap.add_argument("--hints", type=int, default=3)
    ap.add_argument("--temperatures", default="0.7,1.0")
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from tandem.lm.registry import get_lm
    from tandem.tasks.registry import get_task

    task = get_task(args.task)
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
    data = task.load(seed=args.data_seed, sizes=sizes)
    program = task.make_program(data).set_lm(get_lm("smollm2-135m", cache=False))
    train = data["train"]
    doc = {"task": args.task, "train": len(train), "data_seed": args.data_seed, "temperatures": {}}
    print(f"{args.task}: {len(train)} training examples, zero-shot teacher")
    print("| T | k | h | m | greedy | sampled | hint | none | traces | runs |\n|---|---|---|---|---|---|---|---|---|---|")
    for temp in (float(t) for t in args.temperatures.split(",")):
        t0 = time.perf_counter()
        plain, hinted = run_matrix(program, train, task.metric, args.attempts, args.hints, temp, args.threads)
        rows = []
        for k in sorted({1, 2, 3, 4, 6, 8, args.attempts} & set(range(1, args.attempts + 1))):
            for h in sorted({0, 1, 2, args.hints} & set(range(args.hints + 1))):
                for m in (1, 2, 3):
                    r = {"k": k, "h": h, "m": m, **derive(plain, hinted, k, h, m)}
                    rows.append(r)
                    if m == 1 or (h == args.hints and k == args.attempts):
                        print(f"| {temp} | {k} | {h} | {m} | {r['greedy']} | {r['sampled']} | {r['hint']} | "
                              f"{r['none']} | {r['traces']} | {r['runs']} |", flush=True)
        doc["temperatures"][str(temp)] = {"rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"weight_traces_{args.task}.json")
    write_result(out, doc)


if __name__ == "__main__":
    main()
