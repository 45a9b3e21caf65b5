"""The transformers reference backend: ``HFLM(model, adapter=None)``.

Slow next to vLLM (design.md: 70-90 output tokens/s at batch 8 on 2 cores),
kept for parity tests and for platforms without vLLM. It runs its own
decoding loop over a left-padded batch with a KV cache instead of
``model.generate`` so that every request keeps its own sampling parameters:

- greedy when ``temperature == 0``; otherwise sampling from
  ``softmax(logits / temperature)`` with a ``torch.Generator`` seeded from the
  request's seed, so that a seeded request gives the same text whatever
  batch it lands in;
- its own ``max_tokens`` (capped by the context window) and stop strings: the
  text is cut at the first stop string (finish_reason ``"stop"``), the
  tokenizer's EOS ends it too (``"stop"``), running out of tokens gives
  ``"length"``. ``output_tokens`` counts the tokens generated up to and
  including the one that stopped the request (EOS or the end of a stop
  string), as vLLM counts them;
- finished rows leave the batch (their KV cache rows are dropped).

Prompts are tokenized the way the vLLM backend does it: the tokenizer adds
its special tokens unless the text already starts with the BOS token (a chat
template that writes BOS itself). SmolLM2's tokenizer adds none either way and
its template starts with ``<|im_start|>``, which is its BOS token; a Gemma
base model gets ``<bos>`` from the tokenizer.

Adapters are PEFT folders. Every ``HFLM`` of one checkpoint and dtype in a
process shares one loaded base model; ``with_adapter`` loads the adapter into
a ``peft.PeftModel`` wrapped around that base (one named adapter each) and
switches adapters under a lock around each forward loop.

torch, transformers and peft are imported when a model is loaded, never at
``import tandem``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tandem.lm.base import LM, Completion, ContextLengthError, LMError, Prompt, Request
from tandem.lm.models import checkpoint_fingerprint, has_chat_template, resolve_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _dtype_name(dtype: Any, model_dir: Path) -> str:
    """'auto' -> the checkpoint's own dtype (float32 for the converted embedded models)."""
    if dtype is None or dtype == "auto":
        import json

        cfg = json.loads((model_dir / "config.json").read_text())
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[name]


