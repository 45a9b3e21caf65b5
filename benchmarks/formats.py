"""Which prompt format suits the embedded model: accuracy of each format, zero-shot and with labelled demos.

    .venv/bin/python benchmarks/formats.py                       # Iris, GSM8K, HotPotQA
    .venv/bin/python benchmarks/formats.py --tasks iris --sets 8

For each task, the task's program runs on ``--n`` held-out examples (Iris:
the dev and test splits of data seed 0; GSM8K and HotPotQA: their dev
split) in every format of ``tandem.program.formats``: zero-shot, and with
``--sets`` seeded samples of 3 labelled demos from the training split (the
same samples for every format). Greedy, call cache off, one vLLM engine.
Per format: the mean accuracy over the demo sets with a 95% interval, and
each format against ``fields`` paired on the same (demo set, example)
pairs (McNemar for 0/1 metrics, paired bootstrap otherwise). Prints a table
and writes benchmarks/results/formats.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import write_result  # noqa: E402


def give_labelled_demos(program, examples) -> None:
    """Each predictor whose outputs the examples label gets them as demos (fields it lacks are left out)."""
    for pred in program.predictors():
        sig = pred.signature
        if any(f.name in examples[0] for f in sig.output_fields):
            pred.demos = [{f.name: ex[f.name] for f in sig.fields if f.name in ex} for ex in examples]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="iris,gsm8k,hotpotqa")
    ap.add_argument("--formats", default=None, help="comma-separated (default: every registered format)")
    ap.add_argument("--sets", type=int, default=4, help="seeded samples of 3 labelled demos (0: zero-shot only)")
    ap.add_argument("--n", type=int, default=100, help="held-out examples per task")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "formats.json")
    args = ap.parse_args()
    os.environ["TANDEM_CACHE"] = "0"

    from tandem.evaluate import evaluate
    from tandem.experiments.stats import RunOutcomes, compare_strategies, mean_ci
    from tandem.lm.vllm import VLLM, shutdown_engines
    from tandem.program.formats import FORMATS
    from tandem.tasks.registry import get_task

    formats = args.formats.split(",") if args.formats else list(FORMATS)
    lm = VLLM("smollm2-135m")
    lm.start()
    rows, summary = [], []
    for task_name in args.tasks.split(","):
        task = get_task(task_name)
        data = task.load(seed=0)
        held = (data["dev"] + data["test"] if task_name == "iris" else data["dev"])[: args.n]
        settings = [("zero-shot", None)] + [(f"demos {s}", s) for s in range(args.sets)]
        outcomes: dict[tuple[str, bool], list[RunOutcomes]] = {}
        for label, s in settings:
            demos_src = random.Random(s).sample(data["train"], 3) if s is not None else []
            for fmt in formats:
                prog = task.make_program(data).set_lm(lm).set_format(fmt)
                if demos_src:
                    give_labelled_demos(prog, demos_src)
                t0 = time.perf_counter()
                r = evaluate(prog, held, task.metric)
                row = {"task": task_name, "format": fmt, "setting": label, "score": round(r.score, 2),
                       "failed": r.n_failed, "calls": r.usage.calls, "output_tokens": r.usage.output_tokens,
                       "wall_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(row, flush=True)
                outcomes.setdefault((fmt, s is not None), []).append(RunOutcomes(
                    split=0, seed=label, score=r.score, outcomes={rec.index: rec.score for rec in r.records}))
        for fmt in formats:
            for with_demos in (False, True):
                runs = outcomes.get((fmt, with_demos), [])
                if not runs:
                    continue
                mean, lo, hi = mean_ci(r.score for r in runs)
                cmp = None if fmt == "fields" else compare_strategies(runs, outcomes[("fields", with_demos)])
                summary.append({
                    "task": task_name, "format": fmt, "demos": "3 labelled" if with_demos else "none",
                    "runs": len(runs), "mean": round(mean, 1), "ci95": [round(lo, 1), round(hi, 1)],
                    "vs_fields": None if cmp is None or cmp.test is None else {
                        "diff": round(cmp.diff, 1), "p_value": round(cmp.test.p_value, 4),
                        "method": cmp.test.method, "pairs": cmp.test.n,
                        "ci95": [round(100 * v, 1) for v in cmp.test.ci95]},
                })
    print("\n| task | format | demos | runs | mean % [95% CI] | vs fields: diff, pooled paired 95% CI, p |")
    print("|---|---|---|---:|---|---|")
    for x in summary:
        ci = "" if x["runs"] < 2 else f" [{x['ci95'][0]:.1f}, {x['ci95'][1]:.1f}]"
        vs = "-" if x["vs_fields"] is None else (
            f"{x['vs_fields']['diff']:+.1f} [{x['vs_fields']['ci95'][0]:+.1f}, {x['vs_fields']['ci95'][1]:+.1f}], "
            f"p={x['vs_fields']['p_value']:.3g}")
        print(f"| {x['task']} | {x['format']} | {x['demos']} | {x['runs']} | {x['mean']:.1f}{ci} | {vs} |")
    write_result(args.out, {"summary": summary, "rows": rows, "settings": {
        "model": "smollm2-135m", "engine": "in-process vLLM, greedy, call cache off", "n": args.n,
        "demo_sets": args.sets, "demos": "3 labelled, random.Random(set).sample(train, 3)"}})
    shutdown_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
