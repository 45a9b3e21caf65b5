"""The same benchmark at two commits, run in turns in one sitting: is the later commit slower?

    .venv/bin/python benchmarks/commits.py --before 69fd852 --after HEAD --bench prompt_step --rounds 3
    .venv/bin/python benchmarks/commits.py --before 69fd852 --after HEAD --bench optimize --rounds 1

Each commit is checked out in a scratch git worktree (``--work``, removed at
the end) and run with this checkout's ``.venv`` and ``PYTHONPATH`` set to the
worktree, so only tandem's code differs. The commits take turns, the order
alternating each round, so load from other jobs hits both alike.

Benchmarks:

    prompt_step  each commit's own benchmarks/prompt_step.py, variant "after"
                 (the default prompt step: RandomSearch on Iris 15 / 35, one
                 in-process engine, call cache off), one round per run; the
                 time is the prompt step's wall time, engine start excluded
    optimize     ``tandem optimize iris --strategy "p -> w -> p" --seed 0``
                 with the call cache off and ``--sizes`` (default 30,20,30:
                 smaller than optimize_iris.py's 50 / 50 / 50 so a pair fits a
                 sitting); the time is the whole command's wall time, and the
                 steps are summarized as benchmarks/optimize_iris.py does

Prints a table (median and all times per commit, the after / before ratio of
medians) and writes benchmarks/results/commits_<bench>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import write_result  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv" / "bin" / "python"


def worktree(rev: str, work: Path) -> tuple[str, Path]:
    """A scratch worktree of ``rev``; returns its full hash and its path."""
    sha = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", rev], text=True).strip()
    path = work / sha[:10]
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), sha], check=True)
        # The worktree's own scripts find this checkout's environment (optimize_iris.py uses ROOT/.venv).
        (path / ".venv").symlink_to(ROOT / ".venv")
    return sha, path


def env_for(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "TANDEM_CACHE": "0"}


def run_prompt_step(tree: Path, out_dir: Path, tag: str) -> dict:
    out = out_dir / f"prompt_step_{tag}.json"
    cmd = [str(PY), "benchmarks/prompt_step.py", "--variants", "after", "--rounds", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env_for(tree), check=True, stdout=subprocess.DEVNULL)
    rec = json.loads(out.read_text())["rounds"][0]
    return {"wall_s": rec["wall_s"], "calls": rec["calls"], "output_tokens": rec["output_tokens"], "val": rec["val"]}


def run_optimize(tree: Path, out_dir: Path, tag: str, sizes: str) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from optimize_iris import summarize

    run_dir = out_dir / f"run_{tag}"
    cmd = [str(PY), "-m", "tandem.cli", "optimize", "iris", "--strategy", "p -> w -> p", "--seed", "0",
           "--run-dir", str(run_dir), "--set", f"sizes={sizes}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env_for(tree), check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    s = summarize(run_dir, wall)
    return {"wall_s": round(wall, 1), "model_load_s": s["model_load_s"], "train_s": s["train_s"],
            "serve_setup_s": s["serve_setup_s"], "inference_s": s["inference_s"],
            "dev": s["dev_score"], "test": s["test_score"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--after", default="HEAD")
    p.add_argument("--bench", choices=("prompt_step", "optimize"), required=True)
    p.add_argument("--rounds", type=int, default=3, help="runs of each commit")
    p.add_argument("--sizes", default="30,20,30", help="optimize: train,dev,test sizes")
    p.add_argument("--work", type=Path, default=Path("/tmp/tandem-commits"), help="scratch folder (worktrees, runs)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/commits_<bench>.json")
    args = p.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"commits_{args.bench}.json"
    args.work.mkdir(parents=True, exist_ok=True)
    sides = {"before": worktree(args.before, args.work), "after": worktree(args.after, args.work)}
    runs: list[dict] = []
    try:
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for side in order:
                sha, tree = sides[side]
                tag = f"{side}_{r + 1}"
                load = os.getloadavg()[0]
                rec = (run_prompt_step(tree, args.work, tag) if args.bench == "prompt_step"
                       else run_optimize(tree, args.work, tag, args.sizes))
                rec = {"side": side, "commit": sha[:10], "round": r + 1, "load_1min": round(load, 2), **rec}
                runs.append(rec)
                print(json.dumps(rec), flush=True)
    finally:
        for _, tree in sides.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    med = {s: statistics.median(x["wall_s"] for x in runs if x["side"] == s) for s in sides}
    ratio = med["after"] / med["before"]
    print("\n| commit | runs | wall s: median (all) |\n|---|---:|---|")
    for s, (sha, _) in sides.items():
        ws = [x["wall_s"] for x in runs if x["side"] == s]
        print(f"| {s} {sha[:10]} | {len(ws)} | {med[s]:.1f} ({', '.join(f'{w:.1f}' for w in ws)}) |")
    print(f"\nafter / before (medians): {ratio:.3f}")
    write_result(out, {"bench": args.bench, "before": sides["before"][0], "after": sides["after"][0],
                       "median_s": med, "after_over_before": round(ratio, 3), "runs": runs,
                       "settings": {"rounds": args.rounds, "sizes": args.sizes if args.bench == "optimize" else None}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
