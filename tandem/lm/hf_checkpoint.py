"""One checkpoint loaded with transformers, shared by every ``HFLM`` on it (and its adapters).

``shared_checkpoint(model_dir, dtype)`` returns the process's one ``HFCheckpoint``
for that folder and dtype. The tokenizer (``tandem.lm.chat``) and the model
load on first use: an ``HFLM`` whose requests the call cache answers never
loads the weights. Adapters are PEFT folders loaded into one
``peft.PeftModel`` around the base, one named adapter each, and switched
under a lock around each forward loop (``active``).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tandem.lm.chat import ChatTokenizer
from tandem.lm.identity import checkpoint_fingerprint

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def dtype_name(dtype: Any, model_dir: Path) -> str:
    """'auto' -> the checkpoint's own dtype (float32 for the converted embedded models)."""
    if dtype is None or dtype == "auto":
        cfg = json.loads((model_dir / "config.json").read_text())
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[name]


class HFCheckpoint:
    """A checkpoint's tokenizer and (lazily) its model; see the module docstring."""

    def __init__(self, model_dir: Path, dtype: str) -> None:
        self.model_dir = model_dir
        self.dtype = dtype
        self.chat = ChatTokenizer(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        self.context_length = int(config.get("max_position_embeddings") or 2048)
        self.fingerprint = checkpoint_fingerprint(model_dir)
        self.lock = threading.Lock()  # one forward loop at a time (adapters switch per loop)
        self._model: Any = None
        self.peft: Any = None
        self.adapters: dict[str, int] = {}  # peft adapter name -> HFLM objects using it
        self.eos_ids: frozenset[int] = frozenset()
        self.pad_id = 0

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model (once); a no-op when it is loaded."""
        if self._model is not None:
            return
        with self.lock:
            if self._model is not None:
                return
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

            log.info("loading %s in %s with transformers", self.model_dir, self.dtype)
            config = AutoConfig.from_pretrained(self.model_dir)
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.dtype))
            model.eval()
            tokenizer = self.chat.tokenizer
            eos: set[int] = set()
            try:
                gen_eos = GenerationConfig.from_pretrained(self.model_dir).eos_token_id
            except OSError:  # no generation_config.json
                gen_eos = None
            for e in (gen_eos, config.eos_token_id, tokenizer.eos_token_id):
                if isinstance(e, int):
                    eos.add(e)
                elif e:
                    eos.update(int(x) for x in e)
            self.eos_ids = frozenset(eos)
            pad = tokenizer.pad_token_id
            self.pad_id = pad if pad is not None else min(eos) if eos else 0
            self._model = model

    def add_adapter(self, adapter_dir: Path, name: str) -> None:
        self.load()
        with self.lock:
            if name in self.adapters:
                self.adapters[name] += 1
                return
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self._model, str(adapter_dir), adapter_name=name)
            else:
                self.peft.load_adapter(str(adapter_dir), adapter_name=name)
            self.peft.eval()
            self.adapters[name] = 1

    def drop_adapter(self, name: str) -> None:
        with self.lock:
            n = self.adapters.get(name, 0) - 1
            if n > 0:
                self.adapters[name] = n
                return
            self.adapters.pop(name, None)
            if self.peft is not None and name in self.peft.peft_config:
                if len(self.peft.peft_config) == 1:
                    # peft cannot delete its last adapter; unwrap the base instead.
                    self._model = self.peft.unload()
                    self.peft = None
                else:
                    if self.peft.active_adapter == name:
                        self.peft.set_adapter(next(a for a in self.peft.peft_config if a != name))
                    self.peft.delete_adapter(name)

    @contextmanager
    def active(self, adapter: str | None) -> Iterator[Any]:
        """Hold the lock with ``adapter`` (or no adapter) switched on; yields the model to call."""
        self.load()
        with self.lock:
            if self.peft is None:
                assert adapter is None
                yield self._model
            elif adapter is None:
                with self.peft.disable_adapter():
                    yield self.peft
            else:
                self.peft.set_adapter(adapter)
                yield self.peft


_checkpoints: "weakref.WeakValueDictionary[tuple[str, str], HFCheckpoint]" = weakref.WeakValueDictionary()
_checkpoints_lock = threading.Lock()


def shared_checkpoint(model_dir: Path, dtype: str) -> HFCheckpoint:
    """The process's ``HFCheckpoint`` for ``model_dir`` in ``dtype`` (made on first request)."""
    key = (str(model_dir.resolve()), dtype)
    with _checkpoints_lock:
        found = _checkpoints.get(key)
        if found is None:
            found = _checkpoints[key] = HFCheckpoint(model_dir, dtype)
        return found
