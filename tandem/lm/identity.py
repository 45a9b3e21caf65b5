"""What a checkpoint or an adapter is: content hashes, and the base an adapter was trained on.

A tandem adapter directory is a plain PEFT folder (``adapter_config.json``,
``adapter_model.safetensors``) with one extra file, ``tandem_adapter.json``,
that names the base model's identity (written by ``tandem.train.adapter``).
Full fine-tuning (``method = "full"``) writes a whole checkpoint with the same
file; it stands where an adapter would (``is_full_checkpoint``).
The identity is ``checkpoint_fingerprint``: a hash of the checkpoint's
``config.json`` and of the first and last MiB of each weights file (the
safetensors header and tensor bytes), so two checkpoints with the same
architecture but different weights, say a base and an instruct model, are
told apart without reading gigabytes. An adapter applied to weights it was
not trained on runs without complaint and produces quietly wrong outputs;
``check_adapter_base`` makes that an error. Every backend checks it before
it serves an adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

META_FILE = "tandem_adapter.json"
META_FORMAT = "tandem-adapter"
META_VERSION = 1


class AdapterError(ValueError):
    """An adapter directory is missing, incomplete or not tandem's."""


class AdapterMismatch(AdapterError):
    """The adapter was trained on a different base model."""


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint or adapter directory (config + weight files).

    Reads the config/adapter_config text and, for each weight file, its size
    and first and last MiB: cheap, and different for any retrained adapter or
    re-quantized model.
    """
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.name in ("config.json", "adapter_config.json"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def model_identity(model_dir: str | os.PathLike) -> str:
    """A short hash that names a checkpoint's weights (see the module docstring)."""
    model_dir = Path(model_dir)
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if not (model_dir / "config.json").exists() or not has_weights:
        raise AdapterError(f"{model_dir} is not a model checkpoint (needs config.json and weight files)")
    return checkpoint_fingerprint(model_dir)


def is_full_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds tuned weights of the whole model (``[lora] method = "full"``), not a LoRA.

    Such a folder is an ordinary checkpoint (``config.json``, weights,
    tokenizer) with ``tandem_adapter.json`` naming the base it was trained
    from; backends serve it in place of the base, as they serve a merged one.
    """
    p = Path(path)
    return (p / META_FILE).exists() and (p / "config.json").exists() and not (p / "adapter_config.json").exists()


def load_adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    """The ``tandem_adapter.json`` of an adapter folder or a fully tuned checkpoint; AdapterError if absent."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / META_FILE
    if not (adapter_dir / "adapter_config.json").exists() and not is_full_checkpoint(adapter_dir):
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json) "
                           "nor a checkpoint tandem fine-tuned in full")
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


def check_if_tandem_adapter(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike) -> None:
    """``check_adapter_base`` for adapters tandem trained (they name their base); others pass unchecked."""
    if (Path(adapter_dir) / META_FILE).exists():
        check_adapter_base(adapter_dir, model_dir)
