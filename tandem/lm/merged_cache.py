"""Merged checkpoints (base + LoRA adapter) kept under ``TANDEM_HOME/merged``, newest first.

Every weight step that serves merged weights writes one full copy of the
model (about 0.5 GB for SmolLM2-135M in fp32), so the folder is pruned each
time a copy is made or used: the ``TANDEM_MAX_MERGED`` copies used most
recently stay (default 4), and so does any copy used within the last hour,
whatever their number, since another process may be about to load it.
A copy that was pruned is merged again when it is needed.
"""

from __future__ import annotations

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
        os.utime(path)  # used now: the newest
    else:
        from tandem.lm.merge import merge_adapter

        merge_adapter(model_dir, adapter_dir, path)
    prune(root, keep, spare=path)
    return path


def prune(root: Path, keep: int, *, spare: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the merged copies in ``root`` beyond the ``keep`` most recently used, except ``spare`` and
    any used within ``MIN_AGE_S``; returns the folders removed."""
    now = time.time() if now is None else now
    copies = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    copies.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for p in copies[keep:]:
        if p == spare or now - p.stat().st_mtime < MIN_AGE_S:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        log.info("removed %d merged checkpoint(s) from %s (TANDEM_MAX_MERGED=%d)", len(removed), root, keep)
    return removed
