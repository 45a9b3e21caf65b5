"""Which training recipe a weight step uses: LoRA or every weight, and each one's epochs, batch and rate.

``LoRAConfig(method="auto")`` (the default) trains every weight of a model
with at most ``FULL_MAX_PARAMS`` parameters and a LoRA on larger ones; the
``epochs``, ``batch_size`` and ``learning_rate`` left unset take the chosen
method's measured defaults (``METHOD_DEFAULTS``). On Iris, SmolLM2-135M
learns the classification from its own traces with full fine-tuning and
not with a LoRA (docs/training.md, "LoRA or every weight"); a model of
billions of parameters cannot keep its AdamW state (16 bytes a parameter)
in a laptop's memory, and a LoRA is what its users expect.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.train.lora import LoRAConfig

#: Models up to this many parameters are fine-tuned in full by ``method="auto"``: 500M
#: parameters hold 8 GB of fp32 weights, gradients and AdamW moments.
FULL_MAX_PARAMS = 500_000_000

#: Each method's defaults for the settings a config leaves unset (docs/training.md).
METHOD_DEFAULTS = {
    # Small batches, more steps: batch 2 at 1e-3 learned where the paper's batch 8 did not.
    "lora": {"epochs": 4, "batch_size": 2, "learning_rate": 1e-3},
    # 20 epochs learned Iris from two sets of its own traces; 10 learned one of them ("LoRA or every weight").
    "full": {"epochs": 20, "batch_size": 8, "learning_rate": 1e-4},
}

METHODS = ("auto", "lora", "full")


def count_params(model_dir: str | os.PathLike) -> int:
    """Parameters in a checkpoint's safetensors files, read from their headers (no tensor is loaded)."""
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors weights to count")
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def choose_method(model_dir: str | os.PathLike) -> str:
    """``"full"`` for a model of at most ``FULL_MAX_PARAMS`` parameters, else ``"lora"``."""
    return "full" if count_params(model_dir) <= FULL_MAX_PARAMS else "lora"


def resolve_config(config: "LoRAConfig", model_dir: str | os.PathLike) -> "LoRAConfig":
    """``config`` with its method chosen for ``model_dir`` and unset epochs, batch and rate filled in."""
    method = choose_method(model_dir) if config.method == "auto" else config.method
    unset = {k: v for k, v in METHOD_DEFAULTS[method].items() if getattr(config, k) is None}
    return replace(config, method=method, **unset)
