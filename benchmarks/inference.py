"""Inference throughput of the ``vllm`` and ``hf`` backends on the embedded model.

    TANDEM_HOME=... python benchmarks/inference.py            # everything below
    TANDEM_HOME=... python benchmarks/inference.py --quick    # fewer configurations
    python benchmarks/inference.py --help                     # starts nothing

Prompts are real tandem prompts: Iris ``ChainOfThought`` requests rendered by
``IrisClassifier().classify.request(inputs, lm)``, greedy, ``max_tokens`` 64
(``--max-tokens``). Prompt sets (``--prompts``):

- ``shared``: the same 3 demos on every prompt (one per species): system
  message + demos are one prefix shared by every request, only the
  measurements differ. This is what an evaluation of one candidate looks like.
- ``distinct``: 3 demos per prompt with a different first demo on every
  request: as long as ``shared``, sharing only the system message.
- ``zeroshot``: no demos, varied inputs (short prompts).

Every configuration (backend x prompt set x concurrency 1/8/64) hands all its
requests over at once (``lm.generate``), so they reach the backend's batching
together, and is timed after a warm-up. Prompt tok/s and output tok/s both
divide by the same wall time: they are shares of one mixed run, not separate
phase rates. HF has no prefix cache, so above 8 concurrent requests it runs
the first prompt set only (``--hf-max-size`` caps it further; at 64 it takes
about a minute on 2 quiet cores, several on busy ones).

vLLM's prefix cache is reset before every measured vLLM run. For ``shared``
(and ``zeroshot``) one untimed request primes it first, so the timed requests
find the common part cached (an evaluation's steady state) and nothing more;
``distinct`` runs start cold. The cache-hit tokens of each run come from
vLLM's own counter ``vllm:prefix_cache_hits``. vLLM caches whole blocks (128
tokens on CPU), so a prefix is reused in 128-token steps.

Prefill: ``--prefill-size`` (64) requests with ``max_tokens=1``: shared demos
primed ("warm"), shared demos after a reset ("cold": requests of one batch
still reuse blocks that another request computed in an earlier step of the
chunked prefill), distinct demos after a reset. Rates:

- effective = all prompt tokens / wall (what a caller sees);
- computed = (prompt tokens - cache-hit tokens) / wall (what the CPU did).

FLOPs of the computed tokens: 2 x body x tokens, ``body`` = non-embedding
parameters (q, k, v, o and MLP weights of all layers; norms left out), plus
2 x head (vocab x hidden) per request for the one logits row a prefill
samples. Attention's sequence-length terms are left out (the JSON gives
their share). The rate is compared with this machine's matmul rate:
torch.matmul of 4096 x 4096 bf16 (and fp32) matrices, best call, measured at
the start and after the vLLM section; the higher is the "peak".

vLLM CPU tuning: with ``--tuning combined`` (default) a second vLLM engine
runs in a worker process started with ``LD_PRELOAD`` = the venv's Intel
OpenMP (``libiomp5.so``) and Debian's ``libtcmalloc_minimal.so.4``
(``apt-get install libtcmalloc-minimal4``) on the ``--tuned-sizes`` (64) and
the prefill runs. With enough free memory (``--together``; about 4 GB per
engine with ``--kv-cache-gb 1``) both engines are up at once and take turns
on each configuration, alternating which goes first, so load from other jobs
falls on both alike; otherwise they run one after the other. The table gives
tuned / plain, best against best and per round. ``--repeat`` rounds (3) of
every vLLM configuration; the tables show each one's fastest sample (load
from other jobs only slows a run down) with the range beside it. Thread
binding (``VLLM_CPU_OMP_THREADS_BIND``, all cores) is tandem's default in both.

``--quick``: HF up to 8 concurrent requests on the first prompt set only,
the tuned engine on ``shared`` and the prefill runs only, no shared-cold
prefill, 2 rounds.

The machine may be shared: the JSON records the 1-minute load average at the
start of every run. Compare ratios within one run, not figures across runs.
Each worker (``--worker``, internal) is a subprocess of this script that
answers one JSON line per command on a pipe.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_info  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "inference.json"
MODEL = "smollm2-135m"
SPECIES = ("setosa", "versicolor", "virginica")
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


# -- arguments ---------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prompt/output tokens per second of tandem's vllm and hf backends "
        "on the embedded model (Iris ChainOfThought prompts). Writes a table and JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backends", default="vllm,hf", help="comma-separated: vllm, hf")
    p.add_argument("--sizes", default="1,8,64", help="concurrent requests per configuration")
    p.add_argument("--prompts", default="shared,distinct", help="prompt sets: shared, distinct, zeroshot")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per request (greedy)")
    p.add_argument("--hf-max-size", type=int, default=64,
                   help="largest concurrency run on hf; above 8 it runs the first prompt set only "
                   "(hf has no prefix cache: the sets differ only in padding)")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--hf-dtype", default="auto", help="HFLM dtype ('auto' = the checkpoint's: float32)")
    p.add_argument("--hf-threads", type=int, default=0,
                   help="torch threads of the hf worker (0: torch's default, one per core); 1 suffers less "
                   "from other jobs on a busy machine")
    p.add_argument("--prefill-size", type=int, default=64, help="requests of the max_tokens=1 runs (0: none)")
    p.add_argument("--tuning", choices=("none", "combined"), default="combined",
                   help="'combined': a second vLLM engine process with LD_PRELOAD=libiomp5.so:libtcmalloc_minimal.so.4")
    p.add_argument("--tuned-sizes", default="64", help="sizes the tuned vLLM engine also runs")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds of the vLLM configurations; tables give the fastest (default 3, --quick 2)")
    p.add_argument("--together", choices=("auto", "yes", "no"), default="auto",
                   help="run the plain and tuned vLLM engines side by side, taking turns (yes), or one "
                   "after the other (no); auto: side by side when MemAvailable >= 12 GiB")
    p.add_argument("--step-timeout", type=int, default=240, help="seconds one configuration may take")
    p.add_argument("--kv-cache-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of each engine")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--quick", action="store_true",
                   help="fewer configurations: hf up to 8 concurrent on the first prompt set only; tuned engine "
                   "on 'shared' and the prefill runs only; no shared-cold prefill; 2 rounds")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    p.add_argument("--timeout", type=int, default=900, help="seconds after which workers still running are stopped")
    # Internal: a worker subprocess.
    p.add_argument("--worker", choices=("vllm", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    p.add_argument("--cmd-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--res-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.sizes = [int(x) for x in str(args.sizes).split(",") if x]
        args.tuned_sizes = [int(x) for x in str(args.tuned_sizes).split(",") if x]
    except ValueError:
        p.error("--sizes and --tuned-sizes take comma-separated integers")
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    args.backends = [x for x in args.backends.split(",") if x]
    args.prompts = [x for x in args.prompts.split(",") if x]
    for x in args.backends:
        if x not in ("vllm", "hf"):
            p.error(f"unknown backend {x!r}")
    for x in args.prompts:
        if x not in ("shared", "distinct", "zeroshot"):
            p.error(f"unknown prompt set {x!r}")
    return args


# -- prompts -----------------------------------------------------------------------


def _rows():
    from tandem.tasks.iris import load_iris

    rows = load_iris()
    random.Random(0).shuffle(rows)
    return rows


def _demo(ex) -> dict:
    pl, pw = float(ex["petal_length"]), float(ex["petal_width"])
    size = "short" if pl < 2.5 else ("medium" if pl < 5.0 else "long")
    reasoning = (
        f"The petals are {ex['petal_length']} cm long and {ex['petal_width']} cm wide, which is {size}"
        f"{' and narrow' if pw < 1.0 else ''}, so this is most likely {ex['species']}."
    )
    return {**{f: ex[f] for f in FEATURES}, "reasoning": reasoning, "species": ex["species"]}


class Prompts:
    """Deterministic request lists for each prompt set (the same in every subprocess)."""

    def __init__(self, lm, max_tokens: int) -> None:
        from tandem.lm.base import SamplingParams
        from tandem.tasks.iris import IrisClassifier

        self.lm = lm
        self.rows = _rows()
        self.pred = IrisClassifier().classify
        self.pred.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        by_species = {s: [r for r in self.rows if r["species"] == s] for s in SPECIES}
        # One demo per species, the order a bootstrap might give.
        self.shared_demos = [_demo(by_species[s][0]) for s in ("versicolor", "setosa", "virginica")]

    def make(self, kind: str, n: int, offset: int, max_tokens: int | None = None) -> list:
        """``n`` requests on the Iris rows from ``offset`` on (wrapping around)."""
        from dataclasses import replace

        rng = random.Random(f"{kind}-{n}-{offset}")
        reqs = []
        for i in range(n):
            inputs = self.rows[(offset + i) % len(self.rows)].inputs()
            if kind == "shared":
                self.pred.demos = self.shared_demos
            elif kind == "distinct":
                # A different first demo on every request (37 is prime to 150).
                first = self.rows[(offset + 37 * i) % len(self.rows)]
                rest = rng.sample([r for r in self.rows if r is not first], 2)
                self.pred.demos = [_demo(r) for r in (first, *rest)]
            else:
                self.pred.demos = []
            req = self.pred.request(inputs, self.lm)
            if max_tokens is not None:
                req = replace(req, params=replace(req.params, max_tokens=max_tokens))
            reqs.append(req)
        self.pred.demos = []
        return reqs


# -- the backend worker (a subprocess) -------------------------------------------------------
#
# The parent starts one worker per backend variant and sends it commands, one
# JSON line each, on a pipe; the worker answers with one JSON line per command
# on another pipe (stdout and stderr stay free for the engines' logs). Both
# vLLM variants run side by side and take turns on every configuration, so that
# load from other jobs on the machine falls on both alike.


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Counters:
    """vLLM's prefix-cache counters (the Prometheus registry of this process)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def hits(self) -> int | None:
        try:
            return int(sum(getattr(m, "value", 0) for m in self.engine.get_metrics()
                           if m.name == "vllm:prefix_cache_hits"))
        except Exception:  # noqa: BLE001 - the counters are a bonus
            return None


class Worker:
    def __init__(self, args) -> None:
        self.args = args
        self.info: dict = {"backend": args.worker, "variant": args.variant, "ld_preload": os.environ.get("LD_PRELOAD", "")}
        self.llm = None
        self.counters = None
        t0 = time.perf_counter()
        if args.worker == "vllm":
            import vllm

            from tandem.lm.vllm import VLLM

            self.info["vllm_version"] = vllm.__version__
            self.lm = VLLM(args.model, kv_cache_gb=args.kv_cache_gb)
            self.lm.start()
            self.info["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_CPU_")}
            self.info["options"] = dict(self.lm.options)
            self.llm = self.lm.engine().engine
            cfg = self.llm.vllm_config
            self.info["engine_config"] = {
                "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
                "max_num_seqs": cfg.scheduler_config.max_num_seqs,
                "block_size": cfg.cache_config.block_size, "dtype": str(cfg.model_config.dtype),
            }
            self.counters = _Counters(self.llm)
        else:
            import torch

            from tandem.lm.hf import HFLM

            if args.hf_threads:
                torch.set_num_threads(args.hf_threads)
            self.lm = HFLM(args.model, batch_size=args.hf_batch_size, dtype=args.hf_dtype)
            self.info.update(dtype=self.lm.dtype, batch_size=self.lm.batch_size, torch_threads=torch.get_num_threads())
        self.info["startup_s"] = time.perf_counter() - t0
        self.prompts = Prompts(self.lm, args.max_tokens)
        t0 = time.perf_counter()
        # Warm-up: each prompt set, a small batch and a single request (oneDNN
        # kernels, vLLM's batch shapes); rows far from the measured ones.
        for kind in args.prompts:
            if args.worker == "vllm":
                self.lm.generate(self.prompts.make(kind, 8, 1000, max_tokens=8))
            self.lm.generate(self.prompts.make(kind, 1, 1100, max_tokens=8 if args.worker == "vllm" else 4))
        self.info["warmup_s"] = time.perf_counter() - t0

    def reset_cache(self) -> bool:
        time.sleep(0.05)  # the engine's loop thread goes idle once the last future is set
        return bool(self.llm.reset_prefix_cache())

    def run(self, cmd: dict) -> dict:
        kind, n, offset = cmd["prompts"], cmd["n"], cmd["offset"]
        max_tokens = cmd.get("max_tokens") or self.args.max_tokens
        cache = cmd.get("cache")  # vLLM: "warm" (reset, then prime the demos) or "cold" (reset)
        if self.llm is not None:
            if not self.reset_cache():
                _log("warning: vLLM refused to reset its prefix cache")
            if cache == "warm":
                # The row before the measured ones: only the common part is reused.
                self.lm.generate(self.prompts.make(kind, 1, offset - 1, max_tokens=1))
        reqs = self.prompts.make(kind, n, offset, max_tokens=max_tokens)
        h0 = self.counters.hits() if self.counters else None
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        outs = self.lm.generate(reqs)
        wall = time.perf_counter() - t0
        h1 = self.counters.hits() if self.counters else None
        p = sum(o.prompt_tokens for o in outs)
        o = sum(o.output_tokens for o in outs)
        return {
            "backend": self.args.worker, "variant": self.args.variant, "prompts": kind, "concurrency": n,
            "cache": cache, "max_tokens": max_tokens, "requests": len(outs),
            "prompt_tokens": p, "output_tokens": o,
            "cached_prompt_tokens": None if h0 is None or h1 is None else h1 - h0,
            "mean_prompt_tokens": p / len(outs), "mean_output_tokens": o / len(outs),
            "wall_s": wall, "prompt_tok_s": p / wall, "output_tok_s": o / wall, "requests_s": len(outs) / wall,
            "loadavg_1m": load,
        }

    def close(self) -> None:
        if self.llm is not None:
            from tandem.lm.vllm import shutdown_engines

            shutdown_engines()


