"""LM backends behind one protocol (``protocol.py``); heavy engines import lazily."""

from tandem.lm.fake import FakeLM
from tandem.lm.protocol import (
    LM, Completion, ContextLengthError, LMError, LMUnavailable, Prompt, Request, SamplingParams, TrainableLM, Usage,
)

__all__ = [
    "LM", "Completion", "ContextLengthError", "FakeLM", "LMError", "LMUnavailable", "Prompt", "Request",
    "SamplingParams", "TrainableLM", "Usage",
]
