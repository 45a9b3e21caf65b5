"""Merged checkpoints (base + LoRA adapter) kept under ``TANDEM_HOME/merged``, newest first.

Every weight step that serves merged weights writes one full copy of the
model (about 0.5 GB for SmolLM2-135M in fp32), so the folder is pruned each
time a copy is made or used: the ``TANDEM_MAX_MERGED`` copies used most
recently stay (default 4), and so does any copy used within the last hour,
whatever their number, since another process may be about to load it.
A copy whose adapter folder is gone (``tandem.json`` names it) is removed
whatever its age: the RL step replaces its adapter every few updates and
removes the old folder, and an hour of RL steps otherwise wrote 83 copies
(42 GB) and filled the disk. A copy that was pruned is merged again when it
is needed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from tandem.lm.identity import checkpoint_fingerprint
from tandem.settings import tandem_home

log = logging.getLogger(__name__)

DEFAULT_KEEP = 4
MIN_AGE_S = 3600.0


def max_merged() -> int:
    """``TANDEM_MAX_MERGED``: how many merged copies to keep (a positive integer)."""
    raw = os.environ.get("TANDEM_MAX_MERGED", "").strip()
    if not raw:
        return DEFAULT_KEEP
    try:
        keep = int(raw)
    except ValueError:
        keep = 0
    if keep < 1:
        raise ValueError(f"TANDEM_MAX_MERGED: expected a positive integer, got {raw!r}")
    return keep


def merged_checkpoint(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> Path:
    """The folder of ``model_dir`` with ``adapter_dir`` merged in: made if missing, marked as used, older
    copies pruned."""
    keep = max_merged()
    root = tandem_home() / "merged"
    path = root / f"{checkpoint_fingerprint(model_dir)}-{checkpoint_fingerprint(adapter_dir)}"
    if (path / "config.json").exists():
        _record_adapter(path, adapter_dir)  # this folder now: the copy is not an orphan while it exists
        os.utime(path)  # used now: the newest
    else:
        from tandem.lm.merge import merge_adapter

        merge_adapter(model_dir, adapter_dir, path)
    prune(root, keep, spare=path)
    return path


def prune(root: Path, keep: int, *, spare: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the merged copies in ``root`` whose adapter folder is gone, and those beyond the ``keep``
    most recently used unless used within ``MIN_AGE_S``; never ``spare``. Returns the folders removed."""
    now = time.time() if now is None else now
    copies = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    copies.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for i, p in enumerate(copies):
        if p == spare:
            continue
        if _orphaned(p) or (i >= keep and now - p.stat().st_mtime >= MIN_AGE_S):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed %d merged checkpoint(s) from %s (TANDEM_MAX_MERGED=%d)", len(removed), root, keep)
    return removed


def _orphaned(copy: Path) -> bool:
    """Whether the adapter folder ``copy`` was merged from (as its ``tandem.json`` says) no longer exists."""
    try:
        adapter = json.loads((copy / "tandem.json").read_text())["merged_from"]["adapter"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no record: only the count and age rules apply
    return not Path(adapter).exists()


def _record_adapter(copy: Path, adapter_dir: str | os.PathLike) -> None:
    """Point ``copy``'s record at ``adapter_dir`` (an adapter with the same content may live in several folders)."""
    meta = copy / "tandem.json"
    try:
        info = json.loads(meta.read_text())
        info["merged_from"]["adapter"] = str(Path(adapter_dir).resolve())
    except (OSError, ValueError, KeyError, TypeError):
        return
    tmp = meta.with_name(f".tandem.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, meta)
