"""The transformers reference backend: ``HFLM(model, adapter=None)``.

Slower than vLLM (docs/design.md), kept for parity tests and for platforms
without vLLM. It runs its own
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

Prompts are rendered and tokenized by ``tandem.lm.chat``, as every backend
does (BOS-aware: a chat template that writes BOS gets no second one).

Every ``HFLM`` of one checkpoint and dtype in a process shares one
``HFCheckpoint`` (``tandem.lm.hf_checkpoint``); ``with_adapter`` passes its
own, and the adapter joins the PEFT model around that base. The weights load
at the first request that reaches the model, not when the ``HFLM`` is made,
and the adapter with them. torch, transformers and peft are imported then,
never at ``import tandem``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.lm.base import BatchedLM
from tandem.lm.hf_checkpoint import HFCheckpoint, dtype_name, shared_checkpoint
from tandem.lm.identity import check_adapter_base, check_if_tandem_adapter, checkpoint_fingerprint, is_full_checkpoint
from tandem.lm.models import resolve_model
from tandem.lm.protocol import Completion, LMError, Prompt, Request, TrainableLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedRequest(Request):
    """A request with its prompt already tokenized (by ``HFLM.prepare``)."""

    ids: tuple[int, ...] = ()


@dataclass
class Row:
    """One request in the decoding loop."""

    ids: list[int]
    max_new: int
    temperature: float
    stop: tuple[str, ...]
    generator: Any
    out: list[int]
    text: str = ""
    finish: str | None = None


class HFLM(BatchedLM, TrainableLM):
    """transformers ``AutoModelForCausalLM`` in-process, optionally with a PEFT adapter.

    ``model``: an embedded model name or a checkpoint directory. ``batch_size``:
    rows per forward loop (the dispatcher may hand over more; they are sorted by
    length and run in chunks). ``dtype``: ``"auto"`` (the checkpoint's, float32
    for the embedded models), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    ``checkpoint``: an ``HFCheckpoint`` to share (``with_adapter`` passes its own).
    """

    def __init__(
        self,
        model: str | Path = "smollm2-135m",
        adapter: str | Path | None = None,
        batch_size: int = 8,
        dtype: Any = "auto",
        *,
        checkpoint: HFCheckpoint | None = None,
    ) -> None:
        if checkpoint is None:
            model_dir = resolve_model(model)
            checkpoint = shared_checkpoint(model_dir, dtype_name(dtype, model_dir))
        self.model = str(model)
        self.adapter = Path(adapter) if adapter is not None else None
        super().__init__(f"hf:{model}" + (f"+{self.adapter.name}" if self.adapter else ""))
        self.base_checkpoint = checkpoint  # what with_adapter shares
        self.model_dir = checkpoint.model_dir
        self.full = self.adapter is not None and is_full_checkpoint(self.adapter)
        if self.full:  # a checkpoint tuned in full runs in place of the base, no PEFT wrapper
            check_adapter_base(self.adapter, checkpoint.model_dir)
            checkpoint = shared_checkpoint(self.adapter, checkpoint.dtype)
        self.checkpoint = checkpoint
        self.dtype = checkpoint.dtype
        self.batch_size = max(1, int(batch_size))
        self.max_batch = max(self.batch_size, 32)
        self.context_length = checkpoint.context_length
        fp = f"hf:{checkpoint.fingerprint}:{checkpoint.dtype}"
        self._adapter_name: str | None = None
        self._adapter_added = False
        self._adapter_lock = threading.Lock()
        self._closed = False
        if self.adapter is not None and not self.full:
            if not (self.adapter / "adapter_config.json").exists():
                raise ValueError(f"{self.adapter} is not a PEFT adapter folder (no adapter_config.json) "
                                 "nor a checkpoint tandem fine-tuned in full")
            check_if_tandem_adapter(self.adapter, checkpoint.model_dir)
            afp = checkpoint_fingerprint(self.adapter)
            fp += f"+{afp}"
            self._adapter_name = f"a{afp}"
        self._fingerprint = fp

    def with_adapter(self, adapter: str | Path | None) -> "HFLM":
        """The same base weights (shared, not reloaded) with ``adapter`` (None: none)."""
        return HFLM(self.model, adapter, self.batch_size, self.dtype, checkpoint=self.base_checkpoint)

    def spec(self) -> dict:
        return {"backend": "hf", "model": self.model, "adapter": str(self.adapter) if self.adapter else None,
                "dtype": self.dtype}

    # -- protocol ------------------------------------------------------------------
    def fingerprint(self) -> str:
        return self._fingerprint

    def render(self, prompt: Prompt) -> str:
        return self.checkpoint.chat.render(prompt)

    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids, exactly as the model sees them."""
        return self.checkpoint.chat.encode(text)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def prepare(self, request: Request) -> Request:
        # Tokenized and checked in the caller's thread: a prompt that cannot
        # fit fails alone, before it reaches a batch.
        ids = self.tokenize(request.text)
        self.check_fits(request, len(ids))
        return TokenizedRequest(request.text, request.params, request.prompt, tuple(ids))

    def start(self) -> None:
        """Load the weights (and the adapter) now."""
        self._load()

    def _load(self) -> None:
        if self._closed:
            raise LMError(f"{self.name} is closed (its adapter was released)")
        self.checkpoint.load()
        if self._adapter_name is not None and not self._adapter_added:
            with self._adapter_lock:
                if not self._adapter_added:
                    self.checkpoint.add_adapter(self.adapter, self._adapter_name)
                    self._adapter_added = True

    def generate_batch(self, requests: list[Request]) -> list[Completion]:
        import torch

        self._load()
        rows: list[Row] = []
        for r in requests:
            ids = list(r.ids) if isinstance(r, TokenizedRequest) and r.ids else self.tokenize(r.text)
            max_new = self.check_fits(r, len(ids))
            p = r.params
            gen = None
            if p.temperature > 0 and p.seed is not None:
                gen = torch.Generator().manual_seed(int(p.seed))
            rows.append(Row(ids, max_new, float(p.temperature), tuple(s for s in p.stop if s), gen, []))
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
    def _decode(self, rows: list[Row]) -> None:
        import torch

        base = self.checkpoint
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
                keep = [j for j, i in enumerate(live) if not self.advance(rows[i], toks[j])]
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
    def _pick(logits, rows: list[Row]) -> list[int]:
        import torch

        picked = logits.argmax(dim=-1).tolist()
        for j, r in enumerate(rows):
            if r.temperature > 0:
                probs = torch.softmax(logits[j] / r.temperature, dim=-1)
                picked[j] = int(torch.multinomial(probs, 1, generator=r.generator).item())
        return picked

    def advance(self, r: Row, tok: int) -> bool:
        """Append ``tok`` to row ``r``; True when the row is finished."""
        r.out.append(tok)
        if tok in self.checkpoint.eos_ids:
            r.finish = "stop"
            return True
        prev = len(r.text)
        r.text = self.checkpoint.chat.decode(r.out)
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
        """Release this LM's adapter (the shared checkpoint goes when its last LM does)."""
        if self._adapter_name is not None and not self._closed:
            self._closed = True
            if self._adapter_added:
                self.checkpoint.drop_adapter(self._adapter_name)

    def __repr__(self) -> str:
        extra = f", adapter={str(self.adapter)!r}" if self.adapter else ""
        return f"HFLM({self.model!r}{extra}, dtype={self.dtype!r})"
