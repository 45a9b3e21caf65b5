"""Atomic writes: a reader, or a process killed mid-write, sees the old file or the new one, never half.

    write_json(run_dir / "results.json", summary)
    write_text(path, text)
    write_bytes(path, data)
    with atomic_dir(out_dir) as tmp:      # a folder built whole, then renamed into place
        model.save_pretrained(tmp)

A file is written to a temporary name in its own folder (so the rename
never crosses file systems), flushed and fsynced, then moved over the
target with ``os.replace``; the folder is fsynced so the rename itself
survives a power loss. This module imports nothing from tandem.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in folder ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; the parent folder must exist. Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: a name no other writer holds; mode 0o666 less the umask, as open() would give.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 1) -> Path:
    """Write ``value`` as JSON (UTF-8, non-ASCII kept, anything else through ``str``) atomically."""
    return write_text(path, json.dumps(value, indent=indent, default=str, ensure_ascii=False))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it takes the place of ``path``.

    A folder cannot be renamed over a non-empty one, so the old ``path`` is
    first renamed aside (``.NAME.old``), the new folder renamed to ``path``,
    and the old one removed: ``path`` is missing only between two renames,
    never while files are copied or deleted. Leftovers of a killed earlier
    write are removed first; on an error the temporary folder is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink(missing_ok=True)
