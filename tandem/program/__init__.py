"""LM programs: signatures, predictors, modules, traces."""

from tandem.program.example import Example, Prediction
from tandem.program.module import Module
from tandem.program.predict import ChainOfThought, Predict
from tandem.program.render import ParseError
from tandem.program.signature import Field, InputField, OutputField, Signature
from tandem.program.trace import Trace, TraceEntry, trace

__all__ = [
    "ChainOfThought", "Example", "Field", "InputField", "Module", "OutputField", "ParseError",
    "Predict", "Prediction", "Signature", "Trace", "TraceEntry", "trace",
]
