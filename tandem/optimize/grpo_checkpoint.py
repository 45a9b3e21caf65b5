"""The RL step's checkpoints: what ``GRPO.compile`` writes every ``checkpoint_every`` RL steps and resumes from.

A checkpoint is the folder ``out_dir/checkpoint/``:

- ``state.json``: the RL step it was taken after, the step history so far,
  the data order (the shuffle's ``random.Random`` state and the examples
  left in the current epoch), the token usage, counts, the seconds spent so
  far, which LoRA each group serves (its folder under ``adapters/``), and
  ``identity``: the settings, seed, metric, training set, starting program
  and trainer the run was made with;
- ``policy-N/``: each loaded LoRA's ``Policy.save_state`` (the adapter, the
  AdamW state, the update count).

It is written atomically: into ``checkpoint.partial/``, which is renamed to
``checkpoint/`` only when complete (the previous one is first renamed to
``checkpoint.old/`` and removed after). A kill at any moment leaves either
``checkpoint/`` or, between the two renames, ``checkpoint.old/``; both are
complete, and ``read`` takes the first that exists. Checkpoints are taken
right after a sync (the step option ``checkpoint_every`` is a multiple of
``sync_every``), so the engine serves exactly the weights the trainer holds
and a resumed run needs to restore only the trainer's.

A checkpoint whose identity differs from the run's (other settings, seed,
data or program) is not used: it is removed, with a warning, and the step
starts from the beginning. ``checkpoint_every`` itself is not part of the
identity: it changes when checkpoints are taken, not the result.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tandem.optimize.plan import describe, examples_digest, program_settings

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE = "state.json"
VERSION = 1


def identity(settings: dict, *, seed: int, metric: Any, trainset: list, program: Any, policy_factory: Any) -> dict:
    """What a checkpoint must have been made with to be resumed from (JSON values)."""
    settings = {k: v for k, v in settings.items() if k != "checkpoint_every"}
    value = {"version": VERSION, "settings": settings, "seed": seed, "metric": describe(metric),
             "trainset": examples_digest(trainset), "program": program_settings(program),
             "trainer": describe(policy_factory)}
    return json.loads(json.dumps(value, default=str))


def write(out_dir: Path, state: dict, policies: dict[str, Any], keys: list[str]) -> float:
    """Write a checkpoint of ``state`` and the loaded ``policies`` (``keys``: the groups in order); seconds taken.

    The time is also added to the last record of ``state["history"]`` (``checkpoint_s``, and to its
    ``wall_s``), before state.json is written, so a resumed history is the one an uninterrupted run has.
    """
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    final, partial, old = (out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.partial", out_dir / f"{CHECKPOINT}.old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    saved = {}
    for gi, key in enumerate(keys):
        policy = policies[key]
        if getattr(policy, "loaded", True):  # a LoRA never updated has nothing to save: it starts fresh
            policy.save_state(partial / f"policy-{gi}")
            saved[key] = f"policy-{gi}"
    last = state["history"][-1]
    took = time.perf_counter() - t0
    last["checkpoint_s"] = round(took, 2)
    last["wall_s"] = round(last.get("wall_s", 0.0) + took, 2)
    (partial / STATE).write_text(json.dumps({**state, "policies": saved}, indent=1, default=str))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return time.perf_counter() - t0


def read(out_dir: Path, expected: dict) -> tuple[dict, Path] | None:
    """The checkpoint's state and folder when ``out_dir`` holds one of the ``expected`` identity, else None.

    One made with another identity is removed (with a warning naming what differs), so a later
    checkpoint of this run is never mixed with it; a half-written one (``.partial``) is removed too.
    """
    shutil.rmtree(out_dir / f"{CHECKPOINT}.partial", ignore_errors=True)
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        folder = out_dir / name
        try:
            state = json.loads((folder / STATE).read_text())
        except (OSError, ValueError):
            continue
        if state.get("identity") == expected:
            return state, folder
        was = state.get("identity") or {}
        differ = sorted(k for k in set(was) | set(expected) if was.get(k) != expected.get(k))
        if "settings" in differ:
            differ += [f"settings.{k}" for k in sorted(set(was.get("settings") or {}) | set(expected["settings"]))
                       if (was.get("settings") or {}).get(k) != expected["settings"].get(k)]
        log.warning("RL step: %s was made with another %s; starting the step over", folder, ", ".join(differ))
        remove(out_dir)
        return None
    return None


def remove(out_dir: Path) -> None:
    """Remove every checkpoint folder in ``out_dir``."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old", f"{CHECKPOINT}.partial"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
