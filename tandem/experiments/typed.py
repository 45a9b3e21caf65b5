"""Type checks of config values against a dataclass's field types (pydantic, strict).

    check_fields(LoRAConfig, {"rank": "abc"}, "lora")
    # ValueError: setting `lora.rank` must be int (Input should be a valid integer), got 'abc'

Strict: ``"8"`` is not an int and ``True`` is not a number, so a value that
TOML or ``--set`` typed differently from what the setting needs is an error
before anything slow starts, instead of a crash (or a silent coercion) later.
An int is accepted where a float is expected.
"""

from __future__ import annotations

import typing
from functools import lru_cache

from pydantic import TypeAdapter, ValidationError


@lru_cache(maxsize=None)
def _adapter(cls: type, name: str) -> tuple[TypeAdapter, str]:
    hint = typing.get_type_hints(cls)[name]
    return TypeAdapter(hint), getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_fields(cls: type, values: dict, section: str) -> None:
    """Each of ``values`` (names of ``cls``'s fields) has its field's type; else a one-line ValueError."""
    for name, value in values.items():
        adapter, type_name = _adapter(cls, name)
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            why = exc.errors()[0]["msg"]
            raise ValueError(f"setting `{section}.{name}` must be {type_name} ({why}), got {value!r}") from None
