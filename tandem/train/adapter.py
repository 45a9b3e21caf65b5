"""Adapter folders: PEFT files plus a record of what made them.

A tandem adapter directory is a plain PEFT folder (``adapter_config.json``,
``adapter_model.safetensors``; ``PeftModel.from_pretrained`` loads it, and so
does vLLM's ``LoRARequest``) with one extra file, ``tandem_adapter.json``:
the base model's identity, the training config and seed, library versions and
a summary of the training run. ``write_meta`` writes it.

Reading it, the identity and the base check live in ``tandem.lm.identity``
(backends check an adapter's base before they serve it), merging in
``tandem.lm.merge``; they are importable from here too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tandem.lm.identity import (  # noqa: F401 - importable from here too
    META_FILE, META_FORMAT, META_VERSION, AdapterError, AdapterMismatch, check_adapter_base, load_adapter_meta,
    model_identity,
)
from tandem.lm.merge import merge_adapter  # noqa: F401 - importable from here too
from tandem.versions import package_versions


def write_meta(adapter_dir: Path, model_dir: Path, config: dict, training: dict) -> dict:
    """Write ``tandem_adapter.json`` next to the PEFT files; returns what it wrote."""
    base_meta = model_dir / "tandem.json"
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "base_model": {
            "path": str(model_dir),
            "identity": model_identity(model_dir),
            "name": json.loads(base_meta.read_text()).get("name") if base_meta.exists() else model_dir.name,
        },
        "config": config,
        "seed": config.get("seed"),
        "versions": package_versions(),
        "training": training,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (adapter_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta
