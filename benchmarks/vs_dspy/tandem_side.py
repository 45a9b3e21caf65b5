"""The tandem side of benchmarks/vs_dspy (runs in tandem's own .venv; run.py starts it).

    prompt: the prompt step ``p`` as a user runs it (in-process vLLM engine,
            TANDEM_CACHE=0): RandomSearch (6 candidates, at most 3 demos) on the
            15 / 35 split; then the chosen program on the 35 and on dev (50), and
            SFT examples for the weight step from a bootstrap of the chosen
            program on the 50 training examples (what ``p -> w`` trains on).
    train:  tandem.train.lora.train_lora with LoRAConfig() on those SFT examples.

Each writes one JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tandem.program.example import Example  # noqa: E402

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def examples(rows: list[dict]) -> list[Example]:
    return [Example(r).with_inputs(*FEATURES) for r in rows]


def engine_counters() -> dict:
    """vLLM's own counters of the in-process engine (the same names as the server's /metrics)."""
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    out: dict[str, float] = {}
    for m in get_metrics_snapshot():
        if isinstance(m, Counter) and m.name in (
            "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
            "vllm:prefix_cache_hits", "vllm:prefix_cache_queries",
        ):
            key = m.name.removesuffix("_total")
            out[key] = out.get(key, 0.0) + m.value
    return out


def diff(after: dict, before: dict) -> dict:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0)) for k in sorted(set(after) | set(before))}


def time_bootstrap(rs) -> dict:
    """Make ``rs`` (a RandomSearch) record its bootstrap's seconds in the returned dict (measurement only)."""
    phases: dict = {}
    run_bootstrap = rs.fewshot.run_bootstrap

    def timed(*a, **kw):  # the same call, timed
        t = time.perf_counter()
        try:
            return run_bootstrap(*a, **kw)
        finally:
            phases["bootstrap_s"] = round(time.perf_counter() - t, 2)

    rs.fewshot.run_bootstrap = timed
    return phases


