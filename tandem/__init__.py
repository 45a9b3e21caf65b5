"""tandem: optimize an LM program's prompts and weights in alternation."""

from tandem.program import (
    ChainOfThought, Example, InputField, Module, OutputField, ParseError, Predict, Prediction,
    Signature, trace,
)
from tandem.settings import settings

__version__ = "0.1.0"

__all__ = [
    "ChainOfThought", "Example", "InputField", "Module", "OutputField", "ParseError", "Predict",
    "Prediction", "Signature", "settings", "trace", "__version__",
]
