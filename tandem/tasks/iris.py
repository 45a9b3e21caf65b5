"""Iris: the paper's small classification task.

Four measurements in cm -> one of three species, with a chain-of-thought
classifier and exact match on the species. Data: any CSV with the columns
``sepal_length, sepal_width, petal_length, petal_width, species`` (the UCI
layout); by default scikit-learn's bundled copy, so nothing is downloaded.
"""

from __future__ import annotations

import csv
import math
import random
import re
from pathlib import Path

from tandem.program import ChainOfThought, Example, Module, Prediction
from tandem.tasks.errors import DataError

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
SPECIES = ("setosa", "versicolor", "virginica")
INSTRUCTIONS = (
    "Classify the iris flower from its measurements (in cm). "
    "The species is one of: setosa, versicolor, virginica."
)


def _species(raw: str) -> str:
    s = raw.strip().lower()
    s = s.removeprefix("iris-").removeprefix("iris ")
    return s


def load_iris(path: str | Path | None = None) -> list[Example]:
    """Rows from a CSV (or scikit-learn's copy when ``path`` is None)."""
    if path is None:
        return _load_sklearn()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in (*FEATURES, "species") if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; header is {header}")
        for lineno, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            ex = {}
            for c in FEATURES:
                try:
                    value = float(row[c])
                except ValueError:
                    raise DataError(f"{path}, line {lineno}: {c} is {row[c]!r}, not a number") from None
                if not math.isfinite(value):
                    raise DataError(f"{path}, line {lineno}: {c} is {row[c]!r}, not a finite number")
                ex[c] = row[c]
            species = _species(row["species"])
            if species not in SPECIES:
                raise DataError(f"{path}, line {lineno}: unknown species {row['species']!r}; expected {SPECIES}")
            ex["species"] = species
            rows.append(Example(ex).with_inputs(*FEATURES))
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def _load_sklearn() -> list[Example]:
    try:
        from sklearn.datasets import load_iris as sk_load
    except ImportError:
        raise DataError("no Iris CSV given and scikit-learn is not installed: pip install scikit-learn, or pass a CSV path") from None
    data = sk_load()
    rows = []
    for x, y in zip(data.data, data.target):
        ex = {c: f"{v:.1f}" for c, v in zip(FEATURES, x)}
        ex["species"] = str(data.target_names[y])
        rows.append(Example(ex).with_inputs(*FEATURES))
    return rows


def split_iris(rows: list[Example], seed: int = 0, sizes: tuple[int, int, int] = (50, 50, 50)) -> dict[str, list[Example]]:
    """Stratified split into train/dev/test by species, shuffled with ``seed``."""
    if sum(sizes) > len(rows):
        raise DataError(f"split {sizes} needs {sum(sizes)} rows, the data has {len(rows)}")
    rng = random.Random(seed)
    by_class: dict[str, list[Example]] = {}
    for r in rows:
        by_class.setdefault(r["species"], []).append(r)
    for members in by_class.values():
        rng.shuffle(members)
    # Deal the classes round-robin so each split gets an equal share of each.
    dealt: list[Example] = []
    pools = [list(m) for _, m in sorted(by_class.items())]
    while any(pools):
        for pool in pools:
            if pool:
                dealt.append(pool.pop())
    out, start = {}, 0
    for name, n in zip(("train", "dev", "test"), sizes):
        part = dealt[start:start + n]
        rng.shuffle(part)
        out[name] = part
        start += n
    return out


class IrisClassifier(Module):
    def __init__(self) -> None:
        self.classify = ChainOfThought(
            "sepal_length, sepal_width, petal_length, petal_width -> species",
            instructions=INSTRUCTIONS, max_tokens=128,
        )
        self.classify.signature = self.classify.signature.with_field("species", choices=SPECIES)

    def forward(self, **measurements: str) -> Prediction:
        return self.classify(**measurements)


def iris_metric(example: Example, prediction: Prediction, trace=None) -> bool:
    """Exact match on the species name, ignoring case, punctuation and an 'Iris-' prefix."""
    got = re.sub(r"[^a-z ]", "", _species(str(prediction.get("species", ""))))
    return got.strip() == example["species"]
