"""The DSPy side of benchmarks/vs_dspy (runs in benchmarks/vs_dspy/.venv; run.py starts it).

    prompt:   dspy.BootstrapFewShotWithRandomSearch on the same 15 / 35 split, against
              vLLM's OpenAI-compatible server of the same checkpoint; then the chosen
              program on the 35 and on dev (50).
    finetune: dspy.BootstrapFinetune against the same server LM (and with DSPy's own
              LocalProvider), recording what happens.

The program mirrors tandem's IrisClassifier: one ChainOfThought module, the four
measurements in, the species (one of three) out, the same instructions; the
metric is the same exact match on the species. Decoding as tandem's: greedy,
at most 128 new tokens. Each writes one JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Literal

import dspy

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
SPECIES = ("setosa", "versicolor", "virginica")
COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
            "vllm:prefix_cache_hits", "vllm:prefix_cache_queries")


class ClassifyIris(dspy.Signature):
    """Classify the iris flower from its measurements (in cm). The species is one of: setosa, versicolor, virginica."""

    sepal_length: str = dspy.InputField()
    sepal_width: str = dspy.InputField()
    petal_length: str = dspy.InputField()
    petal_width: str = dspy.InputField()
    species: Literal["setosa", "versicolor", "virginica"] = dspy.OutputField()


class Iris(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.ChainOfThought(ClassifyIris)

    def forward(self, **measurements):
        return self.classify(**measurements)


def _species(raw: str) -> str:
    return raw.strip().lower().removeprefix("iris-").removeprefix("iris ")


def iris_metric(example, prediction, trace=None) -> bool:
    """tandem.tasks.iris.iris_metric: exact species, ignoring case, punctuation and an 'Iris-' prefix."""
    got = re.sub(r"[^a-z ]", "", _species(str(getattr(prediction, "species", "") or "")))
    return got.strip() == example.species


def examples(rows: list[dict]) -> list[dspy.Example]:
    return [dspy.Example(**r).with_inputs(*FEATURES) for r in rows]


def server_counters(metrics_url: str) -> dict:
    """vLLM's prometheus counters from the server's /metrics (summed over label sets)."""
    import requests

    text = requests.get(metrics_url, timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-z_:]+?)(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m and m.group(1) in COUNTERS:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def diff(after: dict, before: dict) -> dict:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0)) for k in sorted(set(after) | set(before))}


def make_lm(args) -> dspy.LM:
    return dspy.LM(
        "openai/smollm2-135m", api_base=args.api_base, api_key="local",
        cache=False, temperature=0.0, max_tokens=128,
    )


def lm_usage(history: list[dict]) -> dict:
    calls = len(history)
    prompt = sum(int((h.get("usage") or {}).get("prompt_tokens") or 0) for h in history)
    output = sum(int((h.get("usage") or {}).get("completion_tokens") or 0) for h in history)
    return {"calls": calls, "prompt_tokens": prompt, "output_tokens": output}


def demos_of(program) -> list[int]:
    return [len(p.demos) for p in program.predictors()]


def evaluate(program, data, threads, max_errors) -> dict:
    ev = dspy.Evaluate(devset=data, metric=iris_metric, num_threads=threads, max_errors=max_errors,
                       display_progress=False, display_table=False)
    res = ev(program)
    # res.results: (example, prediction, score) per example, in the dev set's order.
    return {"score": round(float(res.score), 2), "n": len(data),
            "outcomes": [float(score or 0.0) for _, _, score in res.results]}


def phase_timer() -> list[dict]:
    """Time each bootstrap and each candidate evaluation inside the random search (measurement only).

    Wraps the BootstrapFewShot.compile and Evaluate.__call__ that random_search.py calls;
    they behave exactly as before. Returns the list the records go into.
    """
    from dspy.teleprompt import random_search

    phases: list[dict] = []

    def wrap(cls, name, kind):
        orig = getattr(cls, name)

        def timed(self, *a, **kw):
            lm = dspy.settings.lm
            n0, t0 = len(lm.history), time.perf_counter()
            try:
                return orig(self, *a, **kw)
            finally:
                phases.append({"kind": kind, "wall_s": round(time.perf_counter() - t0, 2),
                               "lm_calls": len(lm.history) - n0})
        return timed

    random_search.BootstrapFewShot = type("BootstrapFewShot", (random_search.BootstrapFewShot,), {})
    random_search.BootstrapFewShot.compile = wrap(random_search.BootstrapFewShot, "compile", "bootstrap")
    random_search.Evaluate = type("Evaluate", (random_search.Evaluate,), {})
    random_search.Evaluate.__call__ = wrap(random_search.Evaluate, "__call__", "evaluate candidate")
    return phases


def reset_prefix_cache(metrics_url: str) -> bool:
    """Empty the server's prefix cache (vLLM's dev endpoint; run.py starts the server with it on)."""
    import requests

    base = metrics_url.rsplit("/metrics", 1)[0]
    for _ in range(20):
        r = requests.post(f"{base}/reset_prefix_cache", timeout=30)
        if r.status_code == 200 and "false" not in r.text.lower():
            return True
        time.sleep(0.2)
    return False


def one_round(args, train, val, dev, phases: list, seed: int = 0) -> dict:
    lm = make_lm(args)  # a fresh LM each round: its own history
    dspy.configure(lm=lm)
    opt = dspy.BootstrapFewShotWithRandomSearch(
        metric=iris_metric,
        max_bootstrapped_demos=3,  # the paper: at most 3 demos per module
        max_labeled_demos=3,       # ... in total (DSPy's default 16 would put up to 16 demos in each prompt)
        num_candidate_programs=6,  # the paper's 6 candidate programs
        num_threads=args.threads,
        max_errors=args.max_errors,
    )
    phases.clear()
    reset = reset_prefix_cache(args.metrics_url)
    before, load = server_counters(args.metrics_url), os.getloadavg()[0]
    t0 = time.perf_counter()
    if seed:  # another draw of the same search: DSPy's candidates depend on the training set's order
        train = list(train)
        random.Random(seed).shuffle(train)
    best = opt.compile(Iris(), trainset=train, valset=val)
    step_s = time.perf_counter() - t0
    step_server = diff(server_counters(args.metrics_url), before)
    step_usage = lm_usage(lm.history)
    n_hist = len(lm.history)
    candidates = [
        {"seed": c["seed"], "kind": {-3: "zero-shot", -2: "labeled", -1: "bootstrapped (unshuffled)"}.get(
            c["seed"], f"random seed {c['seed']}"), "score": round(float(c["score"]), 2),
         "demos": demos_of(c["program"])}
        for c in sorted(best.candidate_programs, key=lambda c: c["seed"])
    ]
    t0 = time.perf_counter()
    val_eval = evaluate(best, val, args.threads, args.max_errors)
    dev_eval = evaluate(best, dev, args.threads, args.max_errors)
    return {
        "step_wall_s": round(step_s, 2), "usage": step_usage, "server_counters": step_server,
        "val_acc": val_eval["score"], "val_acc_in_search": max(c["score"] for c in candidates),
        "dev_acc": dev_eval["score"], "dev_outcomes": dev_eval["outcomes"], "eval_wall_s": round(time.perf_counter() - t0, 2),
        "eval_usage": lm_usage(lm.history[n_hist:]),
        "candidates": candidates, "candidates_evaluated": len(candidates),
        "phases": list(phases),
        "phase_totals": {k: {"wall_s": round(sum(p["wall_s"] for p in phases if p["kind"] == k), 2),
                             "lm_calls": sum(p["lm_calls"] for p in phases if p["kind"] == k),
                             "count": sum(1 for p in phases if p["kind"] == k)}
                         for k in ("bootstrap", "evaluate candidate")},
        "demos": demos_of(best),
        "chosen_demos": [{k: str(v)[:300] for k, v in d.toDict().items()}
                         for p in best.predictors() for d in p.demos],
        "prefix_cache_reset": reset, "load_1min_at_start": round(load, 2), "search_seed": seed,
    }


def prompt_step(args) -> dict:
    data = json.loads(Path(args.data).read_text())
    train, val, dev = (examples(data[k]) for k in ("prompt_train", "prompt_val", "dev"))
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    phases = phase_timer()
    rounds = []
    seeds = [int(x) for x in args.search_seeds.split(",")]
    for r, seed in [(r, s) for s in seeds for r in range(args.rounds)]:
        rounds.append(one_round(args, train, val, dev, phases, seed))
        x = rounds[-1]
        if args.partial:  # every finished round on disk at once (a JSON line each): a killed run keeps them
            with open(args.partial, "a") as fh:
                fh.write(json.dumps(x) + "\n")
        print(f"seed {seed} round {r + 1}: {x['step_wall_s']:.1f} s, val {x['val_acc']:.1f}, dev {x['dev_acc']:.1f}", flush=True)
    best = min(rounds, key=lambda r: r["step_wall_s"])  # load only ever slows a round down
    walls = sorted(r["step_wall_s"] for r in rounds)
    return {
        **{k: best[k] for k in ("step_wall_s", "usage", "server_counters", "candidates", "candidates_evaluated",
                                "phase_totals", "demos")},
        "step_wall_s_all": [r["step_wall_s"] for r in rounds], "step_wall_s_median": walls[len(walls) // 2],
        "val_acc": round(sum(r["val_acc"] for r in rounds) / len(rounds), 2),
        "dev_acc": round(sum(r["dev_acc"] for r in rounds) / len(rounds), 2),
        "val_acc_all": [r["val_acc"] for r in rounds], "dev_acc_all": [r["dev_acc"] for r in rounds],
        "rounds": rounds,
        "settings": {"num_candidate_programs": 6, "max_bootstrapped_demos": 3, "max_labeled_demos": 3,
                     "max_rounds": 1, "num_threads": args.threads, "max_errors": args.max_errors,
                     "adapter": type(dspy.settings.adapter or dspy.ChatAdapter()).__name__,
                     "lm": {"model": "openai/smollm2-135m", "temperature": 0.0, "max_tokens": 128, "cache": False},
                     "dspy": dspy.__version__},
    }


def describe(exc: BaseException) -> dict:
    """The error, the chain of errors behind it, and where it was raised."""
    chain, e = [], exc
    while e is not None:
        chain.append(f"{type(e).__module__}.{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    tb = "".join(traceback.format_exception(exc)).splitlines()
    return {"error": f"{type(exc).__name__}: {exc}", "error_chain": chain, "traceback_tail": tb[-12:]}


def finetune(args) -> dict:
    """dspy.BootstrapFinetune against the server LM, as-is and with DSPy's LocalProvider."""
    from dspy.clients.lm_local import LocalProvider

    data = json.loads(Path(args.data).read_text())
    train = examples(data["prompt_train"])
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    out = {}
    attempts = {
        # The server LM exactly as the prompt step used it (provider inferred from "openai/").
        "server_lm": lambda: make_lm(args),
        # DSPy's own local fine-tuning path (TRL), pointed at the same checkpoint.
        "local_provider": lambda: dspy.LM(
            "openai/smollm2-135m", api_base=args.api_base, api_key="local", cache=False, temperature=0.0,
            max_tokens=128, provider=LocalProvider(), finetuning_model=args.model_dir,
            train_kwargs={"use_peft": True, "num_train_epochs": 5, "per_device_train_batch_size": 8,
                          "gradient_accumulation_steps": 1, "learning_rate": 3e-4, "bf16": True},
        ),
    }
    for name, make in attempts.items():
        lm = make()
        dspy.configure(lm=lm)
        student = Iris()
        student.set_lm(lm)
        t0 = time.perf_counter()
        try:
            dspy.BootstrapFinetune(metric=iris_metric, num_threads=args.threads).compile(student, trainset=train)
            out[name] = {"ok": True, "wall_s": round(time.perf_counter() - t0, 2)}
        except BaseException as exc:  # noqa: BLE001 - recording what DSPy raises is the point
            out[name] = {"ok": False, "wall_s": round(time.perf_counter() - t0, 2),
                         "provider": type(lm.provider).__name__, **describe(exc)}
    # LocalProvider's trainer itself, called as BootstrapFinetune calls it after lm.kill()
    # (which needs sglang, above): does DSPy's own local TRL path train on this machine?
    from dspy.clients.utils_finetune import TrainDataFormat

    lm = attempts["local_provider"]()
    sysmsg = ClassifyIris.instructions
    chat = [{"messages": [
        {"role": "system", "content": sysmsg},
        {"role": "user", "content": "\n\n".join(f"[[ ## {k} ## ]]\n{r[k]}" for k in FEATURES)},
        {"role": "assistant", "content": f"[[ ## reasoning ## ]]\nThe measurements match {r['species']}.\n\n"
                                          f"[[ ## species ## ]]\n{r['species']}\n\n[[ ## completed ## ]]"},
    ]} for r in data["prompt_train"]]
    t0 = time.perf_counter()
    try:
        job = lm.finetune(train_data=chat, train_data_format=TrainDataFormat.CHAT)
        result = job.result()
        job.thread.join()
        if isinstance(result, Exception):
            raise result
        out["local_provider_trainer"] = {"ok": True, "wall_s": round(time.perf_counter() - t0, 2)}
    except BaseException as exc:  # noqa: BLE001
        out["local_provider_trainer"] = {
            "ok": False, "wall_s": round(time.perf_counter() - t0, 2), "provider": type(lm.provider).__name__,
            **describe(exc)}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["prompt", "finetune"])
    p.add_argument("--data", required=True)
    p.add_argument("--api-base", required=True)
    p.add_argument("--metrics-url", required=True)
    p.add_argument("--model-dir", default="")
    p.add_argument("--threads", type=int, default=24)
    p.add_argument("--max-errors", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--search-seeds", default="0")
    p.add_argument("--partial", default=None, help="prompt: append each finished round here as a JSON line")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = prompt_step(args) if args.what == "prompt" else finetune(args)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
