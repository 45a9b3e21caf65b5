"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small randomly initialised Llama with SmolLM2's tokenizer and chat template."""
    from tandem.lm.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
