"""Balancing the weight step's training runs across final answers.

A small model's passing runs are often nearly all of one answer (Iris: one
species), and fine-tuning on them teaches it to answer that one. When the
final answers are categorical, the runs of the rarer answers are repeated
until every answer has as many runs as the most common one (weights by
repetition: nothing is thrown away). A run is repeated whole, every module
call of it, so the modules of a multi-module program stay in step.

Whether answers are categorical: ``balance="auto"`` (the default) treats
them so when there are at most ``MAX_CLASSES`` distinct answers and each
appears at least twice on average in the training set (Iris: 3 species in 50
examples; GSM8K's numbers and HotPotQA's strings are nearly all distinct, so
they are left alone). ``True`` balances whatever the answers, ``False``
never.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from tandem.program.example import Example

#: At most this many distinct answers for ``balance="auto"`` to treat them as classes.
MAX_CLASSES = 20


def answer_key(example: Example) -> str:
    """An example's final answer(s): its label fields, in a stable text form."""
    labels = example.labels()
    return "; ".join(f"{k}={labels[k]}" for k in sorted(labels))


def is_categorical(examples: Sequence[Example]) -> bool:
    """At most MAX_CLASSES distinct answers, each seen at least twice on average."""
    keys = Counter(answer_key(ex) for ex in examples)
    return 1 < len(keys) <= MAX_CLASSES and len(examples) >= 2 * len(keys)


def check_balance(balance: object) -> None:
    if balance not in ("auto", True, False):
        raise ValueError(f"balance must be 'auto', true or false, not {balance!r}")


def balance_runs(runs: list, trainset: Sequence[Example], balance: object = "auto") -> tuple[list, dict]:
    """``runs`` (objects with an ``.example``) with rarer answers repeated; and a record.

    The record holds the answer distribution of the runs before and after
    (``{"balanced": bool, "before": {answer: runs}, "after": {...}}``).
    """
    check_balance(balance)
    before = Counter(answer_key(r.example) for r in runs)
    record = {"balanced": False, "before": dict(sorted(before.items())), "after": dict(sorted(before.items()))}
    on = balance is True or (balance == "auto" and is_categorical(trainset))
    if not on or len(before) < 2:
        return list(runs), record
    target = max(before.values())
    by_key: dict[str, list] = {}
    for r in runs:
        by_key.setdefault(answer_key(r.example), []).append(r)
    out = list(runs)
    for key, members in sorted(by_key.items()):
        for j in range(target - len(members)):
            out.append(members[j % len(members)])
    record.update(balanced=True, after=dict(sorted(Counter(answer_key(r.example) for r in out).items())))
    return out, record