def worker_main(args) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    cmd_in = os.fdopen(args.cmd_fd, "r")
    res_out = os.fdopen(args.res_fd, "w")

    def answer(obj: dict) -> None:
        res_out.write(json.dumps(obj) + "\n")
        res_out.flush()

    try:
        worker = Worker(args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        answer({"error": f"{type(exc).__name__}: {exc}"})
        raise
    answer({"ready": worker.info})
    try:
        for line in cmd_in:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            try:
                answer({"result": worker.run(cmd)})
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                answer({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        worker.close()
        answer({"closed": True})


class WorkerProc:
    """The parent's handle on one worker subprocess."""

    def __init__(self, args, backend: str, variant: str = "plain", env_extra: dict | None = None) -> None:
        self.name = f"{backend}[{variant}]"
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", backend, "--variant", variant,
               "--cmd-fd", str(cmd_r), "--res-fd", str(res_w), "--model", args.model,
               "--prompts", ",".join(args.prompts), "--max-tokens", str(args.max_tokens),
               "--hf-batch-size", str(args.hf_batch_size), "--hf-dtype", args.hf_dtype,
               "--hf-threads", str(args.hf_threads), "--kv-cache-gb", str(args.kv_cache_gb)]
        # Its own session, so that a stuck worker goes down with its engine processes.
        env = dict(os.environ, **(env_extra or {}))
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # not 272 lines of "float32 weights into bf16"
        # The engines' logs go to stderr; stdout keeps the tables.
        self.proc = subprocess.Popen(cmd, env=env, pass_fds=(cmd_r, res_w), stdout=sys.stderr.fileno(),
                                     start_new_session=True)
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self.info: dict = {}

    def _read(self, deadline: float) -> dict:
        import select

        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer in time")
            ready, _, _ = select.select([self._res_r], [], [], left)
            if ready:
                chunk = os.read(self._res_r, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name}: worker exited (code {self.proc.poll()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def ready(self, deadline: float) -> dict:
        msg = self._read(deadline)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}")
        self.info = msg["ready"]
        return self.info

    def run(self, cmd: dict, deadline: float) -> dict:
        os.write(self._cmd_w, (json.dumps({"op": "run", **cmd}) + "\n").encode())
        msg = self._read(deadline)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}")
        return msg["result"]

    def close(self, timeout: float = 60) -> None:
        try:
            os.write(self._cmd_w, b'{"op": "quit"}\n')
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        finally:
            for fd in (self._cmd_w, self._res_r):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# -- parent: machine, matmul, subprocesses, tables ----------------------------------------------


def matmul_tflops(dtype_name: str, n: int = 4096, reps: int = 6) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # oneDNN builds its kernel on the first call
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    flop = 2 * n**3
    return {"n": n, "reps": reps, "threads": torch.get_num_threads(),
            "best_tflops": flop / min(times) / 1e12, "mean_tflops": flop * reps / sum(times) / 1e12}


def param_counts(model: str) -> dict:
    from tandem.lm.models import resolve_model

    cfg = json.loads((resolve_model(model) / "config.json").read_text())
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    attn = h * hd * heads * 2 + h * hd * kv * 2  # q, o; k, v
    return {"body": L * (attn + 3 * h * i), "head": cfg["vocab_size"] * h,
            "layers": L, "attn_width": heads * hd, "tied_embeddings": bool(cfg.get("tie_word_embeddings"))}


def _mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def tuned_preload() -> list[str]:
    libs = []
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        libs.append(str(iomp))
    tc = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4") + glob.glob("/usr/lib/libtcmalloc_minimal.so.4"))
    if tc:
        libs.append(tc[0])
    return libs


def prefill_figures(rows: list[dict], params: dict, peak_bf16: float) -> None:
    for r in rows:
        hits = r.get("cached_prompt_tokens") or 0
        computed = r["prompt_tokens"] - hits
        flop = 2 * params["body"] * computed + 2 * params["head"] * r["requests"]
        # Attention scores and values of the computed tokens: a token at
        # position p reads p keys; cached tokens sit at the front of a prompt.
        t, c = r["mean_prompt_tokens"], hits / r["requests"]
        attn = 2 * 2 * params["layers"] * params["attn_width"] * r["requests"] * (t * t - c * c) / 2
        r.update(
            computed_tokens=computed, computed_tok_s=computed / r["wall_s"],
            effective_tok_s=r["prompt_tokens"] / r["wall_s"],
            tflops=flop / r["wall_s"] / 1e12, fraction_of_bf16_matmul=flop / r["wall_s"] / 1e12 / peak_bf16,
            attention_flop_share=attn / (flop + attn),
        )


def fmt_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _walls(r: dict) -> str:
    w = r.get("walls_s") or [r["wall_s"]]
    if len(w) == 1:
        return f"{r['wall_s']:.1f}"
    return f"{r['wall_s']:.1f} ({min(w):.1f}-{max(w):.1f}, {len(w)})"


def _loads(r: dict) -> str:
    loads = r.get("loads") or [r["loadavg_1m"]]
    return f"{min(loads):.1f}" if min(loads) == max(loads) else f"{min(loads):.1f}-{max(loads):.1f}"


def report(results: dict) -> str:
    m, mm = results["machine"], results["matmul"]
    start = mm["start"]["bfloat16"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['torch']}, {m['vllm']}, "
        f"{m['transformers']}; {m['date']}",
        f"Load average (1, 5, 15 min) at start {[round(x, 1) for x in m['loadavg_at_start']]}, "
        f"at end {[round(x, 1) for x in m.get('loadavg_at_end', [])]}",
        "matmul " + ", ".join(f"{k}: bf16 {v['bfloat16']['best_tflops']:.2f} / fp32 {v['float32']['best_tflops']:.2f}"
                              for k, v in mm.items() if k != "peak")
        + f" TFLOP/s (best call, {start['n']}x{start['n']}, {start['threads']} threads)",
        f"vLLM CPU env: {results.get('vllm_cpu_env')}", "",
    ]
    rows = []
    for r in results["runs"]:
        cached = "-" if r["cached_prompt_tokens"] is None else f"{r['cached_prompt_tokens'] / r['prompt_tokens']:.0%}"
        rows.append([r["backend"], r["variant"], r["prompts"], r["concurrency"], f"{r['mean_prompt_tokens']:.0f}",
                     f"{r['mean_output_tokens']:.0f}", cached, _walls(r), f"{r['prompt_tok_s']:.0f}",
                     f"{r['output_tok_s']:.0f}", f"{r['requests_s']:.2f}", _loads(r)])
    lines.append(fmt_table(["backend", "variant", "prompts", "concurrent", "prompt tok/req", "output tok/req",
                            "cached", "wall s: best (range, runs)", "prompt tok/s", "output tok/s", "req/s", "load"], rows))
    if results.get("prefill"):
        lines += ["", f"Prefill: max_tokens=1; FLOPs = 2 x {results['params']['body'] / 1e6:.1f}M non-embedding params "
                  f"x computed tokens (+ head per request); % of the peak bf16 matmul "
                  f"({mm['peak']['bfloat16']:.2f} TFLOP/s)", ""]
        rows = [[r["variant"], r["prompts"], r["cache"], r["requests"], r["prompt_tokens"], r["cached_prompt_tokens"],
                 _walls(r), f"{r['effective_tok_s']:.0f}", f"{r['computed_tok_s']:.0f}",
                 f"{r['tflops']:.3f}", f"{r['fraction_of_bf16_matmul']:.0%}", _loads(r)]
                for r in results["prefill"]]
        lines.append(fmt_table(["variant", "prompts", "cache", "requests", "prompt tok", "cached tok", "wall s: best (range, runs)",
                                "effective tok/s", "computed tok/s", "TFLOP/s", "of bf16 matmul", "load"], rows))
    if results.get("tuning"):
        how = ("engines side by side, each pair back to back" if results.get("engines_side_by_side")
               else "engines one after the other: the pairs ran minutes apart")
        lines += ["", f"vLLM tuned (LD_PRELOAD={results['tuning']['ld_preload']}) / plain speed "
                  f"(plain wall / tuned wall; {how}):", ""]
        rows = [[t["config"], f"{t['ratio_best']:.2f}", " ".join(f"{x:.2f}" for x in t["ratios_per_round"])]
                for t in results["tuning"]["ratios"]]
        lines.append(fmt_table(["configuration", "best / best", "per round"], rows))
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(results["errors"])]
    return "\n".join(lines)


