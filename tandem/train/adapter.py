"""Adapter folders: PEFT files plus a record of what made them.

A tandem adapter directory is a plain PEFT folder (``adapter_config.json``,
``adapter_model.safetensors``; ``PeftModel.from_pretrained`` loads it, and so
does vLLM's ``LoRARequest``) with one extra file, ``tandem_adapter.json``:
the base model's identity, the training config and seed, library versions and
a summary of the training run.

The identity is ``tandem.lm.models.checkpoint_fingerprint``: a hash of the
base checkpoint's ``config.json`` and of the first and last MiB of each
weights file (the safetensors header and tensor bytes), so two checkpoints
with the same architecture but different weights, say a base and an instruct
model, are told apart without reading gigabytes.
An adapter applied to weights it was not trained on runs without complaint
and produces quietly wrong outputs; ``check_adapter_base`` makes that an error.

``merge_adapter`` writes base + adapter as one ordinary checkpoint, for
engines that serve merged weights faster than adapters (vLLM on CPU).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tandem.fileio import atomic_dir
from tandem.versions import package_versions

log = logging.getLogger(__name__)

META_FILE = "tandem_adapter.json"
META_FORMAT = "tandem-adapter"
META_VERSION = 1


class AdapterError(ValueError):
    """An adapter directory is missing, incomplete or not tandem's."""


class AdapterMismatch(AdapterError):
    """The adapter was trained on a different base model."""


def model_identity(model_dir: str | os.PathLike) -> str:
    """A short hash that names a checkpoint's weights (see the module docstring)."""
    from tandem.lm.models import checkpoint_fingerprint

    model_dir = Path(model_dir)
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if not (model_dir / "config.json").exists() or not has_weights:
        raise AdapterError(f"{model_dir} is not a model checkpoint (needs config.json and weight files)")
    return checkpoint_fingerprint(model_dir)


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


def load_adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    """The ``tandem_adapter.json`` of an adapter folder; AdapterError if absent."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / META_FILE
    if not (adapter_dir / "adapter_config.json").exists():
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    if not path.exists():
        raise AdapterError(
            f"{adapter_dir} has no {META_FILE}: not trained by tandem, so its base model is unknown"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT or meta.get("version", 0) > META_VERSION:
        raise AdapterError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')} "
            f"is not one this tandem reads ({META_FORMAT} <= {META_VERSION}); upgrade tandem"
        )
    return meta


def check_adapter_base(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike) -> None:
    """Raise AdapterMismatch unless ``adapter_dir`` was trained on ``model_dir``'s weights."""
    meta = load_adapter_meta(adapter_dir)
    want = meta["base_model"]["identity"]
    have = model_identity(model_dir)
    if want != have:
        raise AdapterMismatch(
            f"adapter {adapter_dir} was trained on base model {meta['base_model']['name']!r} "
            f"({meta['base_model']['path']}, identity {want}), but {model_dir} has identity {have}: "
            "load it on the model it was trained on, or train a new adapter for this one"
        )


def merge_adapter(
    model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Write base + adapter as one full checkpoint (safetensors + tokenizer) in ``out_dir``.

    The merged weights keep the base checkpoint's dtype. The folder is written
    under a temporary name and renamed at the end, so a killed merge leaves no
    half checkpoint behind.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    check_adapter_base(adapter_dir, model_dir)
    meta = load_adapter_meta(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        with torch.no_grad():
            model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        base_meta = model_dir / "tandem.json"
        info = json.loads(base_meta.read_text()) if base_meta.exists() else {}
        info.update({
            "name": f"{meta['base_model']['name']}+{adapter_dir.name}",
            "merged_from": {"base": str(model_dir), "adapter": str(adapter_dir),
                            "base_identity": meta["base_model"]["identity"]},
        })
        (tmp / "tandem.json").write_text(json.dumps(info, indent=1))
    log.info("merged %s into %s -> %s", adapter_dir, model_dir, out_dir)
    return out_dir
