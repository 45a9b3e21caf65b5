"""Examples from the request log: ``tandem data from-log DIR --out data.jsonl``, and files of them.

    stats = from_log("logs/iris", "data.jsonl", split=(0.6, 0.2, 0.2))
    splits = examples_splits("data.jsonl", seed=0)        # {"train": [...], "dev": [...], "test": [...]}

An examples file is JSON lines, one example each, in ``tandem.Example``'s own
form (``Example.to_dict``) plus where it came from::

    {"data": {"sepal_length": "5.1", ..., "species": "setosa"}, "inputs": ["sepal_length", ...],
     "split": "train", "request_id": "9f2c...", "time": "2025-01-01T12:00:00Z",
     "program_version": "v1", "source": "label"}

``data`` holds the request's inputs and the label fields under the task's
own field names, so the task's metric scores it as it scores the task's
data. Which requests become examples (the last feedback of a request wins):

- a feedback with a ``label``: the request's inputs with that label
  (``source: "label"``); a label that names some label fields takes the
  rest from the served outputs;
- a feedback with only a ``score`` of at least ``min_score`` (default 1):
  the served outputs' label fields are the label (``source: "score"``); a
  lower score says the answer was wrong but not what is right, so the
  request is left out (counted in ``low_score``);
- requests without feedback are left out.

Exact duplicates (same inputs and label) are dropped, the earliest kept.
``split=(train, dev, test)`` fractions cut the examples by request time:
the oldest go to train, the newest to test, each request in one split
only. Without it ``split`` is null and ``examples_splits`` shuffles (with the
run's seed) into 60/20/20. ``tandem optimize --data data.jsonl`` and
``tandem promote --data data.jsonl`` read such files (``is_examples_file``).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from tandem.fileio import write_text
from tandem.program import Example, Module
from tandem.program.fields import program_fields

SPLITS = ("train", "dev", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


class ExamplesFileError(ValueError):
    """An examples file that cannot be read, or whose examples do not fit the program; one line naming it."""


# -- checking examples against a program -----------------------------------------------------------
def check_examples(examples: list[Example], program: Module, where: str) -> None:
    """Every example holds ``program``'s input and label fields; else one line saying which is missing."""
    inputs, labels = program_fields(program)
    need = inputs + [n for n in labels if n not in inputs]
    for i, ex in enumerate(examples):
        missing = [n for n in need if n not in ex]
        if missing:
            raise ExamplesFileError(
                f"{where}: example {i + 1} has no field {missing[0]!r}; examples of this program need "
                f"{', '.join(need)} (is it data of another task?)")


# -- from the log -----------------------------------------------------------------------------------
def parse_split(text: str | None) -> tuple[float, float, float] | None:
    """``"0.6,0.2,0.2"`` -> fractions of train, dev, test (each >= 0, summing to 1); None stays None."""
    if text is None:
        return None
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(not 0 <= x <= 1 for x in parts) or abs(sum(parts) - 1) > 1e-6:
        raise ValueError(f"--split must be three fractions train,dev,test that sum to 1 (e.g. 0.6,0.2,0.2), "
                         f"got {text!r}")
    return parts  # type: ignore[return-value]


def _cut(n: int, fractions: tuple[float, float, float]) -> list[str]:
    """The split of each of ``n`` examples in time order: the first ``round(n * train)`` train, and so on."""
    n_train = round(n * fractions[0])
    n_dev = min(n - n_train, round(n * fractions[1]))
    return ["train"] * n_train + ["dev"] * n_dev + ["test"] * (n - n_train - n_dev)


