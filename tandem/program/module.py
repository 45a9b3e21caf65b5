"""Modules: programs written in plain Python around predictors.

    class MultiHop(Module):
        def __init__(self):
            self.query = ChainOfThought("question -> query")
            self.answer = ChainOfThought("context, question -> answer")

        def forward(self, question):
            ...

Predictors are found by attribute name (``named_predictors``), including
inside nested modules, lists and dicts at any depth (``sub.hops[0]``,
``tools['search']``), so optimizers can read and replace their prompts and
LMs. That name is the predictor's one name everywhere: in traces, demos,
SFT data and program.json.

A predictor's name is resolved when it is called, never stored on it: the
program of the active trace (``trace(program)``) names it first, then the
outermost module call under way that contains it (``predictor_name``). A
sub-module called inside its program (``self.sub(x=1)`` in ``forward``, or
``program.sub(...)`` under ``trace(program)``) therefore records the names of
the top-level program's ``named_predictors()``, and calls in other threads
never rename each other's predictors.

``deepcopy`` copies prompts and demos but shares LMs (engines are heavy and
stateless from the program's point of view).
"""

from __future__ import annotations

import contextvars
import copy
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from tandem.program.example import Prediction
from tandem.program.program_file import save_program
from tandem.program.trace import current_trace

if TYPE_CHECKING:
    from tandem.program.predict import Predict


class _Call:
    """A module call under way; the names of its predictors are read when first asked for."""

    __slots__ = ("module", "_names")

    def __init__(self, module: "Module") -> None:
        self.module = module
        self._names: dict[int, str] | None = None

    def names(self) -> dict[int, str]:
        if self._names is None:
            self._names = predictor_names(self.module)
        return self._names


#: The module calls under way in this context, outermost first.
_calls: contextvars.ContextVar[tuple[_Call, ...]] = contextvars.ContextVar("tandem_module_calls", default=())


def predictor_names(program: "Module") -> dict[int, str]:
    """``{id(predictor): name}`` for every predictor of ``program`` (the names of ``named_predictors``)."""
    return {id(pred): name for name, pred in program.named_predictors()}


def predictor_name(pred: "Module") -> str:
    """``pred``'s name in the program it is running in.

    The active trace's program is asked first, then the module calls under
    way, outermost first; a predictor none of them contains (a bare
    predictor, or one held in a local variable) is named ``"self"``, its name
    in its own ``named_predictors()``.
    """
    t = current_trace()
    if t is not None and t.program is not None:
        name = t.names().get(id(pred))
        if name is not None:
            return name
    for call in _calls.get():
        name = call.names().get(id(pred))
        if name is not None:
            return name
    return "self"


class Module:
    """Base class of programs. Subclasses define ``forward(**inputs) -> Prediction``."""

    #: True for a predictor (``Predict`` and its subclasses): ``named_predictors`` lists it
    #: and does not look inside it.
    is_predictor: ClassVar[bool] = False

    def forward(self, **inputs: Any) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, **inputs: Any) -> Prediction:
        token = _calls.set(_calls.get() + (_Call(self),))
        try:
            return self.forward(**inputs)
        finally:
            _calls.reset(token)

    # -- structure ---------------------------------------------------------------
    def _children(self) -> Iterator[tuple[str, Any]]:
        """``(name, module)`` for each module held in a public attribute, in lists, tuples and dicts at any depth."""
        for name, value in vars(self).items():
            if not name.startswith("_"):
                yield from _modules_in(name, value)

    def named_predictors(self) -> list[tuple[str, Predict]]:
        """``(name, predictor)`` pairs, in attribute order; a predictor reachable twice keeps its first name."""
        out: list[tuple[str, Predict]] = []
        seen: set[int] = set()

        def walk(prefix: str, mod: Module) -> None:
            if id(mod) in seen:
                return
            seen.add(id(mod))
            if mod.is_predictor:
                out.append((prefix or "self", mod))  # type: ignore[arg-type]
                return
            for name, child in mod._children():
                walk(f"{prefix}.{name}" if prefix else name, child)

        walk("", self)
        return out

    def predictors(self) -> list:
        return [p for _, p in self.named_predictors()]

    # -- copies and LMs ------------------------------------------------------------
    def deepcopy(self) -> "Module":
        """A copy whose prompts can be changed freely; LMs are shared, not copied."""
        memo: dict[int, Any] = {}
        from tandem.lm.base import LM

        for obj in _reachable(self):
            if isinstance(obj, LM) or getattr(obj, "_tandem_share", False):
                memo[id(obj)] = obj
        return copy.deepcopy(self, memo)

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
        """Write program.json and adapter folders to ``directory`` (``tandem.program.program_file``)."""
        return save_program(self, directory, seed=seed)

    # -- state (prompts only; program.json with models is tandem.program.program_file) --
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


def _modules_in(name: str, value: Any) -> Iterator[tuple[str, "Module"]]:
    """Modules in ``value`` (a module, or containers of them), named ``name``, ``name[0]``, ``name['k']``, ..."""
    if isinstance(value, Module):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _modules_in(f"{name}[{i}]", v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _modules_in(f"{name}[{k!r}]", v)


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
