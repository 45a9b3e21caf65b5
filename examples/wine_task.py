"""A task file: which of three cultivars an Italian wine comes from, from its chemical analysis.

    tandem eval examples/wine_task.py --split dev
    tandem optimize examples/wine_task.py --strategy "p -> w -> p" --set sizes=60,50,60
    tandem optimize --config examples/wine.toml
    tandem eval --program runs/wine_task-pwp-s0 --split test

The contract (``tandem.experiments.config``): ``program()``, ``metric(example,
prediction, trace=None)`` and ``load(data, seed, sizes)``; here also the
optional ``read(data)``, ``SIZES`` and ``PROMPT_SIZES``.

Data: scikit-learn's bundled copy of the UCI wine data (178 wines, 59 / 71 /
48 per cultivar; nothing is downloaded) when ``data`` is None, else a CSV
with the columns ``alcohol, flavanoids, color_intensity, proline, cultivar``
(cultivar: class_0, class_1 or class_2). Four of the thirteen measurements,
the most informative ones, keep the prompts short.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import tandem

FEATURES = ("alcohol", "flavanoids", "color_intensity", "proline")
CULTIVARS = ("class_0", "class_1", "class_2")
SIZES = (60, 50, 60)  # train / dev / test: 170 of the 178 wines
PROMPT_SIZES = (20, 40)  # the prompt step: bootstrap on 20 training examples, select on the other 40
INSTRUCTIONS = ("Identify which of three cultivars an Italian wine comes from, given its alcohol (%), "
                "flavanoids, color intensity and proline. The cultivar is one of: class_0, class_1, class_2.")


class WineClassifier(tandem.Module):
    """One chain-of-thought step: the four measurements -> the cultivar."""

    def __init__(self) -> None:
        self.classify = tandem.ChainOfThought(", ".join(FEATURES) + " -> cultivar", instructions=INSTRUCTIONS,
                                              max_tokens=128)
        self.classify.signature = self.classify.signature.with_field("cultivar", choices=CULTIVARS)

    def forward(self, **measurements: str) -> tandem.Prediction:
        return self.classify(**measurements)


def program() -> tandem.Module:
    return WineClassifier()


def metric(example: tandem.Example, prediction: tandem.Prediction, trace=None) -> bool:
    """Exact match on the cultivar, ignoring case, spaces and surrounding punctuation."""
    got = str(prediction.get("cultivar", "")).strip().strip(".,;:'\"`*").lower().replace(" ", "_")
    return got == example["cultivar"]


def read(data: str | Path | None = None) -> list[tandem.Example]:
    """Every wine of ``data`` (a CSV in the format above), or of scikit-learn's copy when it is None."""
    if data is None:
        from sklearn.datasets import load_wine

        wine = load_wine()
        cols = [wine.feature_names.index(f) for f in FEATURES]
        rows = [{f: f"{x[c]:g}" for f, c in zip(FEATURES, cols)} | {"cultivar": str(wine.target_names[y])}
                for x, y in zip(wine.data, wine.target)]
        return [tandem.Example(r).with_inputs(*FEATURES) for r in rows]
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a CSV with columns {', '.join(FEATURES)}, cultivar)")
    out = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in (*FEATURES, "cultivar") if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; its header is {', '.join(header)}")
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            for f in FEATURES:
                try:
                    ok = math.isfinite(float(row[f]))
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"{path}, line {line}: {f} is {row[f]!r}, not a number")
            if row["cultivar"] not in CULTIVARS:
                raise ValueError(f"{path}, line {line}: cultivar {row['cultivar']!r} is not one of {CULTIVARS}")
            out.append(tandem.Example({k: row[k] for k in (*FEATURES, "cultivar")}).with_inputs(*FEATURES))
    if not out:
        raise ValueError(f"{path}: no data rows")
    return out


def load(data: str | Path | None, seed: int, sizes: tuple[int, int, int] | None = None) -> dict:
    """Train / dev / test of ``sizes`` (default ``SIZES``), stratified by cultivar and shuffled with ``seed``."""
    rows = read(data)
    sizes = tuple(sizes or SIZES)
    if sum(sizes) > len(rows):
        raise ValueError(f"sizes {sizes} need {sum(sizes)} wines; {data or 'the bundled data'} has {len(rows)}")
    rng = random.Random(seed)
    pools = [[r for r in rows if r["cultivar"] == c] for c in CULTIVARS]
    for pool in pools:
        rng.shuffle(pool)
    # Interleave the cultivars in proportion to their counts, so each split gets its share of each.
    keyed = [((i + 0.5) / len(pool), k, r) for k, pool in enumerate(pools) for i, r in enumerate(pool)]
    dealt = [r for _, _, r in sorted(keyed, key=lambda t: t[:2])]
    out, start = {}, 0
    for name, n in zip(("train", "dev", "test"), sizes):
        out[name] = dealt[start:start + n]
        rng.shuffle(out[name])
        start += n
    return out
