"""tandem: optimize an LM program's prompts and weights in alternation."""

from tandem.program import (
    ChainOfThought, Example, InputField, Module, OutputField, ParseError, Predict, Prediction,
    Signature, trace,
)
from tandem.program.persist import load_program as load
from tandem.settings import settings

__version__ = "0.1.0"

__all__ = [
    "ChainOfThought", "Example", "InputField", "Module", "OutputField", "ParseError", "Predict",
    "Prediction", "Signature", "load", "settings", "trace", "__version__",
]
