"""LM backends behind one protocol (see base.py); heavy engines import lazily."""

from tandem.lm.base import LM, Completion, ContextLengthError, LMError, Prompt, Request, SamplingParams, Usage
from tandem.lm.fake import FakeLM

__all__ = [
    "LM", "Completion", "ContextLengthError", "FakeLM", "LMError", "Prompt", "Request",
    "SamplingParams", "Usage",
]
