"""Base weights + a LoRA adapter as one ordinary checkpoint, for engines that serve merged
weights faster than adapters (vLLM on CPU). torch, transformers and peft are imported here only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tandem.fileio import atomic_dir
from tandem.lm.identity import check_adapter_base, load_adapter_meta

log = logging.getLogger(__name__)


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
            "merged_from": {"base": str(model_dir.resolve()), "adapter": str(adapter_dir.resolve()),
                            "base_identity": meta["base_model"]["identity"]},
        })
        (tmp / "tandem.json").write_text(json.dumps(info, indent=1))
    log.info("merged %s into %s -> %s", adapter_dir, model_dir, out_dir)
    return out_dir
