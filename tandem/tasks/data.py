"""Reading task files and splitting them, shared by every task.

    rows = read_records("train.jsonl", required={"question": str, "answer": str})
    test, dev, train = split([row for _line, row in rows], (300, 200, None), seed=0)

Every malformed row raises ``DataError`` naming the file and the line, so a
bad download or a hand-edited file is found at once rather than as a strange
score hours later.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

from tandem.tasks.errors import DataError

T = TypeVar("T")

__all__ = ["DataError", "Splits", "check_fields", "data_error", "data_file", "iter_records", "naming_file",
           "read_records", "split"]


def data_error(path: str | Path, line: int | None, message: str) -> DataError:
    """A ``DataError`` whose message starts with the file and line; ``path``,
    ``line`` and ``reason`` are kept as attributes for callers that want them."""
    where = f"{path}, line {line}" if line is not None else str(path)
    err = DataError(f"{where}: {message}")
    err.path, err.line, err.reason = str(path), line, message
    return err


@contextmanager
def naming_file(path: str | Path) -> Iterator[None]:
    """Reading ``path`` inside this block: a file that is not UTF-8 text (a binary file, another
    encoding) is a one-line ``DataError`` naming it, instead of a codec message that names nothing."""
    try:
        yield
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start:exc.start + 1].hex() if isinstance(exc.object, bytes) else "?"
        raise data_error(path, None, f"not UTF-8 text (byte 0x{byte} at offset {exc.start}); a data file is "
                                     "text (CSV or JSON Lines) in UTF-8") from None


def data_file(path: str | Path, name: str, pattern: str) -> Path:
    """The data file ``path`` names: ``path`` itself when it is not a folder (a missing path is
    the loader's to report); in a folder, its ``name``, else its only file matching ``pattern``;
    else a one-line ``DataError`` naming the folder and what it holds.

    >>> data_file("iris.csv", "iris.csv", "*.csv")
    PosixPath('iris.csv')
    """
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / name).is_file():
        return path / name
    found = sorted(p for p in path.glob(pattern) if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        held = f"no {name} and no {pattern} file"
    else:
        shown = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
        held = f"no {name} but {len(found)} {pattern} files ({shown})"
    raise data_error(path, None, f"the folder holds {held}; pass the data file, or a folder holding {name}")


@dataclass
class Splits:
    """A task's examples. ``train`` and ``dev`` are for optimizers (``dev`` is the
    paper's validation set, which they select on); ``test`` is held out for
    reporting (the tasks' real test sets are not local, so it is cut from local
    data with a fixed seed)."""

    train: list = field(default_factory=list)
    dev: list = field(default_factory=list)
    test: list = field(default_factory=list)

    def __getitem__(self, name: str) -> list:  # splits["dev"], like the dicts other loaders return
        if name not in ("train", "dev", "test"):
            raise KeyError(f"no split {name!r}; the splits are train, dev and test")
        return getattr(self, name)

    def as_dict(self) -> dict[str, list]:
        return {"train": self.train, "dev": self.dev, "test": self.test}

    def sizes(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.as_dict().items()}


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def check_fields(
    row: Any, required: Mapping[str, type | tuple[type, ...]], path: str | Path, line: int | None
) -> dict:
    """Check that ``row`` is an object with each required key of the given type."""
    if not isinstance(row, dict):
        raise data_error(path, line, f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise data_error(path, line, f"missing key(s) {missing}; the row has {sorted(row)}")
    for key, types in required.items():
        value = row[key]
        # bool is an int in Python, but `true` is never a valid count or id here.
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            raise data_error(
                path, line, f"key {key!r} should be {_type_name(types)}, got {type(value).__name__}"
            )
    return row


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Items of a JSON array with the line each one starts on."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = skip_ws(0) + 1  # past '['
    # Line numbers are counted incrementally: the official HotPotQA files are
    # tens of MB on one line, and counting from the start each time is quadratic.
    line, counted = 1, 0
    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise data_error(path, line_of(exc.pos), f"invalid JSON: {exc.msg}") from None
        yield line, item
        pos = skip_ws(end)
        if pos >= n:
            raise data_error(path, line_of(n), "invalid JSON: the array is not closed with ']'")
        if text[pos] == "]":
            if skip_ws(pos + 1) < n:
                raise data_error(path, line_of(pos + 1), "invalid JSON: extra data after the array")
            return
        if text[pos] != ",":
            raise data_error(path, line_of(pos), f"invalid JSON: expected ',' or ']', got {text[pos]!r}")
        pos = skip_ws(pos + 1)


def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line, value)`` for each record of a JSONL file or a JSON array file.

    The format is detected from the first non-blank character: ``[`` means a
    JSON array (the official HotPotQA layout), anything else JSON Lines.
    Blank lines in JSONL are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise data_error(path, None, "a folder, not a data file" if path.is_dir() else "no such file")
    with naming_file(path):
        text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from _iter_json_array(text, path)
        return
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise data_error(path, i, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        yield i, value


def read_records(
    path: str | Path, required: Mapping[str, type | tuple[type, ...]] | None = None
) -> list[tuple[int, dict]]:
    """All records of ``path`` as ``(line, row)``, each checked against ``required``."""
    out = []
    for line, row in iter_records(path):
        out.append((line, check_fields(row, required or {}, path, line)))
    if not out:
        raise data_error(path, None, "the file has no records")
    return out


def split(rows: Sequence[T], sizes: Sequence[int | None], seed: int) -> list[list[T]]:
    """Shuffle ``rows`` with ``seed`` and cut consecutive pieces of the given sizes.

    One size may be ``None``: that piece takes every row the others leave.
    Pieces are cut in order from one shuffle, so a piece stays the same when
    the sizes after it change: put the held-out split first to keep it fixed
    while experimenting with training sizes.

    >>> split(list(range(10)), (2, None), seed=0)[0]
    [7, 8]
    """
    sizes = list(sizes)
    if sum(1 for s in sizes if s is None) > 1:
        raise ValueError(f"at most one size may be None (the rest), got {sizes}")
    bad = [s for s in sizes if s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 0)]
    if bad:
        raise ValueError(f"split sizes must be non-negative integers or None, got {sizes}")
    fixed = sum(s for s in sizes if s is not None)
    if fixed > len(rows):
        raise DataError(f"not enough rows to split: sizes {sizes} need {fixed}, but there are only {len(rows)}")
    order = list(rows)
    random.Random(seed).shuffle(order)
    rest = len(rows) - fixed
    out, pos = [], 0
    for s in sizes:
        n = rest if s is None else s
        out.append(order[pos : pos + n])
        pos += n
    return out
