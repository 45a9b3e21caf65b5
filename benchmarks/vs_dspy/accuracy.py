"""tandem's prompt step against DSPy's on Iris, repeated: accuracy with intervals and a paired test.

    bash benchmarks/vs_dspy/setup.sh                  # once: DSPy in benchmarks/vs_dspy/.venv
    .venv/bin/python benchmarks/vs_dspy/accuracy.py   # -> benchmarks/results/vs_dspy_accuracy.json
    .venv/bin/python benchmarks/vs_dspy/accuracy.py --data-seeds 0 --search-seeds 0,1   # a short run

Each side appends every finished run to --work-dir (tandem_<split>.rounds.jsonl,
dspy_<split>.rounds.jsonl); a later invocation with the same work dir runs
only the (split, search seed) pairs not there yet, so a killed run loses only
the run it was on and more seeds or splits can be added later.

The same prompt step as run.py (tandem's RandomSearch on the in-process vLLM
engine; DSPy's BootstrapFewShotWithRandomSearch against vLLM's server of the
same checkpoint; 15 / 35 of the 50 training examples, at most 3 demos, greedy,
call caches off), once per (data split, search seed): --data-seeds Iris
splits (the paper's 50 / 50 / 50, drawn with that seed) x --search-seeds
draws of the search on each. Per side it reports the mean validation and dev
accuracy with a Student-t 95 % interval over the runs; tandem against DSPy,
the mean of the paired run differences with its interval and the exact
McNemar test on every (run, dev example) pair (tandem.experiments.stats).
The time ratio is of the median step time over all runs (the engine start
and the server start excluded, reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (DSPY_PY, ROOT, TANDEM_PY, LoadSampler, cpu_model, run_side, versions,  # noqa: E402
                 wait_for_memory, write_data)

from tandem.experiments.stats import RunOutcomes, compare_strategies, mean_ci  # noqa: E402


def rounds_done(partial: Path) -> dict[int, dict]:
    """The rounds a side appended to ``partial`` (a JSON line each, this and earlier invocations), by search seed."""
    if not partial.is_file():
        return {}
    rounds = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    return {r["search_seed"]: r for r in rounds}


def todo(partial: Path, seeds: list[int]) -> list[int]:
    done = rounds_done(partial)
    return [x for x in seeds if x not in done]


def side_runs(name: str, by_split: dict[int, dict]) -> list[dict]:
    """One record per (data split, search seed) of one side."""
    return [{"side": name, "data_seed": d, "search_seed": r["search_seed"], "step_wall_s": r["step_wall_s"],
             "val_acc": r["val_acc"], "dev_acc": r["dev_acc"], "dev_outcomes": r["dev_outcomes"],
             "demos": r["demos"]}
            for d, res in sorted(by_split.items()) for r in res["rounds"]]


def interval(values: list[float]) -> dict:
    mean, lo, hi = mean_ci(values)
    return {"mean": round(mean, 2), "ci95": [round(lo, 2), round(hi, 2)], "runs": len(values)}


#: The issue's design: at least 8 search seeds x 3 data splits before the target is judged.
MIN_PAIRS = 24


def summarize(tandem: list[dict], dspy: list[dict]) -> dict:
    if not tandem or not dspy:
        return {"runs": {"tandem": len(tandem), "dspy": len(dspy)}, "note": "no run pairs yet"}

    def outcomes(runs):
        return [RunOutcomes(split=r["data_seed"], seed=r["search_seed"], score=r["dev_acc"],
                            outcomes=dict(enumerate(r["dev_outcomes"]))) for r in runs]

    cmp = compare_strategies(outcomes(tandem), outcomes(dspy))
    med = {n: sorted(r["step_wall_s"] for r in runs)[len(runs) // 2] for n, runs in (("tandem", tandem),
                                                                                       ("dspy", dspy))}
    test = cmp.test
    lo_ok = cmp.diff_ci95 is None or cmp.diff_ci95[1] >= 0
    return {
        "tandem": {"val_acc": interval([r["val_acc"] for r in tandem]),
                   "dev_acc": interval([r["dev_acc"] for r in tandem]), "step_wall_s_median": med["tandem"]},
        "dspy": {"val_acc": interval([r["val_acc"] for r in dspy]),
                 "dev_acc": interval([r["dev_acc"] for r in dspy]), "step_wall_s_median": med["dspy"]},
        "dev_diff_tandem_minus_dspy": {
            "mean": round(cmp.diff, 2), "ci95": [round(x, 2) for x in cmp.diff_ci95] if cmp.diff_ci95 else None,
            "run_pairs": cmp.run_pairs,
            "paired_test": {"method": test.method, "p_value": round(test.p_value, 4), "pairs": test.n,
                            "tandem_right_dspy_wrong": test.a_better, "dspy_right_tandem_wrong": test.b_better}
            if test else None},
        "speedup_dspy_over_tandem": round(med["dspy"] / med["tandem"], 2) if med["tandem"] else None,
        "target": "tandem's dev accuracy not significantly below DSPy's (the difference's interval includes 0 "
                  "or is above it) at >= 5x speed",
        # None (not judged) below MIN_PAIRS run pairs: a few pairs cannot say "not significantly below".
        "target_met": None if cmp.run_pairs < MIN_PAIRS else bool(
            lo_ok and (test is None or test.p_value >= 0.05 or cmp.diff >= 0)
            and med["tandem"] and med["dspy"] / med["tandem"] >= 5),
    }


def table(s: dict) -> str:
    def row(name):
        x = s[name]
        v, d = x["val_acc"], x["dev_acc"]
        return (f"| {name} | {v['mean']:.1f} [{v['ci95'][0]:.1f}, {v['ci95'][1]:.1f}] | {d['mean']:.1f} "
                f"[{d['ci95'][0]:.1f}, {d['ci95'][1]:.1f}] | {x['step_wall_s_median']:.1f} | {d['runs']} |")
    if "note" in s:
        return f"{s['note']}: {s['runs']}"
    diff = s["dev_diff_tandem_minus_dspy"]
    t = diff["paired_test"] or {}
    ci = diff["ci95"] or ["-", "-"]
    return "\n".join([
        "| side | val acc % (35) [95% CI] | dev acc % (50) [95% CI] | median step s | runs |",
        "|---|---|---|---:|---:|", row("tandem"), row("dspy"), "",
        f"dev, tandem - DSPy: {diff['mean']:+.1f} points [{ci[0]}, {ci[1]}] over {diff['run_pairs']} run pairs; "
        f"{t.get('method')} p = {t.get('p_value')} on {t.get('pairs')} (run, dev example) pairs "
        f"(tandem right, DSPy wrong: {t.get('tandem_right_dspy_wrong')}; the reverse: "
        f"{t.get('dspy_right_tandem_wrong')})",
        f"time: DSPy / tandem = {s['speedup_dspy_over_tandem']}x (median step); target met: {s['target_met']}"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-seeds", default="0,1,2", help="Iris splits (comma-separated)")
    p.add_argument("--search-seeds", default="0,1,2,3,4,5,6,7", help="search draws per split, both sides")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "vs_dspy_accuracy")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vs_dspy_accuracy.json")
    p.add_argument("--dspy-threads", type=int, default=24, help="DSPy's num_threads (as run.py)")
    p.add_argument("--kv-cache-gb", type=int, default=2, help="the server's VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--format", default=None, help="tandem's prompt format (default: tandem's default, fields)")
    p.add_argument("--skip-dspy", action="store_true",
                   help="tandem's side only; DSPy's runs are read from --dspy-from (an earlier result JSON)")
    p.add_argument("--dspy-from", type=Path, default=None)
    p.add_argument("--from-results", type=Path, default=None,
                   help="add the runs of an earlier result JSON (benchmarks/results/vs_dspy_accuracy.json) to the "
                        "work dir first, so only the missing pairs run")
    p.add_argument("--no-run", action="store_true",
                   help="run nothing: summarize the runs already in --work-dir (pairs present on both sides)")
    p.add_argument("--mem-gib", type=float, default=5.0, help="GiB available before a model process starts")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the server (finally)
    for py in (TANDEM_PY, DSPY_PY):
        if not py.exists():
            sys.exit(f"{py} is missing: run scripts/install.sh (tandem) and bash benchmarks/vs_dspy/setup.sh (DSPy)")
    data_seeds = [int(x) for x in args.data_seeds.split(",")]
    seeds = [int(x) for x in args.search_seeds.split(",")]
    if args.skip_dspy and not (args.dspy_from and args.dspy_from.is_file()):
        sys.exit("--skip-dspy needs --dspy-from FILE: an earlier result of this script")
    from tandem.lm.models import ensure_model
    from tandem.lm.vllm_server import VLLMServer

    model_dir = ensure_model("smollm2-135m")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    sampler, waits = LoadSampler(), {}
    res: dict = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                 "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
                 "versions": {"tandem_venv": versions(TANDEM_PY, ["vllm-cpu", "torch"]),
                              "dspy_venv": versions(DSPY_PY, ["dspy", "litellm"])},
                 "settings": {"data_seeds": data_seeds, "search_seeds": args.search_seeds,
                              "dspy_threads": args.dspy_threads, "decoding": "greedy, max 128 new tokens",
                              "split": "split_iris 50/50/50 per data seed; prompt step 15 / 35 (SplitPlan, seed 0)"},
                 "model_load_s": {}, "memory_waits": waits}
    tandem, dspy, done = {}, {}, {}
    for d in data_seeds:
        write_data(work / f"data_{d}.json", d)
    if args.from_results:  # an earlier result (e.g. the committed one) fills an empty work dir
        for r in json.loads(args.from_results.read_text())["runs"]:
            partial = work / f"{r['side']}_{r['data_seed']}.rounds.jsonl"
            if r["search_seed"] not in rounds_done(partial):
                with open(partial, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
    server = None
    try:
        for d in data_seeds:
            partial = work / f"tandem_{d}.rounds.jsonl"
            if (missing := todo(partial, seeds)) and not args.no_run:
                wait_for_memory(args.mem_gib, f"tandem engine, split {d}", waits, 1800)
                sampler.phase = "tandem"
                print(f"tandem, split {d}, search seeds {missing} ...", flush=True)
                out = work / f"tandem_{d}.json"
                run_side([TANDEM_PY, HERE / "tandem_side.py", "prompt", "--data", work / f"data_{d}.json",
                          "--out", out, "--partial", partial, "--rounds", 1,
                          "--search-seeds", ",".join(map(str, missing)),
                          *(["--format", args.format] if args.format else [])],
                         work / f"tandem_{d}.log", env={"TANDEM_CACHE": "0"}, timeout=7200)
                res["model_load_s"][f"tandem_engine_split_{d}"] = json.loads(out.read_text())["model_load_s"]
            tandem[d] = {"rounds": [r for x, r in sorted(rounds_done(partial).items()) if x in seeds]}
        if args.skip_dspy:
            done = json.loads(args.dspy_from.read_text())
            res["dspy_from"] = {"file": str(args.dspy_from), "date_utc": done.get("date_utc")}
        elif not args.no_run and any(todo(work / f"dspy_{d}.rounds.jsonl", seeds) for d in data_seeds):
            wait_for_memory(args.mem_gib, "vLLM server", waits, 1800)
            sampler.phase = "server start"
            server = VLLMServer(model_dir, log=work / "server.log", served_name="smollm2-135m", python=TANDEM_PY,
                                kv_cache_gb=args.kv_cache_gb)
            res["model_load_s"]["server"] = round(server.start(dev_mode=True), 1)
        for d in [] if args.skip_dspy else data_seeds:
            partial = work / f"dspy_{d}.rounds.jsonl"
            if (missing := todo(partial, seeds)) and not args.no_run:
                sampler.phase = "dspy"
                print(f"DSPy, split {d}, search seeds {missing} ...", flush=True)
                run_side([DSPY_PY, HERE / "dspy_side.py", "prompt", "--data", work / f"data_{d}.json",
                          "--api-base", server.url, "--metrics-url", f"{server.root}/metrics",
                          "--threads", args.dspy_threads, "--rounds", 1,
                          "--search-seeds", ",".join(map(str, missing)), "--partial", partial,
                          "--out", work / f"dspy_{d}.json"], work / f"dspy_{d}.log", timeout=7200)
            dspy[d] = {"rounds": [r for x, r in sorted(rounds_done(partial).items()) if x in seeds]}
    finally:
        if server is not None:
            server.stop()
        sampler.stop()
        res["load"] = sampler.summary()
        dspy_runs = ([r for r in done.get("runs", []) if r["side"] == "dspy" and r["data_seed"] in data_seeds]
                     if args.skip_dspy else side_runs("dspy", dspy))
        res["runs"] = side_runs("tandem", tandem) + dspy_runs
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    res["summary"] = summarize(side_runs("tandem", tandem), dspy_runs)
    args.out.write_text(json.dumps(res, indent=1))
    print()
    print(table(res["summary"]))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
