"""LoRA adapters served by the OpenAI-compatible server (vLLM with ``--enable-lora``).

An adapter folder is loaded at run time through ``POST /v1/load_lora_adapter``
(a server started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), once per
server (every server of a fleet, before the adapter's first request:
``tandem.lm.openai_fleet``), under a name made of the folder name and its content hash, so a
retrained adapter in the same folder is a new name. The server must be able
to read the folder. A server without runtime loading may serve the adapter
from its start (``--lora-modules NAME=PATH``); then it is asked for by name.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

from tandem.lm.identity import checkpoint_fingerprint, is_full_checkpoint
from tandem.lm.openai_http import (
    RETRY_STATUS, AdapterNotServed, Retryable, Transport, list_models, transport_failure,
)
from tandem.lm.protocol import LMError


def served_adapter(adapter: str | os.PathLike) -> tuple[Path | None, str]:
    """(folder, served name) of ``adapter``: a folder (named by its content hash) or a served name."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if is_full_checkpoint(path):
            raise LMError(f"{path} is a checkpoint tuned in full ([lora] method = \"full\"), not a LoRA: a server "
                          "cannot load it at run time; serve it as the server's model (vllm serve that folder)")
        return path.resolve(), f"{path.name}-{checkpoint_fingerprint(path)[:10]}"
    if os.sep in str(adapter) or str(adapter).startswith("."):
        raise LMError(f"adapter folder {adapter} does not exist")
    return None, str(adapter)  # a LoRA the server already serves under this name


class ServedAdapters:
    """Which adapters each server has loaded; shared by an LM and its adapter copies."""

    def __init__(self) -> None:
        self._loaded: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def forget(self, base_url: str, name: str) -> None:
        """The server lost it (restarted): load it again at the next request."""
        self._loaded.discard(f"{base_url}|{name}")

    def ensure(self, transport: Callable[[], Transport], base_url: str, name: str, folder: Path,
               hint_model: str) -> None:
        """Load ``folder`` into the server at ``base_url`` as ``name``, once. One try: ``Retryable`` when
        it is worth another (the caller's retries, ``tandem.lm.openai_fleet``), ``AdapterNotServed``
        when the server cannot serve it."""
        key = f"{base_url}|{name}"
        if key in self._loaded:
            return
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._loaded:
                return
            _load(transport, base_url, name, folder, hint_model)
            self._loaded.add(key)
            logging.getLogger(__name__).info("server %s serves adapter %s as %r", base_url, folder, name)


def _load(transport: Callable[[], Transport], base_url: str, name: str, folder: Path, hint_model: str) -> None:
    """``POST /load_lora_adapter`` once (see ``ServedAdapters.ensure``)."""
    import httpx

    url = f"{base_url}/load_lora_adapter"
    how = (
        f"start the server with LoRA serving and runtime loading: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
        f"python -m vllm.entrypoints.openai.api_server --model {hint_model} "
        f"--enable-lora --max-lora-rank 32 ..., or serve the adapter from the start with "
        f"--enable-lora --lora-modules {name}={folder} (docs/servers.md)"
    )
    try:
        resp = transport().client.post(url, json={"lora_name": name, "lora_path": str(folder)})
    except httpx.TransportError as exc:
        raise transport_failure(exc, 0) from None
    body = resp.text[:300]
    if resp.status_code < 300 or "already been loaded" in body:
        return
    if resp.status_code in (404, 405):
        try:
            listed = list_models(transport().client, base_url, 10.0) or []
        except (Retryable, LMError):
            listed = []
        if name in listed:
            return
        raise AdapterNotServed(
            f"{url}: HTTP {resp.status_code}: the server has no runtime LoRA loading, and does not "
            f"serve {name!r}; {how}", url=url, status=resp.status_code,
        )
    if resp.status_code in RETRY_STATUS and resp.status_code != 400:
        raise Retryable(f"loading adapter {name!r}: HTTP {resp.status_code}: {body!r}", resp.status_code)
    raise AdapterNotServed(
        f"{url}: loading adapter {folder} as {name!r} failed: HTTP {resp.status_code}: {body!r}; "
        f"the server must run with --enable-lora and a --max-lora-rank at least the adapter's "
        f"rank, and read the folder; {how}", url=url, status=resp.status_code,
    )
