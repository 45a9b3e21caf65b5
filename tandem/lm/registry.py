"""Backends registered by name, like plugins: ``get_lm("hf:smollm2-135m")``.

A spec is ``[backend:]model``. The backend defaults to ``vllm``; the model is
an embedded model name or a checkpoint directory (for ``openai``, a model
name on the server, with the server's URL in ``base_url``). Third-party
backends register with ``register_backend(name, factory)``.
"""

from __future__ import annotations

from typing import Callable

from tandem.lm.base import LM

_BACKENDS: dict[str, Callable[..., LM]] = {}


def register_backend(name: str, factory: Callable[..., LM]) -> None:
    _BACKENDS[name] = factory


def _vllm(model: str, **kw) -> LM:
    try:
        from tandem.lm.vllm import VLLM
    except ImportError as exc:
        raise ImportError(f"the vllm backend needs vLLM: pip install 'tandem[cpu]' (or [gpu]); {exc}") from exc
    return VLLM(model, **kw)


def _hf(model: str, **kw) -> LM:
    try:
        from tandem.lm.hf import HFLM
    except ImportError as exc:
        raise ImportError(f"the hf backend needs torch and transformers: pip install 'tandem[cpu]'; {exc}") from exc
    return HFLM(model, **kw)


def _openai(model: str, **kw) -> LM:
    from tandem.lm.openai import OpenAILM

    return OpenAILM(model, **kw)


register_backend("vllm", _vllm)
register_backend("hf", _hf)
register_backend("openai", _openai)


def split_spec(spec: str) -> tuple[str, str]:
    backend, sep, model = spec.partition(":")
    if sep and backend in _BACKENDS:
        return backend, model
    return "vllm", spec


def get_lm(spec: str, **options) -> LM:
    """Build the LM named by ``spec`` (see module docstring)."""
    backend, model = split_spec(spec)
    return _BACKENDS[backend](model, **options)
