"""One task's strategy table with intervals, from a finished ``tandem experiment``: quality_<task>.json.

    .venv/bin/tandem experiment examples/iris_table.toml       # the runs (results.json has the statistics)
    .venv/bin/python benchmarks/quality.py runs/exp-iris --task iris

Reads ``<experiment>/results.json`` (refreshed from its run directories, so
statistics cover every finished run), prints each strategy's test mean with
its 95% interval and the paired tests, and writes
``benchmarks/results/quality_<task>.json``::

    {"strategies": {"p -> w -> p": {"test_mean": 41.3, "test_ci95": [30.1, 52.5], "runs": 3, ...}, ...},
     "comparisons": [...], "settings": {...}}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import write_result  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", type=Path, help="the experiment's out folder (holds results.json)")
    ap.add_argument("--task", default="iris")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from tandem.experiments.grid import load_results
    from tandem.experiments.table import ci_text, p_text

    doc = load_results(args.experiment)
    try:
        stats = doc["statistics"][args.task][args.model]
    except KeyError:
        raise SystemExit(f"{args.experiment}/results.json has no statistics for {args.task} / {args.model}") from None
    cells = [c for c in doc["cells"] if c.get("task") == args.task and c.get("status") == "ok"]
    print(f"| strategy | runs | test % mean [95% CI] | dev % mean [95% CI] |\n|---|---:|---|---|")
    for name, s in stats["strategies"].items():
        print(f"| {name} | {s['runs']} | {ci_text(s['test_mean'], s['test_ci95'], s['runs'])} "
              f"| {ci_text(s.get('dev_mean'), s.get('dev_ci95'), s['runs'])} |")
    print("\n| a vs b | run pairs | diff [95% CI] | paired test p |\n|---|---:|---|---|")
    for c in stats["comparisons"]:
        ci = c.get("diff_ci95")
        ci_s = f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""
        print(f"| {c['a']} vs {c['b']} | {c['run_pairs']} | {c['diff']:+.1f}{ci_s} | {p_text(c.get('p_value'))} |")
    out = args.out or ROOT / "benchmarks" / "results" / f"quality_{args.task}.json"
    write_result(out, {**stats, "settings": {
        "experiment": str(args.experiment), "model": args.model,
        "runs": sorted({(c.get("split_seed"), c.get("seed")) for c in cells}),
        "wall_s_per_strategy": _wall(cells)}})
    return 0


def _wall(cells: list[dict]) -> dict:
    from tandem.experiments.table import run_seconds

    out: dict[str, list[float]] = {}
    for c in cells:
        out.setdefault(c["strategy"], []).append(round(run_seconds(c), 1))
    return out


if __name__ == "__main__":
    sys.exit(main())