def prompt_step(args) -> dict:
    assert os.environ.get("TANDEM_CACHE") == "0", "run with TANDEM_CACHE=0 (run.py does)"
    from tandem.evaluate import evaluate
    from tandem.lm.registry import get_lm
    from tandem.optimize import RandomSearch
    from tandem.tasks.iris import IrisClassifier, iris_metric

    data = json.loads(Path(args.data).read_text())
    train, val, dev = (examples(data[k]) for k in ("prompt_train", "prompt_val", "dev"))

    t0 = time.perf_counter()
    lm = get_lm("smollm2-135m")  # the in-process vLLM engine; no call cache (TANDEM_CACHE=0)
    lm.start()
    load_s = time.perf_counter() - t0
    program = IrisClassifier().set_lm(lm)
    if args.format:
        program.set_format(args.format)

    rounds = []
    seeds = [int(x) for x in args.search_seeds.split(",")]
    for r, seed in [(r, s) for s in seeds for r in range(args.rounds)]:
        # Each round starts from an empty prefix cache, as the first did (the server side does the same).
        time.sleep(0.1)  # the engine's loop thread goes idle once the last future is set
        lm.engine().engine.reset_prefix_cache()
        rs = RandomSearch(iris_metric)  # defaults: 9 candidates (the paper's 6 random + 3 fixed), at most 3 demos
        phases = time_bootstrap(rs)
        before, load = engine_counters(), os.getloadavg()[0]
        t0 = time.perf_counter()
        result = rs.compile(program, trainset=train, valset=val, seed=seed)
        step_s = time.perf_counter() - t0
        step_engine = diff(engine_counters(), before)
        phases["candidates_s"] = round(step_s - phases.get("bootstrap_s", 0.0), 2)
        rec = result.history[-1]
        chosen = result.program
        t0 = time.perf_counter()
        val_eval = evaluate(chosen, val, iris_metric)
        dev_eval = evaluate(chosen, dev, iris_metric)
        rounds.append({
            "step_wall_s": round(step_s, 2), "phases": phases, "usage": rec.usage, "engine_counters": step_engine,
            "val_acc": round(val_eval.score, 2), "val_acc_in_search": round(result.score, 2),
            "dev_acc": round(dev_eval.score, 2), "dev_outcomes": [r.score for r in dev_eval.records],
            "val_failures": val_eval.failures,
            "dev_failures": dev_eval.failures, "eval_wall_s": round(time.perf_counter() - t0, 2),
            "candidates": rec.extra.get("candidates"), "chosen": rec.detail,
            "bootstrap_passed": rec.extra.get("bootstrap_passed"),
            "demos": [len(p.demos) for p in chosen.predictors()],
            "chosen_demos": [{k: str(v)[:300] for k, v in d.items()} for p in chosen.predictors() for d in p.demos],
            "load_1min_at_start": round(load, 2), "search_seed": seed,
        })
        if len(rounds) == 1:
            first = chosen
        if args.partial:  # every finished round on disk at once (a JSON line each): a killed run keeps them
            with open(args.partial, "a") as fh:
                fh.write(json.dumps(rounds[-1]) + "\n")
        print(f"seed {seed} round {r + 1}: {step_s:.1f} s, val {val_eval.score:.1f}, dev {dev_eval.score:.1f}", flush=True)

    sft_info = sft_data(args, first) if args.sft else None
    return {
        "model_load_s": round(load_s, 2),
        **summarize(rounds),
        "rounds": rounds,
        "sft": sft_info,
        "settings": {"num_candidates": rs.num_candidates, "max_demos": rs.max_demos,
                     "num_threads": rs.num_threads, "attempts": rs.fewshot.attempts,
                     "engine": {k: str(v) for k, v in lm.options.items()},
                     "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                     "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")},
    }


def sft_data(args, first) -> dict:
    """SFT data for the weight-step comparison: what the ``w`` of ``p -> w`` trains on
    (round 1's chosen program's passing runs on all 50 training examples, zero-shot prompts)."""
    from tandem.optimize.bootstrap import bootstrap
    from tandem.optimize.finetune import BootstrapFinetune
    from tandem.tasks.iris import iris_metric

    train50 = examples(json.loads(Path(args.data).read_text())["train"])
    t0 = time.perf_counter()
    ft = BootstrapFinetune(iris_metric)
    boot = bootstrap(first, train50, iris_metric, attempts=ft.attempts)
    groups = ft.sft_examples(first, boot.passed)
    sft = [e for g in groups.values() for e in g]
    with open(args.sft, "w") as fh:
        for e in sft:
            fh.write(json.dumps({"prompt": e.prompt, "completion": e.completion, "module": e.module}) + "\n")
    return {"examples": len(sft), "from_passing_runs": len(boot.passed), "of": len(train50),
            "program": "round 1's chosen program", "wall_s": round(time.perf_counter() - t0, 2)}


def summarize(rounds: list[dict]) -> dict:
    """The fastest round's time, usage and counters (load only ever slows a round down), and every round's accuracy."""
    best = min(rounds, key=lambda r: r["step_wall_s"])
    walls = sorted(r["step_wall_s"] for r in rounds)
    return {
        "step_wall_s": best["step_wall_s"], "step_wall_s_all": [r["step_wall_s"] for r in rounds],
        "step_wall_s_median": walls[len(walls) // 2], "phases": best["phases"], "usage": best["usage"],
        "engine_counters": best["engine_counters"],
        "val_acc": round(sum(r["val_acc"] for r in rounds) / len(rounds), 2),
        "dev_acc": round(sum(r["dev_acc"] for r in rounds) / len(rounds), 2),
        "val_acc_all": [r["val_acc"] for r in rounds], "dev_acc_all": [r["dev_acc"] for r in rounds],
    }


def train(args) -> dict:
    import torch

    from tandem.lm.models import ensure_model
    from tandem.train import LoRAConfig, SFTExample, train_lora

    torch.set_num_threads(args.threads or torch.get_num_threads())
    rows = [json.loads(line) for line in open(args.sft)]
    sft = [SFTExample(r["prompt"], r["completion"], r.get("module", "")) for r in rows]
    cfg = LoRAConfig(method="lora")  # a LoRA on both sides
    t0 = time.perf_counter()
    res = train_lora(ensure_model("smollm2-135m"), sft, cfg, args.adapter_dir, overwrite=True)
    total_s = time.perf_counter() - t0
    steps_per_epoch = -(-res.n_examples // cfg.batch_size)
    return {
        "trainer": "tandem.train.lora.train_lora",
        "examples": res.n_examples, "steps": res.steps, "wall_s": round(res.wall_s, 2),
        "total_s_incl_load_save": round(total_s, 2),
        "tokens": res.total_tokens, "completion_tokens": res.completion_tokens,
        "tokens_per_s": round(res.tokens_per_s, 1),
        "final_loss": round(res.losses[-1], 4),
        "last_epoch_mean_loss": round(sum(res.losses[-steps_per_epoch:]) / steps_per_epoch, 4),
        "first_loss": round(res.losses[0], 4),
        "losses": [round(x, 4) for x in res.losses],
        "bf16": res.bf16, "attention": res.attention, "trainable_params": res.trainable_params,
        "torch_threads": torch.get_num_threads(),
        "config": cfg.to_dict(),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["prompt", "train"])
    p.add_argument("--data")
    p.add_argument("--sft", default=None, help="write the weight step's SFT examples here (prompt: none if unset)")
    p.add_argument("--partial", default=None, help="prompt: append each finished round here as a JSON line")
    p.add_argument("--out", required=True)
    p.add_argument("--adapter-dir")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--search-seeds", default="0")
    p.add_argument("--format", default=None, help="the program's prompt format (default: tandem's default)")
    args = p.parse_args()
    out = prompt_step(args) if args.what == "prompt" else train(args)
    Path(args.out).write_text(json.dumps(out, indent=1))
    if args.what == "prompt":
        from tandem.lm.vllm import shutdown_engines

        shutdown_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