def from_log(log_dir: str | os.PathLike, out: str | os.PathLike, *,
             split: tuple[float, float, float] | None = None, min_score: float = 1.0) -> dict[str, Any]:
    """Write the log's requests with feedback as examples to ``out`` (module docstring); the counts.

    The file is written whole or not at all (a temporary file renamed over it)."""
    from tandem.serve_log import RequestLog

    if not 0 <= min_score <= 1:
        raise ValueError(f"--min-score must be from 0 to 1, got {min_score}")
    log = RequestLog.open(log_dir)
    try:
        inputs_order, label_fields = log.meta["input_fields"], log.meta["label_fields"]
        stats = {"requests": log.count()["requests"], "with_feedback": 0, "low_score": 0, "no_label": 0,
                 "duplicates": 0}
        seen: set[str] = set()
        rows: list[dict] = []
        for r in log.with_feedback():
            stats["with_feedback"] += 1
            outputs = r.outputs or {}
            if r.label:
                label = {n: r.label.get(n, outputs.get(n)) for n in label_fields}
                source = "label"
            elif r.score is not None and r.score >= min_score:
                label, source = {n: outputs.get(n) for n in label_fields}, "score"
            else:
                stats["low_score" if r.score is not None else "no_label"] += 1
                continue
            if any(v is None for v in label.values()):  # a failed request, or a label naming only some fields
                stats["no_label"] += 1
                continue
            data = {**r.inputs, **label}
            key = json.dumps(data, sort_keys=True, ensure_ascii=False)
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            rows.append({"data": data, "inputs": [n for n in inputs_order if n in r.inputs] or sorted(r.inputs),
                         "split": None, "request_id": r.id,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.time)),
                         "program_version": r.program_version, "source": source})
    finally:
        log.close()
    if split is not None:  # rows are in request-time order
        for row, name in zip(rows, _cut(len(rows), split)):
            row["split"] = name
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    stats["examples"] = len(rows)
    stats["splits"] = {s: sum(r["split"] == s for r in rows) for s in SPLITS} if split is not None else None
    return stats


# -- reading examples files ---------------------------------------------------------------------------
def is_examples_file(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a file whose first line is an example of this format (``data`` and ``inputs``)."""
    if path is None or not Path(path).is_file():
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "")
        doc = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("data"), dict) and isinstance(doc.get("inputs"), list)


def read_examples(path: str | os.PathLike) -> list[tuple[Example, str | None]]:
    """Every ``(example, split)`` of an examples file, in file order; an ExamplesFileError names the line."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExamplesFileError(f"{path} cannot be read as an examples file ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise ExamplesFileError(f"{path}, line {lineno}: not a JSON object (an examples file is JSON lines "
                                    "that tandem data from-log writes)") from None
        if not (isinstance(doc, dict) and isinstance(doc.get("data"), dict) and isinstance(doc.get("inputs"), list)):
            raise ExamplesFileError(f"{path}, line {lineno}: an example is an object with 'data' (an object) and "
                                    "'inputs' (a list of its input field names)")
        split = doc.get("split")
        if split not in (None, *SPLITS):
            raise ExamplesFileError(f"{path}, line {lineno}: 'split' must be train, dev, test or null, got {split!r}")
        try:
            out.append((Example(doc["data"]).with_inputs(*doc["inputs"]), split))
        except (KeyError, TypeError) as exc:
            raise ExamplesFileError(f"{path}, line {lineno}: {exc}") from None
    if not out:
        raise ExamplesFileError(f"{path} holds no examples")
    return out


def examples_splits(path: str | os.PathLike, seed: int = 0,
                    sizes: tuple[int, int, int] | None = None) -> dict[str, list[Example]]:
    """train, dev and test examples of a file: its recorded splits (each cut to ``sizes`` when given), or,
    when it records none, the examples shuffled with ``seed`` and cut by ``sizes`` or 60/20/20."""
    rows = read_examples(path)
    if all(s is None for _, s in rows):
        examples = [ex for ex, _ in rows]
        random.Random(seed).shuffle(examples)
        if sizes is not None:
            if sum(sizes) > len(examples):
                raise ExamplesFileError(f"{path}: sizes {','.join(map(str, sizes))} need {sum(sizes)} examples, "
                                        f"the file has {len(examples)}")
            names = [n for n, k in zip(SPLITS, sizes) for _ in range(k)]
        else:
            names = _cut(len(examples), DEFAULT_FRACTIONS)
        out: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for ex, name in zip(examples, names):
            out[name].append(ex)
        return out
    out = {s: [ex for ex, split in rows if split == s] for s in SPLITS}
    if sizes is not None:
        out = {s: out[s][:k] for s, k in zip(SPLITS, sizes)}
    return out