def plan(args) -> tuple[list, list, list]:
    """(vLLM runs, vLLM prefill runs, HF runs): (command, variants) pairs."""
    offset = 0

    def cmd(kind, n, cache=None, max_tokens=None):
        nonlocal offset
        c = {"prompts": kind, "n": n, "offset": offset, "cache": cache, "max_tokens": max_tokens}
        offset += n + 1
        return c

    tuned = args.tuning != "none"
    vllm_runs, prefill, hf_runs = [], [], []
    for n in args.sizes:
        for kind in args.prompts:
            variants = ["plain"]
            if tuned and n in args.tuned_sizes and (kind == "shared" or not args.quick):
                variants.append("tuned")
            # Shared demos / zero-shot system message cached, as in an evaluation; distinct: nothing.
            vllm_runs.append((cmd(kind, n, "cold" if kind == "distinct" else "warm"), variants))
    if args.prefill_size:
        cases = [("shared", "warm"), ("shared", "cold"), ("distinct", "cold")]
        if args.quick:
            cases.remove(("shared", "cold"))
        for kind, cache in cases:
            if kind in args.prompts or kind == "shared":
                prefill.append((cmd(kind, args.prefill_size, cache, 1), ["plain", "tuned"] if tuned else ["plain"]))
    for n in args.sizes:
        if n > min(args.hf_max_size, 8 if args.quick else args.hf_max_size):
            continue
        for kind in args.prompts[:1] if args.quick or n > 8 else args.prompts:
            hf_runs.append((cmd(kind, n), ["plain"]))
    return vllm_runs, prefill, hf_runs


