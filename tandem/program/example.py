"""Examples (a row of data) and predictions (a program's outputs)."""

from __future__ import annotations

from typing import Any, Iterable


class Example(dict):
    """A dict with attribute access that knows which keys are inputs.

    >>> ex = Example(question="2+2?", answer="4").with_inputs("question")
    >>> ex.inputs()
    {'question': '2+2?'}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._input_keys: tuple[str, ...] = ()

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def with_inputs(self, *keys: str) -> "Example":
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"example has no field(s) {missing}; it has {sorted(self)}")
        ex = Example(self)
        ex._input_keys = tuple(keys)
        return ex

    @property
    def input_keys(self) -> tuple[str, ...]:
        return self._input_keys

    def inputs(self) -> dict:
        return {k: self[k] for k in self._input_keys}

    def labels(self) -> dict:
        return {k: v for k, v in self.items() if k not in self._input_keys}

    def to_dict(self) -> dict:
        return {"data": dict(self), "inputs": list(self._input_keys)}

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(d["data"]).with_inputs(*d["inputs"])


class Prediction(Example):
    """What a program returns: output fields by name."""


def as_examples(rows: Iterable[dict], inputs: Iterable[str]) -> list[Example]:
    keys = tuple(inputs)
    return [Example(r).with_inputs(*keys) for r in rows]
