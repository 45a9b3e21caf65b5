"""Same seed, same result: two fresh ``tandem optimize`` runs with the call cache off, compared.

    .venv/bin/python benchmarks/determinism.py                      # runs both, then compares
    .venv/bin/python benchmarks/determinism.py --no-run             # compares the two run dirs only

Each run is ``tandem optimize TASK --strategy S --seed N --set sizes=...`` with
``TANDEM_CACHE=0`` (no call cache: every LM call reaches the engine), into
``--work``/r1 and r2. The comparison covers what a step decides and what it
trains on: every step's record (scores, the chosen candidate, bootstrap counts,
train examples, token counts) with wall times, the engines' batching record and
the run folder's path left out, every saved program.json (instructions,
demos; ``saved_at`` and paths left out), the SFT data and the adapter weights byte for byte. It writes
``benchmarks/results/determinism.json`` and prints one line per compared item.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Left out: times, and the engines' scheduling record (how requests were batched, which
#: differs between runs even where every reply is the same).
SKIPPED_KEYS = {"saved_at", "created", "seconds", "started", "finished", "engines"}


def normalized(doc, run_dir: Path):
    """``doc`` with timings and engine scheduling dropped, the run folder's path replaced, and lists of names sorted."""
    if isinstance(doc, dict):
        return {normalized(k, run_dir): normalized(v, run_dir) for k, v in sorted(doc.items())
                if k not in SKIPPED_KEYS and not k.endswith("_s")}
    if isinstance(doc, list):
        items = [normalized(v, run_dir) for v in doc]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    if isinstance(doc, str):
        return doc.replace(str(run_dir), "RUN").replace(str(run_dir.relative_to(ROOT)), "RUN")
    return doc


def json_files(run: Path) -> list[Path]:
    return sorted(p.relative_to(run) for p in run.rglob("*.json") if "checkpoint" not in str(p))


def compare(r1: Path, r2: Path) -> list[dict]:
    """One entry per compared file: ``{"path", "same"}`` (and ``"kind"``)."""
    rows = []
    for rel in json_files(r1):
        a = normalized(json.loads((r1 / rel).read_text()), r1)
        b = normalized(json.loads((r2 / rel).read_text()), r2) if (r2 / rel).is_file() else None
        rows.append({"path": str(rel), "kind": "json, times and paths left out", "same": a == b})
    for pattern in ("*.safetensors", "sft.jsonl"):
        for p in sorted(r1.rglob(pattern)):
            rel = p.relative_to(r1)
            other = r2 / rel
            same = other.is_file() and hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(
                other.read_bytes()).digest()
            rows.append({"path": str(rel), "kind": "bytes", "same": same})
    return rows


def run(args, run_dir: Path) -> None:
    cmd = [str(ROOT / ".venv/bin/tandem"), "optimize", args.task, "--strategy", args.strategy,
           "--seed", str(args.seed), "--set", f"sizes={args.sizes}", "--run-dir", str(run_dir)]
    if args.threads is not None:
        cmd += ["--set", f"threads={args.threads}"]
    env = {**os.environ, "TANDEM_CACHE": "0"}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="iris")
    ap.add_argument("--strategy", default="p -> w -> p")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sizes", default="30,30,30")
    ap.add_argument("--threads", type=int, default=None, help="the run's threads setting (default: the config's)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "determinism")
    ap.add_argument("--no-run", action="store_true", help="compare the run dirs already in --work")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "determinism.json")
    args = ap.parse_args()
    work = args.work.resolve()
    r1, r2 = work / "r1", work / "r2"
    if not args.no_run:
        for r in (r1, r2):
            if r.exists():
                sys.exit(f"{r} exists: remove it, or compare it with --no-run")
            run(args, r)
    walls = [json.loads((r / "results.json").read_text()).get("wall_s") for r in (r1, r2)]
    rows = compare(r1, r2)
    for row in rows:
        print(f"{'same' if row['same'] else 'DIFFERENT':9}  {row['path']}  ({row['kind']})")
    history = json.loads((r1 / "history.json").read_text())
    doc = {
        "command": f"tandem optimize {args.task} --strategy '{args.strategy}' --seed {args.seed} "
                   f"--set sizes={args.sizes}"
                   + (f" --set threads={args.threads}" if args.threads is not None else "") + ", TANDEM_CACHE=0, twice",
        "identical": all(r["same"] for r in rows), "files_compared": len(rows),
        "different": [r["path"] for r in rows if not r["same"]],
        "dev_scores": [s.get("val_score") for s in history], "run_wall_s": walls,
    }
    write_result(args.out, doc)
    print(f"{'identical' if doc['identical'] else 'NOT identical'}: {len(rows)} files compared -> {args.out}")
    return 0 if doc["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
