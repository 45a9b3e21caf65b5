"""What plan.json records, so that a resumed run reuses steps only under the same settings.

A run directory's finished steps are reused by ``resume`` only when every
setting that changes a step's result is what it was when they ran. plan.json
records those settings (``run_settings``), flattened to ``name: value``:

- ``strategy``, ``seed``, ``metric`` (its qualified name), ``splits.*`` (the
  prompt step's bootstrap / selection sizes);
- each step optimizer's settings, under the step's name: its class and its
  public attributes, walked (``describe``), e.g. ``p.num_candidates``,
  ``p.max_demos``, ``p.fewshot.attempts``, ``w.lora.rank`` (a LoRAConfig is
  named ``lora``), ``w.temperature``, ``w.teacher_demos``, ``w.trainer``;
  a custom optimizer is described the same way;
- ``trainset`` and ``valset``: the number of examples and a hash of them
  (their fields, inputs and order);
- ``program.<predictor>.lm`` (the LM's fingerprint: model, weights, adapter),
  ``.format`` (the prompt format) and ``.prompt`` (a hash of the signature,
  instructions, demos and sampling settings);
- whatever the caller adds (``run_cell``: ``task``, ``data``, ``split_seed``,
  ``sizes.train`` / ``sizes.dev``, ``model``).

Left out, because they do not change what a step returns: ``num_threads`` /
``threads``, progress callbacks, output folders (``out_dir``, ``run_dir``),
verbosity, and private attributes (a leading ``_``). A function is recorded
by its qualified name, so an edited metric or trainer under the same name is
not noticed.

A mismatch is one ``ResumeMismatch`` line, ``name: was X, now Y`` for every
differing setting.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import types
from pathlib import Path
from typing import Any, Iterable

#: plan.json's layout: 2 records ``settings``; 1 (``start_step`` only) and none (before step 0) did not.
PLAN_VERSION = 2
#: Attribute names that never change a step's result: left out of the settings.
NOT_RESULTS = frozenset({"num_threads", "threads", "progress", "verbose", "verbosity", "out_dir", "run_dir",
                         "log", "logger", "info", "on_step",
                         "checkpoint_every"})  # how often an RL step saves its state, not what it learns
MISSING = "unset"  # how a setting one side lacks is shown
_DEPTH = 4  # objects nested deeper are described by their class name


class ResumeMismatch(ValueError):
    """A run directory's finished steps were made with other settings; ``differences``: (name, was, now)."""

    def __init__(self, run_dir: str | Path, differences: list[tuple[str, Any, Any]]):
        self.run_dir = Path(run_dir)
        self.differences = differences
        shown = "; ".join(f"{name}: was {show(was)}, now {show(now)}" for name, was, now in differences)
        super().__init__(
            f"cannot resume {run_dir}: its finished steps were made with other settings ({shown}); "
            "run the same settings again, start over there without resume, or use another run directory"
        )


def digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value (12 hex digits of sha256)."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def examples_digest(examples: Iterable) -> str:
    """``"30 examples (sha256 1a2b3c4d5e6f)"``: their count and a hash of their fields, inputs and order."""
    rows = [ex.to_dict() if hasattr(ex, "to_dict") else ex for ex in examples]
    return f"{len(rows)} examples (sha256 {digest(rows)})"


def lm_identity(lm: Any) -> str | None:
    """The LM's fingerprint (model, weights, adapter: what the call cache keys on), or its class name."""
    if lm is None:
        return None
    try:
        return str(lm.fingerprint())
    except Exception:  # noqa: BLE001 - an LM that cannot say: its class stands in
        return _name(type(lm))


def program_settings(program: Any) -> dict:
    """Per predictor: ``lm`` (fingerprint), ``format`` (name) and ``prompt`` (hash of the rest of its state)."""
    from tandem.settings import settings

    out: dict[str, dict] = {}
    for name, pred in program.named_predictors():
        state = dict(pred.dump_state())
        fmt = state.pop("format", None)
        out[name] = {"lm": lm_identity(pred.lm or settings.lm), "format": fmt, "prompt": f"sha256 {digest(state)}"}
    return out


def describe(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-able settings: plain values as they are, objects as their class and public attributes."""
    from tandem.lm.base import LM
    from tandem.program.module import Module
    from tandem.train import LoRAConfig

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return describe(value.value, depth)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, LM):
        return lm_identity(value)
    if isinstance(value, Module):
        return f"program sha256 {digest(program_settings(value))}"
    if isinstance(value, type):
        return _name(value)
    if isinstance(value, functools.partial):
        return {"function": describe(value.func, depth + 1), "args": describe(list(value.args), depth + 1),
                "keywords": describe(value.keywords, depth + 1)}
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return _name(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
        if items and all(hasattr(x, "input_keys") for x in items):
            return examples_digest(items)
        return [describe(x, depth + 1) for x in items]
    if isinstance(value, dict):
        return {str(k): describe(v, depth + 1) for k, v in value.items() if str(k) not in NOT_RESULTS}
    if depth >= _DEPTH:
        return _name(type(value))
    if dataclasses.is_dataclass(value):
        attrs = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif hasattr(value, "__dict__"):
        attrs = dict(vars(value))
    else:
        return _name(type(value))
    out: dict[str, Any] = {"class": _name(type(value))}
    for key, v in attrs.items():
        if key.startswith("_") or key in NOT_RESULTS:
            continue
        out["lora" if isinstance(v, LoRAConfig) else key] = describe(v, depth + 1)
    return out


def run_settings(*, strategy_steps: list[str], seed: int, metric: Any, splits: Any, optimizers: dict[str, Any],
                 trainset: list, valset: list, program: Any, extra: dict | None = None) -> dict[str, Any]:
    """Every setting that changes a step's result, flattened to ``{"name": value}`` (JSON values)."""
    tree = {
        "strategy": " -> ".join(strategy_steps),
        "seed": seed,
        **(extra or {}),
        "metric": describe(metric),
        "splits": describe(splits),
        # only the optimizers the strategy runs, once each
        **{name: describe(optimizers[name]) for name in dict.fromkeys(strategy_steps)},
        "trainset": examples_digest(trainset),
        "valset": examples_digest(valset),
        "program": program_settings(program),
    }
    return json.loads(json.dumps(flatten(tree), default=str))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"w": {"lora": {"rank": 8}}}`` -> ``{"w.lora.rank": 8}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(name, was, now)`` for every setting that differs (``MISSING`` where one side lacks it)."""
    names = list(new) + [k for k in old if k not in new]
    return [(k, old.get(k, MISSING), new.get(k, MISSING)) for k in names if old.get(k, MISSING) != new.get(k, MISSING)]


def show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _name(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return f"{module}.{qual}" if module else qual