def _fmt_run(r: dict) -> str:
    cached = "" if r["cached_prompt_tokens"] is None else f", cached {r['cached_prompt_tokens']}"
    return (f"{r['backend']}[{r['variant']}] {r['prompts']} x{r['concurrency']} max_tokens={r['max_tokens']}: "
            f"{r['wall_s']:.1f}s, prompt {r['prompt_tok_s']:.0f} tok/s, output {r['output_tok_s']:.0f} tok/s{cached}")


def run_section(args, results: dict, workers: dict, steps: list, section: str, deadline: float,
                repeat: int = 1) -> None:
    """Run ``steps`` ``repeat`` times on ``workers`` (variant -> WorkerProc).

    Variants take turns on each step (the first to go alternates), so a
    plain/tuned pair runs back to back under about the same load; the rounds
    spread each configuration's samples over the run.
    """
    for rep in range(repeat):
        for k, (c, variants) in enumerate(steps):
            order = [v for v in variants if v in workers]
            if (k + rep) % 2:
                order.reverse()
            for v in order:
                w = workers[v]
                try:
                    r = w.run(c, min(deadline, time.monotonic() + args.step_timeout))
                except Exception as exc:  # noqa: BLE001 - record it, go on without this worker
                    results["errors"].append(f"{w.name}: {exc}")
                    _log(f"{w.name}: {exc}")
                    w.kill()
                    del workers[v]
                    continue
                r.update(section=section, rep=rep, step=k)
                results["samples"].append(r)
                _log(_fmt_run(r))
                args.out.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive a crash


