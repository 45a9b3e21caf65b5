"""GRPO updates on a LoRA (or every weight): the trainer of the RL step ``r`` (rollouts: tandem.optimize.grpo).

    policy = Policy(model_dir, LoRAConfig(), learning_rate=1e-4, clip_epsilon=0.2, beta=0.0)
    stats = policy.update([PolicyItem(prompt, completion, advantage=0.7, module="solve", weight=0.25)])
    policy.save("out/adapter", {"step": 3})

An item is one module call of one rollout: the prompt the engine saw, the
completion it sampled, the rollout's advantage, and the item's weight in the
loss (the optimizer gives each module's items equal total weight, mmGRPO
style; weights should sum to 1). ``update(items)``:

1. tokenizes every item as SFT data is (``tandem.train.sft``: prompt and
   completion apart, then EOS, so a completion is trained to stop); items
   over ``max_length`` tokens are dropped and counted;
2. computes, without gradients, the log-probability of every completion
   token under the current policy (``old``, the policy the rollouts came
   from when the engine has the latest weights: no engine log-probs needed;
   skipped with one optimizer step and no dropout, where it equals the
   training forward's, detached) and, when ``beta > 0``, under the base
   model with the adapter disabled (the reference);
3. takes ``updates`` optimizer steps (mu), each over all items in
   micro-batches with gradient accumulation, minimizing ``grpo_token_loss``
   averaged over each completion's tokens, then summed over items with their
   weights.

With one step per update (the default, as TRL's ``num_iterations=1``) the
ratio is 1 at that step and the clip never acts: the loss is then the
policy gradient ``-A * log p`` per token. The clip matters for ``updates >
1`` and when the engine lags behind the trainer (the optimizer's
``sync_every > 1``). ``beta`` defaults to 0 (no KL term and no reference
forward), as TRL's GRPO default and recent GRPO practice (DAPO, Dr. GRPO).

The model body runs under bf16 autocast where the hardware has native bf16
(``tandem.train.lora.bf16_supported``); the LoRA weights and AdamW state are
fp32. ``save`` writes the folder ``train_lora`` writes (PEFT files plus
``tandem_adapter.json``), so every backend's ``with_adapter`` loads it.
``save_state`` / ``load_state`` write and read a checkpoint: that LoRA plus
the AdamW state, so a resumed run trains on as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tandem.lm.identity import is_full_checkpoint
from tandem.train.lora import (
    LoRAConfig, bf16_supported, collate_batch, completion_logprobs, load_trainable, padding_id, pick_attention,
    save_trained,
)
from tandem.train.sft import SFTExample, tokenize_example

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer.pt"  # save_state's AdamW state, update count, attention and RNG


@dataclass(frozen=True)
class PolicyItem:
    prompt: str  # the rendered prompt, exactly as the engine saw it
    completion: str  # the text it sampled after the prompt
    advantage: float  # the rollout's advantage (every call of a rollout shares it)
    module: str = ""  # the predictor that made the call
    weight: float = 1.0  # the item's weight in the loss (the optimizer's weights sum to 1)


@dataclass
class UpdateStats:
    items: int  # items trained on (after dropping too-long ones)
    dropped: int  # items over max_length
    tokens: int  # completion tokens (EOS included) the loss covered, per optimizer step
    loss: float  # the weighted loss of the last optimizer step
    kl: float | None  # mean k3 estimate per token against the base (None when beta == 0)
    clip_fraction: float  # share of tokens whose ratio lay outside [1 - eps, 1 + eps], last optimizer step
    grad_norm: float  # before clipping, last optimizer step
    wall_s: float

    def to_dict(self) -> dict:
        return dict(vars(self))


def grpo_token_loss(logp, old_logp, advantages, *, clip_epsilon: float, beta: float = 0.0, ref_logp=None):
    """Per-token GRPO loss (1-D tensors of equal length; ``advantages`` is each token's completion's).

    ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` with ``ratio =
    exp(logp - old_logp)``, plus ``beta * k3`` where ``k3 = exp(ref - logp) -
    (ref - logp) - 1`` (Schulman's unbiased, non-negative KL estimator, as in
    DeepSeekMath's GRPO) when ``beta > 0`` and ``ref_logp`` is given.
    """
    import torch

    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if beta and ref_logp is not None:
        diff = ref_logp - logp
        loss = loss + beta * (torch.exp(diff) - diff - 1.0)
    return loss


class Policy:
    """A LoRA on ``model_dir``'s weights (or, with ``lora.method == "full"``, every weight), trained by
    GRPO updates; loaded at the first ``update``.

    ``adapter``: start from this LoRA (trainable) instead of a fresh one, for
    an RL step after a weight step; the reference for the KL term is still
    the base model. With ``method="full"`` it is a checkpoint tuned in full
    (``train_lora``'s), whose weights the policy starts from; there is no
    reference model then, so ``beta`` must be 0. The AdamW state lives as
    long as the object, across updates.
    """

    def __init__(self, model_dir: str | os.PathLike, lora: LoRAConfig = LoRAConfig(), *, learning_rate: float = 1e-4,
                 clip_epsilon: float = 0.2, beta: float = 0.0, updates: int = 1, micro_batch: int = 8,
                 adapter: str | os.PathLike | None = None) -> None:
        if lora.processes > 1:
            log.warning("[lora] processes = %d: only the weight step trains across processes; "
                        "the RL step trains in this one", lora.processes)
        self.model_dir = Path(model_dir)
        # "full" trains every weight; anything else ("auto" included) trains a LoRA.
        self.lora = replace(lora, method="full" if lora.method == "full" else "lora")
        self.full = self.lora.method == "full"
        if self.full and beta:
            raise ValueError("RL setting `beta` > 0 needs a LoRA (its reference is the base with the adapter "
                             "disabled); with method = \"full\" set beta = 0")
        self.learning_rate = learning_rate
        self.clip_epsilon = clip_epsilon
        self.beta = beta
        self.updates = updates
        self.micro_batch = micro_batch
        self.adapter = Path(adapter) if adapter is not None else None
        # Checked before any rollout, not at the first update.
        if self.adapter is not None and not self.full and is_full_checkpoint(self.adapter):
            raise ValueError(f"the RL step trains a LoRA on the program's weights, but {self.adapter} is a checkpoint "
                             "tuned in full; set [rl] method = \"full\", or run the weight step before it with "
                             "[lora] method = \"lora\"")
        if self.adapter is not None and self.full and not is_full_checkpoint(self.adapter):
            raise ValueError(f"[rl] method = \"full\" trains every weight, but the program serves the LoRA "
                             f"{self.adapter}; use [rl] method = \"lora\" after a LoRA weight step")
        self.n_updates = 0
        self.trainable_params = 0
        self._model = None

    # -- loading -----------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        """Whether the model is loaded (after the first update): only then is there state to save."""
        return self._model is not None

    def _load(self, longest: int, *, source: Path | None = None, attention: str | None = None) -> None:
        """Load the model with a LoRA: ``source`` (a checkpoint's) or ``adapter`` or a fresh one."""
        import torch
        from transformers import AutoConfig, AutoTokenizer

        cfg = self.lora
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = bf16_supported(self.device) if cfg.bf16 is None else cfg.bf16
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = padding_id(self.tokenizer)
        # Attention is chosen once, for the first update's longest item (micro-batch rows).
        self.attention = attention or pick_attention(replace(cfg, batch_size=self.micro_batch), self.device,
                                                     AutoConfig.from_pretrained(self.model_dir), longest)
        if self.adapter is not None and (self.adapter / "tandem_adapter.json").exists():
            from tandem.train.adapter import check_adapter_base

            check_adapter_base(self.adapter, self.model_dir)
        start = source or self.adapter
        if self.full:  # every weight, from the base or a checkpoint tuned in full
            self._causal_lm, self._model = load_trainable(start or self.model_dir, cfg, device=self.device,
                                                          bf16=self.bf16, attention=self.attention)
        else:
            self._causal_lm, self._model = load_trainable(self.model_dir, cfg, device=self.device, bf16=self.bf16,
                                                          attention=self.attention, adapter=start)
        if self.adapter is not None and not self.full:  # the adapter's own shape, for the saved metadata
            pc = self._model.peft_config["default"]
            self.lora = replace(cfg, rank=pc.r, alpha=pc.lora_alpha, dropout=pc.lora_dropout,
                                target_modules=tuple(sorted(pc.target_modules)))
        self._params = [p for p in self._model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self._params)
        self._opt = torch.optim.AdamW(self._params, lr=self.learning_rate, weight_decay=cfg.weight_decay)

    # -- log-probs ---------------------------------------------------------------------
    def _autocast(self):
        import torch

        return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16)

    def _logprobs(self, rows):
        """Flat completion-token log-probs of ``rows`` and each token's row index."""
        ids, attn, target = collate_batch(rows, self.pad_id, self.device)
        with self._autocast():
            logp = completion_logprobs(self._causal_lm, ids, attn, target)
        return logp, target[:, 1:].nonzero(as_tuple=True)[0]

    def logprob(self, prompt: str, completion: str) -> float:
        """Summed log-probability of ``completion`` + EOS after ``prompt`` under the current policy."""
        import torch

        tok = tokenize_example(self._tokenizer(), SFTExample(prompt, completion))
        if self._model is None:
            self._load(len(tok))
        self._model.eval()
        with torch.no_grad():
            return float(self._logprobs([tok])[0].sum())

    def _tokenizer(self):
        if self._model is not None:
            return self.tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    # -- the update ---------------------------------------------------------------------
    def update(self, items: list[PolicyItem]) -> UpdateStats | None:
        """GRPO on ``items`` (module docstring); None when every item is too long or none is given."""
        import torch

        start = time.perf_counter()
        tokenizer = self._tokenizer()
        kept, dropped = [], 0
        for it in items:
            tok = tokenize_example(tokenizer, SFTExample(it.prompt, it.completion, it.module))
            if len(tok) > self.lora.max_length or tok.n_prompt == 0:
                dropped += 1
            else:
                kept.append((tok, it))
        if dropped:
            log.warning("RL update: dropped %d of %d items longer than max_length=%d tokens",
                        dropped, len(items), self.lora.max_length)
        if not kept:
            return None
        if self._model is None:
            self._load(max(len(t) for t, _ in kept))
        kept.sort(key=lambda p: len(p[0]))  # micro-batches of similar length: less padding
        batches = [kept[i:i + self.micro_batch] for i in range(0, len(kept), self.micro_batch)]

        # With one optimizer step the weights that sampled are the weights that train: old = logp.detach()
        # (ratio 1), so the no-grad forward is skipped, as TRL does for num_iterations = 1. LoRA dropout
        # would make the two forwards differ; then it is kept.
        reuse = self.updates == 1 and (self.full or not self.lora.dropout)
        self._model.eval()
        old, ref = [], []
        with torch.no_grad():
            for b in batches:
                if not reuse:
                    old.append(self._logprobs([t for t, _ in b])[0].detach())
                if self.beta:
                    with self._model.disable_adapter():
                        ref.append(self._logprobs([t for t, _ in b])[0].detach())

        self._model.train()
        tokens = sum(t.n_completion for t, _ in kept)
        for _ in range(self.updates):
            total = clipped = kl_sum = 0.0
            for bi, b in enumerate(batches):
                logp, row = self._logprobs([t for t, _ in b])
                old_b = logp.detach() if reuse else old[bi]
                adv = torch.tensor([it.advantage for _, it in b], device=logp.device)[row]
                weight = torch.tensor([it.weight for _, it in b], device=logp.device)
                per_token = grpo_token_loss(logp, old_b, adv, clip_epsilon=self.clip_epsilon, beta=self.beta,
                                            ref_logp=ref[bi] if self.beta else None)
                counts = torch.zeros(len(b), device=logp.device).index_add_(0, row, torch.ones_like(logp))
                per_item = torch.zeros(len(b), device=logp.device).index_add_(0, row, per_token) / counts
                loss = (per_item * weight).sum()
                loss.backward()
                total += loss.item()
                with torch.no_grad():
                    ratio = torch.exp(logp - old_b)
                    clipped += float(((ratio - 1.0).abs() > self.clip_epsilon).sum())
                    if self.beta:
                        diff = ref[bi] - logp
                        kl_sum += float((torch.exp(diff) - diff - 1.0).sum())
            max_norm = self.lora.max_grad_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
            self._opt.step()
            self._opt.zero_grad(set_to_none=True)
        self.n_updates += 1
        return UpdateStats(
            items=len(kept), dropped=dropped, tokens=tokens, loss=total,
            kl=kl_sum / tokens if self.beta else None, clip_fraction=clipped / tokens, grad_norm=grad_norm,
            wall_s=time.perf_counter() - start,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def save_state(self, out_dir: str | os.PathLike) -> Path:
        """Everything a later ``load_state`` needs to train on exactly as this object would: the LoRA
        (``adapter/``, as ``save`` writes it) and ``trainer.pt`` (the AdamW state, the update count,
        the attention implementation and torch's CPU RNG state, which LoRA dropout draws from)."""
        import torch

        out = Path(out_dir)
        self.save(out / "adapter", {"checkpoint": True})
        torch.save({"optimizer": self._opt.state_dict(), "n_updates": self.n_updates, "attention": self.attention,
                    "torch_rng": torch.get_rng_state()}, out / TRAINER_STATE)
        return out

    def load_state(self, state_dir: str | os.PathLike) -> None:
        """Load the model with the LoRA and AdamW state ``save_state`` wrote (the RNG too, if the LoRA
        has dropout); ``adapter`` stays the one the policy started from (its saved metadata names it)."""
        import torch

        state_dir = Path(state_dir)
        state = torch.load(state_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
        self._load(0, source=state_dir / "adapter", attention=state["attention"])
        self._opt.load_state_dict(state["optimizer"])
        self.n_updates = int(state["n_updates"])
        if self.lora.dropout:
            torch.set_rng_state(state["torch_rng"])

    def save(self, out_dir: str | os.PathLike, training: dict | None = None) -> Path:
        """The current LoRA as ``train_lora`` saves it (PEFT files + tandem_adapter.json); returns the folder."""
        if self._model is None:
            raise RuntimeError("nothing to save: the policy has not been updated yet")
        out = Path(out_dir)
        summary = {"method": "grpo", "updates": self.n_updates, "learning_rate": self.learning_rate,
                   "clip_epsilon": self.clip_epsilon, "beta": self.beta, "optimizer_steps_per_update": self.updates,
                   "initial_adapter": str(self.adapter) if self.adapter else None,
                   "trainable_params": self.trainable_params, "bf16": self.bf16, "attention": self.attention,
                   **(training or {})}
        save_trained(self._model, self.model_dir, out, self.lora, summary)
        return out

