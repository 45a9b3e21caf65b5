"""Where the time of a full Iris ``p -> w -> p`` run goes.

    .venv/bin/python benchmarks/optimize_iris.py            # runs it (call cache off), then summarizes
    .venv/bin/python benchmarks/optimize_iris.py --summarize runs/bench-iris-pwp

Runs ``tandem optimize iris --strategy "p -> w -> p"`` with the call cache
switched off (so every LM call is computed), then splits the wall time into
model loading, LoRA training, setting up the tuned model for serving (merge +
engine start), and inference (bootstrapping, candidate evaluation,
validation, test). Prints a table and writes benchmarks/results/optimize_iris.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


class MemorySampler:
    """Peak memory of a process and all its children (vLLM's engine and worker processes).

    PSS (proportional set size) counts a page shared by n processes as 1/n in
    each, so the sum over the tree is what the run holds; RSS sums count
    shared libraries once per process and overstate it. Sampled every 0.5 s.
    """

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_pss = self.peak_rss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            pss = rss = 0
            for p in procs:
                try:
                    m = p.memory_full_info()
                except psutil.Error:
                    continue
                pss += m.pss
                rss += m.rss
            if pss > self.peak_pss:
                self.peak_pss, self.peak_procs = pss, len(procs)
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(0.5)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=10)
        gib = 1024 ** 3
        return {"peak_pss_gib": round(self.peak_pss / gib, 2), "peak_rss_sum_gib": round(self.peak_rss / gib, 2),
                "processes_at_peak": self.peak_procs}


def run(run_dir: Path, seed: int, max_engines: int | None) -> tuple[float, dict]:
    env = {**os.environ, "TANDEM_CACHE": "0"}
    if max_engines is not None:
        env["TANDEM_MAX_ENGINES"] = str(max_engines)
    cmd = [str(ROOT / ".venv" / "bin" / "tandem"), "optimize", "iris", "--strategy", "p -> w -> p",
           "--seed", str(seed), "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mem = MemorySampler(proc.pid)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    memory = mem.stop()
    if rc:
        sys.exit(f"tandem optimize exited with {rc}")
    return wall, memory


def summarize(run_dir: Path, process_s: float | None) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    steps = []
    train_s = serve_s = 0.0
    for r in res["history"]:
        adapters = r.get("extra", {}).get("adapters", {}) or {}
        t = sum(a.get("wall_s", 0.0) for a in adapters.values())
        s = sum(a.get("serve_setup_s", 0.0) for a in adapters.values())
        train_s += t
        serve_s += s
        u = r.get("usage", {})
        steps.append({
            "step": f"{r['index'] + 1} {r['kind']}", "wall_s": round(r["wall_s"], 1), "train_s": round(t, 1),
            "serve_setup_s": round(s, 1), "inference_s": round(r["wall_s"] - t - s, 1),
            "calls": u.get("calls", 0), "prompt_tokens": u.get("prompt_tokens", 0),
            "output_tokens": u.get("output_tokens", 0), "val": r.get("val_score"),
        })
    total = process_s or res.get("wall_s")
    load_s = res.get("model_load_s") or 0.0
    optimize_s = sum(s["wall_s"] for s in steps)
    test_s = res.get("test_wall_s", 0.0)
    out = {
        "run_dir": str(run_dir), "total_s": round(total, 1) if total else None,
        "model_load_s": load_s, "optimize_s": round(optimize_s, 1), "train_s": round(train_s, 1),
        "serve_setup_s": round(serve_s, 1), "inference_s": round(optimize_s - train_s - serve_s + test_s, 1),
        "test_s": test_s, "dev_score": res.get("dev_score"), "test_score": res.get("test_score"),
        "steps": steps,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if total:
        out["other_s"] = round(total - optimize_s - test_s - (load_s or 0), 1)
    engines = res.get("engines") or []
    if engines:
        # Inside engine.step() is the model computing; the rest of the inference
        # time is tandem and vLLM's Python around it (prompt rendering, parsing,
        # scheduling, threads) plus waits for work.
        out["engines"] = engines
        out["engine_start_s"] = round(sum(e["start_s"] for e in engines), 1)
        out["engine_step_s"] = round(sum(e["step_s"] for e in engines), 1)
    return out


def table(s: dict) -> str:
    rows = ["| step | wall s | inference s | training s | merge+engine s | LM calls | prompt tok | output tok | dev % |",
            "|---|---|---|---|---|---|---|---|---|"]
    for st in s["steps"]:
        rows.append(f"| {st['step']} | {st['wall_s']} | {st['inference_s']} | {st['train_s']} | {st['serve_setup_s']} "
                    f"| {st['calls']} | {st['prompt_tokens']} | {st['output_tokens']} | {st['val']} |")
    rows.append("")
    rows.append(f"total {s['total_s']} s = model load {s['model_load_s']} s + steps {s['optimize_s']} s "
                f"+ test {s['test_s']} s + other {s.get('other_s')} s; "
                f"of the steps: training {s['train_s']} s, merge+engine start {s['serve_setup_s']} s, "
                f"inference {s['inference_s']} s (incl. test). dev {s['dev_score']}, test {s['test_score']}")
    if s.get("engines"):
        rows.append(f"engines: {len(s['engines'])} started, {s['engine_start_s']} s starting them, "
                    f"{s['engine_step_s']} s inside engine.step() of {s['inference_s']} s inference; "
                    + ", ".join(f"{Path(e['model']).name[:18]}: {e['requests']} requests, mean batch {e['mean_batch']}"
                                for e in s["engines"]))
    if s.get("memory"):
        m = s["memory"]
        rows.append(f"peak memory of the run (process tree): {m['peak_pss_gib']} GiB PSS "
                    f"({m['peak_rss_sum_gib']} GiB summed RSS, {m['processes_at_peak']} processes)")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--summarize", type=Path, default=None, help="summarize an existing run dir instead of running")
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench-iris-pwp"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-engines", type=int, default=None,
                   help="TANDEM_MAX_ENGINES for the run (default: tandem's); 2 keeps the base and the "
                        "merged engine side by side, 1 loads the merged weights into the one engine")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "optimize_iris.json")
    args = p.parse_args()
    process_s = None
    run_dir = args.summarize or args.run_dir
    if args.summarize is None:
        if run_dir.exists():
            sys.exit(f"{run_dir} exists; remove it or pass --summarize {run_dir}")
        load = os.getloadavg()[0]
        process_s, memory = run(run_dir, args.seed, args.max_engines)
    s = summarize(run_dir, process_s)
    out = args.out
    if args.summarize is None:
        s["memory"] = memory
        s["load_avg_1m_at_start"] = round(load, 2)
        s["max_engines"] = args.max_engines if args.max_engines is not None else os.environ.get("TANDEM_MAX_ENGINES")
    elif out.exists():
        # Only a real run measures memory and load: keep them from the run this file came from.
        old = json.loads(out.read_text())
        if old.get("run_dir") == s["run_dir"]:
            for k in ("memory", "load_avg_1m_at_start", "max_engines", "total_s", "other_s"):
                if k in old:
                    s[k] = old[k]
    print(table(s))
    out.write_text(json.dumps(s, indent=1))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