def summarize(samples: list[dict], section: str) -> list[dict]:
    """One row per configuration: its fastest sample (other jobs on the machine
    only ever slow a run down), with every sample's wall time and load beside it."""
    groups: dict = {}
    for r in samples:
        if r["section"] == section:
            key = (r["backend"], r["variant"], r["prompts"], r["concurrency"], r["cache"], r["max_tokens"])
            groups.setdefault(key, []).append(r)
    out = []
    for rows in groups.values():
        walls = sorted(r["wall_s"] for r in rows)
        best = dict(min(rows, key=lambda r: r["wall_s"]))
        best.update(samples=len(rows), walls_s=[r["wall_s"] for r in rows], loads=[r["loadavg_1m"] for r in rows],
                    median_wall_s=walls[(len(walls) - 1) // 2] if len(walls) % 2 else sum(walls[len(walls) // 2 - 1:len(walls) // 2 + 1]) / 2)
        for x in ("rep", "step", "section"):
            best.pop(x, None)
        out.append(best)
    return out


def tuning_ratios(samples: list[dict]) -> list[dict]:
    """tuned / plain speed (plain wall / tuned wall) of each configuration: best
    against best, and per round (side by side, a round's pair ran back to back)."""
    pairs: dict = {}
    for r in samples:
        if r["backend"] == "vllm":
            pairs.setdefault((r["section"], r["step"]), {}).setdefault(r["variant"], {})[r["rep"]] = r
    out = []
    for (section, _), by_variant in sorted(pairs.items()):
        plain, tuned = by_variant.get("plain"), by_variant.get("tuned")
        if not plain or not tuned:
            continue
        p0 = next(iter(plain.values()))
        label = f"{'prefill ' if section == 'prefill' else ''}{p0['prompts']} x{p0['concurrency']} {p0['cache'] or ''}"
        best = min(r["wall_s"] for r in plain.values()) / min(r["wall_s"] for r in tuned.values())
        rounds = [plain[k]["wall_s"] / tuned[k]["wall_s"] for k in sorted(plain) if k in tuned]
        out.append({"config": " ".join(label.split()), "ratio_best": best, "ratios_per_round": rounds})
    return out


def start_workers(args, results: dict, backend: str, variants: dict, deadline: float) -> dict:
    procs = {v: WorkerProc(args, backend, v, env) for v, env in variants.items()}
    ready = {}
    for v, w in procs.items():
        try:
            info = w.ready(deadline)
        except Exception as exc:  # noqa: BLE001
            results["errors"].append(f"{w.name} did not start: {exc}")
            _log(f"{w.name} did not start: {exc}")
            w.kill()
            continue
        results["workers"][w.name] = info
        _log(f"{w.name} up: start {info['startup_s']:.0f}s, warm-up {info['warmup_s']:.0f}s, "
             f"LD_PRELOAD={info.get('ld_preload')!r}")
        ready[v] = w
    return ready


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.worker:
        worker_main(args)
        return

    t_start = time.perf_counter()
    deadline = time.monotonic() + args.timeout
    cmdline = sys.argv[1:] if argv is None else argv
    results: dict = {
        "command": " ".join(["python benchmarks/inference.py", *cmdline]),
        "model": args.model, "max_tokens": args.max_tokens, "sizes": args.sizes, "prompts": args.prompts,
        "hf_max_size": args.hf_max_size, "machine": machine_info(), "matmul": {}, "workers": {},
        "repeat": args.repeat, "samples": [], "errors": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _log("matmul rates")
    results["matmul"]["start"] = {d: matmul_tflops(d, reps=8 if d == "bfloat16" else 3) for d in ("bfloat16", "float32")}
    results["params"] = param_counts(args.model)
    vllm_runs, prefill, hf_runs = plan(args)

    if "vllm" in args.backends:
        variants = {"plain": {}}
        if args.tuning == "combined":
            libs = tuned_preload()
            if libs:
                variants["tuned"] = {"LD_PRELOAD": ":".join(libs)}
            else:
                results["errors"].append("tuning skipped: neither libiomp5.so nor libtcmalloc_minimal.so.4 found")
        # Side by side, the two engines take turns on each configuration, so a
        # burst of load from other jobs falls on both; each needs about 4 GB.
        together = args.together == "yes" or (args.together == "auto" and _mem_available_gib() >= 12)
        results["engines_side_by_side"] = together and len(variants) > 1
        for group in ([variants] if together else [{v: e} for v, e in variants.items()]):
            workers = start_workers(args, results, "vllm", group, deadline)
            try:
                run_section(args, results, workers, vllm_runs, "runs", deadline, args.repeat)
                run_section(args, results, workers, prefill, "prefill", deadline, args.repeat)
            finally:
                for w in workers.values():
                    w.close()
        results["matmul"]["after_vllm"] = {d: matmul_tflops(d, reps=8 if d == "bfloat16" else 3)
                                           for d in ("bfloat16", "float32")}
    if "hf" in args.backends and hf_runs:
        workers = start_workers(args, results, "hf", {"plain": {}}, deadline)
        try:
            run_section(args, results, workers, hf_runs, "runs", deadline)
        finally:
            for w in workers.values():
                w.close()

    samples = list(results["matmul"].values())
    results["matmul"]["peak"] = {d: max(s[d]["best_tflops"] for s in samples) for d in ("bfloat16", "float32")}
    results["runs"] = summarize(results["samples"], "runs")
    results["prefill"] = summarize(results["samples"], "prefill")
    prefill_figures(results["prefill"], results["params"], results["matmul"]["peak"]["bfloat16"])
    plain = results["workers"].get("vllm[plain]", {})
    results["vllm_cpu_env"] = plain.get("env", {})
    if any(r["variant"] == "tuned" for r in results["samples"]):
        results["tuning"] = {"ld_preload": results["workers"].get("vllm[tuned]", {}).get("ld_preload"),
                             "ratios": tuning_ratios(results["samples"])}
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["total_wall_s"] = time.perf_counter() - t_start
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))
    print(f"\n{results['total_wall_s']:.0f} s in all; JSON: {args.out}")


if __name__ == "__main__":
    main()
