"""GSM8K: grade-school math word problems, one chain-of-thought module.

    splits = load_gsm8k("../shared/data/gsm8k/train.jsonl", train=1000, dev=500, test=1319)
    program = GSM8KSolver()
    score = gsm8k_metric(splits.test[0], program(**splits.test[0].inputs()))

The official file holds ``question`` and ``answer``: worked reasoning with
calculator notes (``<<48/2=24>>``), then ``#### <number>``. Examples take the
question as input and keep the final number (commas removed) as ``answer``
and the cleaned reasoning as ``rationale``. The metric compares the last
number of the predicted answer with the gold number.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from tandem.program import ChainOfThought, Example, InputField, Module, OutputField, Prediction, Signature
from tandem.tasks.data import DataError, Splits, data_error, read_records, split

__all__ = [
    "GSM8KSolver", "SolveMathProblem", "extract_number", "gsm8k_file", "gsm8k_metric", "load_gsm8k",
    "parse_gsm8k_answer", "read_gsm8k",
]

# The paper's sizes: 1000 train / 500 val / 1319 test (the official test
# split); here val is called dev, as in every tandem task. The local copy has
# the train file only, so test is cut from it with a fixed seed, before dev and
# train, so that it does not move when the other sizes change.
DEFAULT_SIZES = {"train": 1000, "dev": 500, "test": 1319}

_CALCULATOR = re.compile(r"<<[^<>]*>>")
# A comma between digits followed by exactly three digits is a thousands separator.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?P<sign>-)?\$?(?P<num>\d+(?:\.\d+)?|\.\d+)")
# Characters after which a '-' is a minus sign rather than a dash ("10-5").
_SIGN_OK_AFTER = set(" \t\n([{=:$,;")


def extract_number(text: Any) -> float | None:
    """The last number in ``text``, or None.

    Tolerates thousands separators, currency signs, units, percent signs and
    trailing words: ``"$1,234.50 in total."`` gives 1234.5, ``"72.0 clips"``
    gives 72.0. A '-' counts as a minus sign only at the start of the text or
    after a space or bracket, so ``"10-5"`` ends with 5, not -5.

    >>> extract_number("She earned $1,200 in May and 300 dollars in June.")
    300.0
    """
    if text is None:
        return None
    s = str(text).replace("\u2212", "-").replace("\u2013", "-")
    s = _THOUSANDS.sub("", s)
    last = None
    for m in _NUMBER.finditer(s):
        value = float(m.group("num"))
        if m.group("sign"):
            start = m.start()
            if start == 0 or s[start - 1] in _SIGN_OK_AFTER:
                value = -value
        last = value
    return last


def _answer_text(prediction: Any) -> Any:
    if prediction is None:
        return None
    if isinstance(prediction, str):
        return prediction
    if isinstance(prediction, dict):
        return prediction.get("answer")
    return getattr(prediction, "answer", None)


def gsm8k_metric(example: Example, prediction: Any, trace: Any = None) -> float:
    """1.0 when the last number of the predicted answer equals the gold number, else 0.0.

    ``trace`` is accepted for the optimizers' metric protocol; the score is the
    same with or without it.
    """
    gold = extract_number(example["answer"])
    pred = extract_number(_answer_text(prediction))
    if gold is None or pred is None:
        return 0.0
    return 1.0 if math.isclose(pred, gold, rel_tol=1e-9, abs_tol=1e-6) else 0.0


def parse_gsm8k_answer(answer: str) -> tuple[str, str]:
    """Split an official answer into (rationale, final number as a string without commas).

    Raises ValueError when there is no ``#### <number>`` line.
    """
    if "####" not in answer:
        raise ValueError("answer has no '#### <number>' line")
    reasoning, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", final):
        raise ValueError(f"final answer after '####' is not a number: {final!r}")
    rationale = _CALCULATOR.sub("", reasoning).strip()
    return rationale, final


def read_gsm8k(path: str | Path) -> list[Example]:
    """Examples from one official GSM8K JSONL file (``question``, ``answer``)."""
    out = []
    for line, row in read_records(path, {"question": str, "answer": str}):
        try:
            rationale, final = parse_gsm8k_answer(row["answer"])
        except ValueError as exc:
            raise data_error(path, line, str(exc)) from None
        question = row["question"].strip()
        if not question:
            raise data_error(path, line, "empty question")
        out.append(Example(question=question, answer=final, rationale=rationale).with_inputs("question"))
    return out


def gsm8k_file(path: str | Path, name: str) -> Path:
    """``path`` itself, or its file ``name`` when ``path`` is a folder (``train.jsonl``, ``test.jsonl``)."""
    p = Path(path)
    return p / name if p.is_dir() else p


def load_gsm8k(
    path: str | Path,
    *,
    train: int | None = DEFAULT_SIZES["train"],
    dev: int | None = DEFAULT_SIZES["dev"],
    test: int | None = DEFAULT_SIZES["test"],
    seed: int = 0,
    test_path: str | Path | None = None,
) -> Splits:
    """Train/dev/test splits from the official train file (or its folder).

    Without ``test_path``, test is cut from the train file first (so it stays
    fixed when ``train`` or ``dev`` change), then dev, then train; a size of
    None takes every remaining row. With ``test_path`` (the official
    test.jsonl or its folder), test is its first ``test`` rows (all when None).
    """
    rows = read_gsm8k(gsm8k_file(path, "train.jsonl"))
    if test_path is not None:
        tests = read_gsm8k(gsm8k_file(test_path, "test.jsonl"))
        if test is not None and len(tests) < test:
            raise DataError(f"test={test} but {test_path} has only {len(tests)} rows")
        test_rows = tests if test is None else tests[:test]
        dev_rows, train_rows = split(rows, (dev, train), seed)
    else:
        test_rows, dev_rows, train_rows = split(rows, (test, dev, train), seed)
    return Splits(train=train_rows, dev=dev_rows, test=test_rows)


class SolveMathProblem(Signature):
    """Solve the grade-school math word problem. Reason step by step and do the arithmetic carefully, then give the final answer."""

    question: str = InputField(desc="a math word problem")
    answer: str = OutputField(desc="the final answer as a single number, with no units or words")


class GSM8KSolver(Module):
    """The paper's GSM8K program: one chain-of-thought call from the question to the number."""

    def __init__(self, max_tokens: int = 384) -> None:
        # The gold rationales run about 50-170 tokens (median ~55, 99th pct ~170, at 4
        # chars a token) and models write more than the gold; a reply cut before
        # its Answer line is a parse failure, so leave room beyond the default 256.
        self.solve = ChainOfThought(SolveMathProblem, max_tokens=max_tokens)

    def forward(self, question: str) -> Prediction:
        return self.solve(question=question)
