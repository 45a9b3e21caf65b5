"""Backends by name, like plugins: ``get_lm("hf:smollm2-135m")``.

A spec is ``[backend:]model``. The backend defaults to ``vllm``; the model is
an embedded model name or a checkpoint directory (for ``openai``, a model
name on the server, with the server's URL in ``base_url``). A backend is a
factory ``(model, **options) -> LM`` (``tandem.lm.protocol.LM``):

- built in: ``vllm``, ``hf``, ``openai``;
- registered in code: ``register_backend(name, factory)``;
- from another package: an entry point in the ``tandem.backends`` group
  (``[project.entry-points."tandem.backends"] mybackend = "pkg.module:factory"``),
  loaded the first time its name is asked for.

``get_lm`` puts every backend behind the call cache and usage counter
(``tandem.lm.caching``): ``cache=True`` (the default) is the cache under
``TANDEM_HOME`` (none with ``TANDEM_CACHE=0``), ``False`` none, or a
``CallCache``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

from tandem.lm.cache import CallCache, default_cache
from tandem.lm.caching import CachedLM, with_cache
from tandem.lm.protocol import LM

ENTRY_POINT_GROUP = "tandem.backends"

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


def _from_entry_point(name: str) -> Callable[..., LM] | None:
    """The factory a package registered as ``name`` in ``tandem.backends`` (registered here once loaded)."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        return None
    ep = found[0]
    try:
        factory = ep.load()
    except Exception as exc:  # noqa: BLE001 - turned into one line naming the entry point
        raise ImportError(f"backend {name!r} ({ep.value}, entry point group {ENTRY_POINT_GROUP}) "
                          f"does not load: {type(exc).__name__}: {exc}") from exc
    if not callable(factory):
        raise TypeError(f"backend {name!r} ({ep.value}): the entry point must name a factory (model, **options) -> LM")
    register_backend(name, factory)
    return factory


def backend_names() -> list[str]:
    """Every backend name: built in, registered, and from installed packages' entry points."""
    return sorted(set(_BACKENDS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def split_spec(spec: str) -> tuple[str, str]:
    """``backend:model`` -> (backend, model); a spec whose prefix names no backend is a ``vllm`` model."""
    backend, sep, model = spec.partition(":")
    if sep and (backend in _BACKENDS or _from_entry_point(backend) is not None):
        return backend, model
    return "vllm", spec


def get_lm(spec: str, *, cache: bool | CallCache | None = True, **options) -> CachedLM:
    """Build the LM named by ``spec`` behind the call cache (see the module docstring)."""
    backend, model = split_spec(spec)
    lm = _BACKENDS[backend](model, **options)
    if not isinstance(lm, LM):
        raise TypeError(f"backend {backend!r} returned {type(lm).__name__}, which lacks the LM protocol "
                        "(tandem.lm.protocol.LM: submit, render, count_tokens, fingerprint, spec, start, close)")
    if cache is True:
        cache = default_cache()
    elif cache is False:
        cache = None
    return with_cache(lm, cache)
