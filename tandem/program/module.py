"""Modules: programs written in plain Python around predictors.

    class MultiHop(Module):
        def __init__(self):
            self.query = ChainOfThought("question -> query")
            self.answer = ChainOfThought("context, question -> answer")

        def forward(self, question):
            ...

Predictors are found by attribute name (``named_predictors``), including
inside nested modules, lists and dicts, so optimizers can read and replace
their prompts and LMs. ``deepcopy`` copies prompts and demos but shares LMs
(engines are heavy and stateless from the program's point of view).
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

from tandem.program.example import Prediction


class Module:
    """Base class of programs. Subclasses define ``forward(**inputs) -> Prediction``."""

    def forward(self, **inputs: Any) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, **inputs: Any) -> Prediction:
        self._name_predictors()
        return self.forward(**inputs)

    # -- structure ---------------------------------------------------------------
    def _children(self) -> Iterator[tuple[str, Any]]:
        for name, value in vars(self).items():
            if name.startswith("_"):
                continue
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if isinstance(v, Module):
                        yield f"{name}[{i}]", v
            elif isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, Module):
                        yield f"{name}[{k!r}]", v

    def named_predictors(self) -> list[tuple[str, "Predict"]]:  # noqa: F821
        from tandem.program.predict import Predict

        out: list[tuple[str, Predict]] = []
        seen: set[int] = set()

        def walk(prefix: str, mod: Module) -> None:
            if id(mod) in seen:
                return
            seen.add(id(mod))
            if isinstance(mod, Predict):
                out.append((prefix or "self", mod))
                return
            for name, child in mod._children():
                walk(f"{prefix}.{name}" if prefix else name, child)

        walk("", self)
        return out

    def predictors(self) -> list:
        return [p for _, p in self.named_predictors()]

    def _name_predictors(self) -> None:
        for name, pred in self.named_predictors():
            pred.name = name

    # -- copies and LMs ------------------------------------------------------------
    def deepcopy(self) -> "Module":
        """A copy whose prompts can be changed freely; LMs are shared, not copied."""
        memo: dict[int, Any] = {}
        from tandem.lm.base import LM

        for obj in _reachable(self):
            if isinstance(obj, LM) or getattr(obj, "_tandem_share", False):
                memo[id(obj)] = obj
        new = copy.deepcopy(self, memo)
        new._name_predictors()
        return new

    def reset_copy(self) -> "Module":
        """A copy with every predictor's demos removed."""
        new = self.deepcopy()
        for p in new.predictors():
            p.demos = []
        return new

    def set_lm(self, lm) -> "Module":
        """Point every predictor at ``lm`` (in place); returns self for chaining."""
        for p in self.predictors():
            p.lm = lm
        return self

    def set_format(self, format) -> "Module":
        """Give every predictor the prompt format ``format`` (a name or a PromptFormat; in place)."""
        from tandem.program.formats import get_format

        fmt = get_format(format)
        for p in self.predictors():
            p.format = fmt
        return self

    def lms(self) -> list:
        out, seen = [], set()
        for p in self.predictors():
            if p.lm is not None and id(p.lm) not in seen:
                seen.add(id(p.lm))
                out.append(p.lm)
        return out

    def save(self, directory, *, seed: int | None = None):
        """Write program.json and adapter folders to ``directory`` (see persist.py)."""
        from tandem.program.persist import save_program

        return save_program(self, directory, seed=seed)

    # -- state (prompts only; saving with models lives in tandem.program.persist) --
    def dump_state(self) -> dict:
        return {name: p.dump_state() for name, p in self.named_predictors()}

    def load_state(self, state: dict) -> "Module":
        preds = dict(self.named_predictors())
        unknown = set(state) - set(preds)
        if unknown:
            raise ValueError(f"saved state names predictors {sorted(unknown)} that this program lacks ({sorted(preds)})")
        for name, s in state.items():
            preds[name].load_state(s)
        return self


def _reachable(root: Any) -> Iterator[Any]:
    """Objects reachable through attributes/containers (for deepcopy's memo)."""
    stack, seen = [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, Module):
            stack.extend(vars(obj).values())