class _Base:
    """One loaded checkpoint (tokenizer + model) shared by every HFLM on it."""

    def __init__(self, model_dir: Path, dtype: str) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.model_dir = model_dir
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        log.info("loading %s in %s with transformers", model_dir, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        eos: set[int] = set()
        try:
            gen_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json
            gen_eos = None
        for e in (gen_eos, config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(e, int):
                eos.add(e)
            elif e:
                eos.update(int(x) for x in e)
        self.eos_ids = frozenset(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(eos) if eos else 0
        self.fingerprint = checkpoint_fingerprint(model_dir)
        self.lock = threading.Lock()  # one forward loop at a time (adapters switch per loop)
        self.tok_lock = threading.Lock()  # HF tokenizers are not safe to share across threads
        self.peft: Any = None
        self.adapters: dict[str, int] = {}  # peft adapter name -> HFLM objects using it

    def encode(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        with self.tok_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=special))

    def decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add_adapter(self, adapter_dir: Path, name: str) -> None:
        with self.lock:
            if name in self.adapters:
                self.adapters[name] += 1
                return
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
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
                    self.model = self.peft.unload()
                    self.peft = None
                else:
                    if self.peft.active_adapter == name:
                        self.peft.set_adapter(next(a for a in self.peft.peft_config if a != name))
                    self.peft.delete_adapter(name)

    @contextmanager
    def active(self, adapter: str | None) -> Iterator[Any]:
        """Hold the lock with ``adapter`` (or no adapter) switched on; yields the model to call."""
        with self.lock:
            if self.peft is None:
                assert adapter is None
                yield self.model
            elif adapter is None:
                with self.peft.disable_adapter():
                    yield self.peft
            else:
                self.peft.set_adapter(adapter)
                yield self.peft


_bases: "weakref.WeakValueDictionary[tuple[str, str], _Base]" = weakref.WeakValueDictionary()
_bases_lock = threading.Lock()


def _get_base(model_dir: Path, dtype: str) -> _Base:
    key = (str(model_dir.resolve()), dtype)
    with _bases_lock:
        base = _bases.get(key)
        if base is None:
            base = _Base(model_dir, dtype)
            _bases[key] = base
        return base


@dataclass(frozen=True)
class _Tokenized(Request):
    """A request with its prompt already tokenized (by ``_enqueue``)."""

    ids: tuple[int, ...] = ()


@dataclass
class _Row:
    ids: list[int]
    max_new: int
    temperature: float
    stop: tuple[str, ...]
    generator: Any
    out: list[int]
    text: str = ""
    finish: str | None = None


class HFLM(LM):
    """transformers ``AutoModelForCausalLM`` in-process, optionally with a PEFT adapter.

    ``model``: an embedded model name or a checkpoint directory. ``batch_size``:
    rows per forward loop (the dispatcher may hand over more; they are sorted by
    length and run in chunks). ``dtype``: ``"auto"`` (the checkpoint's, float32
    for the embedded models), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """

    def __init__(
        self,
        model: str | Path = "smollm2-135m",
        adapter: str | Path | None = None,
        batch_size: int = 8,
        dtype: Any = "auto",
        cache: Any = True,
    ) -> None:
        model_dir = resolve_model(model)
        dtype_name = _dtype_name(dtype, model_dir)
        self._setup(str(model), _get_base(model_dir, dtype_name), adapter, batch_size, cache)

    def _setup(self, model: str, base: _Base, adapter: str | Path | None, batch_size: int, cache: Any) -> None:
        self.model = model
        self.adapter = Path(adapter) if adapter is not None else None
        super().__init__(f"hf:{model}" + (f"+{self.adapter.name}" if self.adapter else ""), cache=cache)
        self._base = base
        self.model_dir = base.model_dir
        self.dtype = base.dtype
        self.batch_size = max(1, int(batch_size))
        self.max_batch = max(self.batch_size, 32)
        self.context_length = base.context_length
        self._chat = has_chat_template(base.model_dir)
        fp = f"hf:{base.fingerprint}:{base.dtype}"
        self._adapter_name: str | None = None
        self._closed = False
        if self.adapter is not None:
            if not (self.adapter / "adapter_config.json").exists():
                raise ValueError(f"{self.adapter} is not a PEFT adapter folder (no adapter_config.json)")
            from tandem.train.adapter import META_FILE, check_adapter_base

            if (self.adapter / META_FILE).exists():  # trained by tandem: it names its base
                check_adapter_base(self.adapter, base.model_dir)
            afp = checkpoint_fingerprint(self.adapter)
            fp += f"+{afp}"
            self._adapter_name = f"a{afp}"
            base.add_adapter(self.adapter, self._adapter_name)
        self._fingerprint = fp

    def with_adapter(self, adapter: str | Path | None) -> "HFLM":
        """The same base weights (shared, not reloaded) with ``adapter`` (None: none)."""
        new = object.__new__(HFLM)
        new._setup(self.model, self._base, adapter, self.batch_size, self.cache if self.cache is not None else False)
        return new

    # -- protocol ------------------------------------------------------------------
    def fingerprint(self) -> str:
        return self._fingerprint

    def chat_template(self, prompt: Prompt) -> str | None:
        if not self._chat:
            return None
        msgs = [{"role": r, "content": c} for r, c in prompt.messages]
        return self._base.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids, exactly as the model sees them."""
        return self._base.encode(text)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _enqueue(self, request: Request, fut: Future, key: str | None) -> None:
        # Tokenize and check the length in the caller's thread: a prompt that
        # cannot fit fails alone, before it reaches a batch.
        try:
            ids = self.tokenize(request.text)
            self.check_fits(request, len(ids))
        except ContextLengthError as exc:
            fut.set_exception(exc)
            return
        super()._enqueue(_Tokenized(request.text, request.params, request.prompt, tuple(ids)), fut, key)

    def _generate(self, requests: list[Request]) -> list[Completion]:
        import torch

        if self._closed:
            raise LMError(f"{self.name} is closed (its adapter was released)")

        rows: list[_Row] = []
        for r in requests:
            ids = list(r.ids) if isinstance(r, _Tokenized) and r.ids else self.tokenize(r.text)
            max_new = self.check_fits(r, len(ids))
            p = r.params
            gen = None
            if p.temperature > 0 and p.seed is not None:
                gen = torch.Generator().manual_seed(int(p.seed))
            rows.append(_Row(ids, max_new, float(p.temperature), tuple(s for s in p.stop if s), gen, []))
        for row in rows:
            if row.max_new <= 0:
                row.finish = "length"
        todo = sorted((i for i, row in enumerate(rows) if row.finish is None), key=lambda i: len(rows[i].ids))
        for k in range(0, len(todo), self.batch_size):
            self._decode([rows[i] for i in todo[k:k + self.batch_size]])
        return [
            Completion(row.text, len(row.ids), len(row.out), row.finish or "length") for row in rows
        ]

    # -- the decoding loop -----------------------------------------------------------
    def _decode(self, rows: list[_Row]) -> None:
        import torch

        base = self._base
        n = len(rows)
        width = max(len(r.ids) for r in rows)
        input_ids = torch.full((n, width), base.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, width - len(r.ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        live = list(range(n))  # indices into rows of the rows still generating
        with torch.inference_mode(), base.active(self._adapter_name) as model:
            out = model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1,
            )
            cache = out.past_key_values
            next_pos = positions[:, -1] + 1
            while True:
                logits = out.logits[:, -1, :].float()
                toks = self._pick(logits, [rows[i] for i in live])
                keep = [j for j, i in enumerate(live) if not self._advance(rows[i], toks[j])]
                if not keep:
                    break
                if len(keep) < len(live):
                    idx = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(idx)
                    mask, next_pos = mask[idx], next_pos[idx]
                    toks = [toks[j] for j in keep]
                    live = [live[j] for j in keep]
                mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
                out = model(
                    input_ids=torch.tensor(toks, dtype=torch.long)[:, None], attention_mask=mask,
                    position_ids=next_pos[:, None], past_key_values=cache, use_cache=True,
                )
                next_pos = next_pos + 1

    @staticmethod
    def _pick(logits, rows: list[_Row]) -> list[int]:
        import torch

        picked = logits.argmax(dim=-1).tolist()
        for j, r in enumerate(rows):
            if r.temperature > 0:
                probs = torch.softmax(logits[j] / r.temperature, dim=-1)
                picked[j] = int(torch.multinomial(probs, 1, generator=r.generator).item())
        return picked

    def _advance(self, r: _Row, tok: int) -> bool:
        """Append ``tok`` to row ``r``; True when the row is finished."""
        r.out.append(tok)
        if tok in self._base.eos_ids:
            r.finish = "stop"
            return True
        prev = len(r.text)
        r.text = self._base.decode(r.out)
        if r.stop:
            # A stop string can end in this token's text and start in earlier ones.
            start = max(0, prev - max(len(s) for s in r.stop) + 1)
            hits = [h for h in (r.text.find(s, start) for s in r.stop) if h >= 0]
            if hits:
                r.text = r.text[: min(hits)]
                r.finish = "stop"
                return True
        if len(r.out) >= r.max_new:
            r.finish = "length"
            return True
        return False

    def close(self) -> None:
        """Release this LM's adapter (the shared base goes when its last LM does)."""
        if self._adapter_name is not None and not self._closed:
            self._closed = True
            self._base.drop_adapter(self._adapter_name)

    def __repr__(self) -> str:
        extra = f", adapter={str(self.adapter)!r}" if self.adapter else ""
        return f"HFLM({self.model!r}{extra}, dtype={self.dtype!r})"
