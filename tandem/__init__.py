"""tandem: optimize an LM program's prompts and weights in alternation.

    import tandem

    lm = tandem.get_lm("vllm:smollm2-135m")        # an LM backend by spec
    result = tandem.evaluate(program, devset, metric)
    bt = tandem.BetterTogether(metric, strategy="p -> w -> p", run_dir="runs/x")
    program = tandem.load("runs/x/final")          # a saved program

``import tandem`` quiets the libraries under it (vLLM, transformers, torch):
their INFO and WARNING lines and Python warnings are hidden unless
``TANDEM_LOG=info`` (or debug, warning, error) says otherwise (``tandem.quiet``).

``import tandem`` stays light: no backend engine (vLLM, torch) is imported
until an LM is built. The optimizers are imported on first use
(``tandem.BetterTogether``, ``tandem.RandomSearch``, ``tandem.BootstrapFinetune``,
``tandem.BootstrapFewShot``), through the module's ``__getattr__``.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from tandem import quiet

try:  # before vLLM, transformers or torch is imported: their settings are read at import
    quiet.configure()
except ValueError as _exc:  # an unknown TANDEM_LOG: quiet, and say so
    logging.getLogger("tandem").warning("%s", _exc)

from tandem.evaluate.evaluate import evaluate
from tandem.lm.registry import get_lm
from tandem.program import (
    ChainOfThought, Example, InputField, Module, OutputField, ParseError, Predict, Prediction,
    Signature, trace,
)
from tandem.persist import load_program as load
from tandem.settings import settings

if TYPE_CHECKING:
    from tandem.optimize import BetterTogether, BootstrapFewShot, BootstrapFinetune, RandomSearch

__version__ = "0.1.0"

#: Names imported on first access: attribute -> module that defines it.
_LAZY = {
    "BetterTogether": "tandem.optimize",
    "BootstrapFewShot": "tandem.optimize",
    "BootstrapFinetune": "tandem.optimize",
    "RandomSearch": "tandem.optimize",
}

__all__ = [
    "BetterTogether", "BootstrapFewShot", "BootstrapFinetune", "ChainOfThought", "Example", "InputField",
    "Module", "OutputField", "ParseError", "Predict", "Prediction", "RandomSearch", "Signature", "evaluate",
    "get_lm", "load", "settings", "trace", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
