"""The paper's Table 1 (Soylu et al., EMNLP 2024): test accuracy %, mean of 3 seeds.

Transcribed from secondary sources (see the project's paper notes); single
cells are approximate. ``None``: the paper has no number (zero-shot scored 0,
so a weight step had no passing traces to train on).
"""

from __future__ import annotations

PAPER_MODELS = ("mistral-7b", "llama-2-7b", "llama-3-8b")
PAPER_TASKS = {"hotpotqa": "HotPotQA", "gsm8k": "GSM8K", "iris": "Iris"}

# strategy -> task -> (mistral-7b, llama-2-7b, llama-3-8b)
TABLE_1: dict[str, dict[str, tuple[float | None, float | None, float | None]]] = {
    "zero-shot": {"hotpotqa": (17.2, 13.2, 31.6), "gsm8k": (40.3, 24.0, 72.7), "iris": (26.0, 0.0, 48.0)},
    "p": {"hotpotqa": (33.8, 33.3, 46.9), "gsm8k": (46.4, 26.0, 77.9), "iris": (57.3, 56.7, 79.3)},
    "w": {"hotpotqa": (22.9, 12.2, 34.8), "gsm8k": (40.7, 24.0, 75.1), "iris": (29.3, None, 37.3)},
    "p -> w": {"hotpotqa": (36.3, 32.7, 42.8), "gsm8k": (47.3, 27.3, 77.6), "iris": (30.7, 26.7, 44.0)},
    "w -> p": {"hotpotqa": (33.0, 34.2, 43.6), "gsm8k": (48.3, 26.6, 78.9), "iris": (66.7, None, 78.7)},
    "p -> w -> p": {"hotpotqa": (37.6, 34.8, 46.7), "gsm8k": (46.8, 26.3, 77.0), "iris": (52.7, 65.3, 79.3)},
}


def normalize_strategy(strategy: str) -> str:
    """``"p->w ->p"`` -> ``"p -> w -> p"``: the spelling TABLE_1 uses."""
    s = strategy.strip()
    if s.lower() in ("zero-shot", "zero_shot", "zeroshot"):
        return "zero-shot"
    return " -> ".join(part.strip() for part in s.split("->"))


def paper_cell(strategy: str, task: str) -> tuple[float | None, float | None, float | None] | None:
    """The paper's three numbers for (strategy, task), or None when the paper has no such row or column."""
    return TABLE_1.get(normalize_strategy(strategy), {}).get(task)


def task_label(task: str) -> str:
    return PAPER_TASKS.get(task, task)
