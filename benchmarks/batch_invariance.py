"""Do greedy replies depend on the prefix cache or on the batch? Same prompts, one engine, call cache off.

    flock /tmp/tandem-heavy.lock .venv/bin/python benchmarks/batch_invariance.py

40 Iris prompts (a ~100-token system prompt shared by all, then one flower's
measurements), greedy, 64 tokens each, on the in-process vLLM engine of the
embedded model, six ways: one at a time from an empty prefix cache, again
from the warm cache, again from an empty one; all 40 at once (one
``generate``) from an empty cache, twice, then from the warm cache. Prints
how many replies differ from the first way and writes
``benchmarks/results/batch_invariance.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from machine import write_result  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
PREFIX = ("Classify the iris flower: setosa, versicolor or virginica. Think step by step about the sepal and "
          "petal measurements, compare them with what you know of each species, then answer. ") * 3


def main() -> int:
    from tandem.lm import Request, SamplingParams
    from tandem.lm.vllm import VLLM, shutdown_engines
    from tandem.tasks.iris import load_iris, split_iris

    lm = VLLM("smollm2-135m")
    lm.start()
    rows = split_iris(load_iris(), seed=0)["train"][:40]

    def prompt(ex) -> str:
        q = ", ".join(f"{k}: {ex[k]}" for k in ("sepal_length", "sepal_width", "petal_length", "petal_width"))
        return f"<|im_start|>system\n{PREFIX}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"

    reqs = [Request(prompt(ex), SamplingParams(max_tokens=64)) for ex in rows]

    def one_at_a_time() -> list[str]:
        return [lm.complete(r).text for r in reqs]

    def together() -> list[str]:
        return [c.text for c in lm.generate(reqs)]

    ways = [("one at a time, empty cache", True, one_at_a_time), ("one at a time, warm cache", False, one_at_a_time),
            ("one at a time, empty cache again", True, one_at_a_time), ("40 at once, empty cache", True, together),
            ("40 at once, empty cache again", True, together), ("40 at once, warm cache", False, together)]
    out = {}
    for name, cold, fn in ways:
        if cold:
            lm.engine().reset_prefix_cache()
        out[name] = fn()
    shutdown_engines()
    first = out[ways[0][0]]
    rows_out = [{"way": name, "differ_from_first": sum(a != b for a, b in zip(first, texts)), "n": len(texts)}
                for name, texts in out.items()]
    print(f"\n{'way':<34} {'replies that differ from the first way':>40}")
    for r in rows_out:
        print(f"{r['way']:<34} {r['differ_from_first']:>36} / {r['n']}")
    write_result(ROOT / "benchmarks" / "results" / "batch_invariance.json",
                 {"benchmark": "batch_invariance", "model": "smollm2-135m", "max_tokens": 64, "rows": rows_out,
                  "replies": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
