"""An Iris evaluation against one vLLM server and against a fleet of two (the openai backend).

    flock /tmp/tandem-heavy.lock nice -n 5 .venv/bin/python benchmarks/fleet.py            # 50 dev examples
    .venv/bin/python benchmarks/fleet.py --limit 20 --threads 16 --out /tmp/fleet.json

Starts two vLLM OpenAI-compatible CPU servers of the embedded model on
127.0.0.1 (``tandem.lm.vllm_server.VLLMServer``, tandem's engine settings,
prefix caching on), warms each up with two requests, then evaluates the Iris
task's default program (``get_task("iris")``) on its dev split through
``get_lm("openai:smollm2-135m", base_url=...)`` with the call cache off:
first against server 1 alone, then against both. Before each run every
server's prefix cache is emptied (vLLM's ``/reset_prefix_cache``, dev mode),
so the second run does not profit from the first. It prints one row per run
(wall time, requests each server answered, requests and output tokens per
second, score) and writes ``benchmarks/results/fleet.json``.

On a machine with fewer cores than servers need, two servers share the same
cores and cannot be faster than one; the ratio says what the fleet's
routing costs or gains there. Servers on separate GPUs or machines each
bring their own compute.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402

from tandem.evaluate import evaluate  # noqa: E402
from tandem.lm import Request, SamplingParams  # noqa: E402
from tandem.lm.registry import get_lm  # noqa: E402
from tandem.lm.vllm_server import VLLMServer  # noqa: E402
from tandem.tasks.registry import get_task  # noqa: E402

MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parents[1]


def run_once(servers: list[VLLMServer], examples, task, threads: int) -> dict:
    """One evaluation of ``examples`` against ``servers``; the servers' prefix caches emptied first."""
    for s in servers:
        httpx.post(f"{s.root}/reset_prefix_cache", timeout=60).raise_for_status()
    lm = get_lm(f"openai:{MODEL}", base_url=[s.url for s in servers], local_model=MODEL, cache=False,
                max_concurrency=threads)
    try:
        lm.start()
        result = evaluate(task.make_program().set_lm(lm), examples, task.metric, num_threads=threads)
        per_server = {row["url"]: row["answered"] for row in lm.servers()}
    finally:
        lm.close()
    u = result.usage
    return {
        "servers": len(servers), "wall_s": round(result.wall_s, 2), "score": round(result.score, 2), "n": result.n,
        "failures": result.failures, "requests": u.calls, "requests_per_server": list(per_server.values()),
        "requests_per_s": round(u.calls / result.wall_s, 3), "output_tokens": u.output_tokens,
        "output_tokens_per_s": round(u.output_tokens / result.wall_s, 2),
        "examples_per_s": round(result.n / result.wall_s, 3),
    }


def warm_up(server: VLLMServer) -> None:
    lm = get_lm(f"openai:{MODEL}", base_url=server.url, local_model=MODEL, cache=False)
    try:
        lm.generate([Request(f"Warm-up {i}: the iris", SamplingParams(max_tokens=8)) for i in range(2)])
    finally:
        lm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="the first N dev examples (default: all 50)")
    ap.add_argument("--threads", type=int, default=16, help="examples in flight (and max_concurrency)")
    ap.add_argument("--kv-cache-gb", type=int, default=1, help="KV cache per server, GiB")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet.json")
    args = ap.parse_args()

    task = get_task("iris")
    examples = task.load(seed=0)["dev"][: args.limit]
    logs = Path(tempfile.mkdtemp(prefix="tandem-fleet-"))
    servers = [VLLMServer(MODEL, log=logs / f"server-{i}.log", kv_cache_gb=args.kv_cache_gb) for i in (1, 2)]
    starts = []
    try:
        for s in servers:
            starts.append(round(s.start(dev_mode=True, timeout=1500), 1))
            print(f"server {s.url} started in {starts[-1]} s", flush=True)
        for s in servers:
            warm_up(s)
        t0 = time.perf_counter()
        runs = [run_once(servers[:1], examples, task, args.threads), run_once(servers, examples, task, args.threads)]
        total = time.perf_counter() - t0
    finally:
        for s in servers:
            s.stop()

    print(f"\nIris dev, {len(examples)} examples, {args.threads} in flight, {MODEL} on vLLM CPU servers")
    print(f"{'servers':>7} {'wall s':>8} {'requests per server':>20} {'req/s':>7} {'out tok/s':>9} {'score':>6}")
    for r in runs:
        per = " + ".join(str(n) for n in r["requests_per_server"])
        print(f"{r['servers']:>7} {r['wall_s']:>8} {per:>20} {r['requests_per_s']:>7} {r['output_tokens_per_s']:>9} "
              f"{r['score']:>6}")
    ratio = round(runs[0]["wall_s"] / runs[1]["wall_s"], 3)
    print(f"two servers / one server, throughput: {ratio}x")
    write_result(args.out, {
        "benchmark": "fleet", "task": "iris", "split": "dev", "n": len(examples), "threads": args.threads,
        "model": MODEL, "kv_cache_gb": args.kv_cache_gb, "server_start_s": starts, "runs": runs,
        "throughput_ratio_2_over_1": ratio, "total_s": round(total, 1),
        "command": " ".join(["benchmarks/fleet.py", *sys.argv[1:]]),
    })


if __name__ == "__main__":
    main()
