"""Tasks: data loaders, programs and metrics (GSM8K, HotPotQA, Iris), and BM25 retrieval.

Each task module offers a loader that returns train / dev / test splits,
the paper's program for the task and its metric ``(example, prediction,
trace=None) -> float``.
"""

from tandem.tasks.data import DataError, Splits, split
from tandem.tasks.gsm8k import GSM8KSolver, gsm8k_metric, load_gsm8k
from tandem.tasks.hotpotqa import (
    MultiHopQA, gold_title_recall, hotpotqa_em, hotpotqa_f1, load_hotpotqa,
)
from tandem.tasks.retrieval import BM25Retriever, Passage

__all__ = [
    "BM25Retriever", "DataError", "GSM8KSolver", "MultiHopQA", "Passage", "Splits",
    "gold_title_recall", "gsm8k_metric", "hotpotqa_em", "hotpotqa_f1", "load_gsm8k",
    "load_hotpotqa", "split",
]
