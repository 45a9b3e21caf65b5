"""LoRA training on SFT examples (the weight step ``w`` of BetterTogether).

    from tandem.train import LoRAConfig, SFTExample, train_lora
    result = train_lora(model_dir, [SFTExample(prompt, completion)], LoRAConfig(), "run/adapter")
    result.adapter_dir  # a PEFT folder; see tandem.train.adapter

The loss is the mean cross-entropy over completion tokens only (EOS
included). The language-model head is applied only at those positions: with
a 49k-262k-token vocabulary, a full-sequence head costs as much as the rest
of the network, and on prompts that are mostly demos and passages nearly all
of that work would be thrown away. The network body runs under bf16 autocast
where the hardware computes bf16 natively (CUDA, CPUs with AVX512-BF16 or
AMX); LoRA weights and optimizer state stay in fp32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from tandem.fileio import atomic_dir
from tandem.lm.hardware import cpu_has_native_bf16
from tandem.train.adapter import write_meta
from tandem.train.recipe import METHODS, resolve_config
from tandem.train.sft import SFTExample, TokenizedExample, tokenize_examples

if TYPE_CHECKING:
    from tandem.train.ranks import Ranks

log = logging.getLogger(__name__)

# Every linear projection of a Llama/Mistral/Gemma/Qwen block. Adapting the MLP
# as well as attention gives LoRA most of full fine-tuning's quality (QLoRA
# paper) at ~2x the adapter size, which is still small.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Memory that eager attention may keep for the backward pass (fp32 and bf16 copies
# of every layer's batch x heads x T x T probabilities) before sdpa is used instead.
EAGER_ATTENTION_BYTES = 2 << 30


class NothingToTrain(ValueError):
    """No usable SFT example: none given, or all longer than ``max_length``.

    A weight step after a zero-shot program that passed no training example
    ends here (the paper's "-" cells); callers skip the step and say so.
    """


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 32  # the paper's setting; enough capacity for a few thousand examples
    alpha: int = 64  # the paper's; alpha/rank = 2 scales the adapter's update
    dropout: float = 0.0  # the paper's; 5 short epochs over ~100s of examples barely overfit
    target_modules: tuple[str, ...] = ALL_LINEAR  # attention + MLP: see ALL_LINEAR
    # None: the method's measured default (tandem.train.recipe.METHOD_DEFAULTS; docs/training.md).
    epochs: int | None = None
    batch_size: int | None = None  # examples per optimizer step
    learning_rate: float | None = None
    # Linear warm-up (Adam's first steps are the noisiest), then constant: these
    # runs are a few dozen steps, and a decay would spend half of them at a tiny rate.
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0  # LoRA starts at zero and runs are short: nothing to regularise towards
    max_grad_norm: float = 1.0  # guards against a rare huge step on a long, unusual example
    max_length: int = 2048  # tokens (prompt + completion); longer examples are dropped, with a warning
    seed: int = 0  # LoRA initialisation and example order
    bf16: bool | None = None  # None: bf16 autocast where the hardware has native bf16 (see bf16_supported)
    device: str | None = None  # None: cuda if available, else cpu
    # "lora": a PEFT adapter on the frozen base; "full": every weight is trained and
    # the result is a full checkpoint; "auto": full up to FULL_MAX_PARAMS parameters,
    # else lora (tandem.train.recipe; docs/training.md compares them).
    method: str = "auto"
    # None: "eager" on CPU while its attention matrices fit in EAGER_ATTENTION_BYTES
    # (torch's fused CPU attention has a slow backward; docs/training.md), otherwise "sdpa".
    attention: str | None = None
    # Training processes on one machine (data parallel, DDP); above 1, train_lora starts them
    # with torchrun. batch_size stays the global batch, split over them (tandem.train.launch).
    processes: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"[lora] method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not isinstance(self.processes, int) or self.processes < 1:
            raise ValueError(f"[lora] processes must be a whole number >= 1, not {self.processes!r}")
        if self.batch_size is not None and self.processes > self.batch_size:
            raise ValueError(f"[lora] processes = {self.processes} is more than batch_size = {self.batch_size}: "
                             "each process takes part of every batch; raise batch_size or lower processes")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class TrainResult:
    adapter_dir: Path
    n_examples: int  # examples trained on (after dropping too-long ones)
    n_dropped: int  # examples dropped for exceeding max_length
    steps: int
    completion_tokens: int  # tokens the loss was computed on, summed over all epochs
    total_tokens: int  # prompt + completion tokens processed (no padding), all epochs
    losses: list[float]  # mean completion loss of each optimizer step
    wall_s: float  # training loop only (model loading and saving excluded)
    trainable_params: int
    bf16: bool
    attention: str
    modules: dict[str, int] = field(default_factory=dict)  # examples per module

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir)
        return d

    @classmethod
    def from_training(cls, adapter_dir: Path, training: dict) -> "TrainResult":
        """The result a training summary (``tandem_adapter.json``'s ``training``) records."""
        known = {f for f in cls.__dataclass_fields__ if f != "adapter_dir"}
        return cls(adapter_dir=Path(adapter_dir), **{k: v for k, v in training.items() if k in known})


def bf16_supported(device: str) -> bool:
    """Whether bf16 matmuls run natively (fast) on ``device``.

    On CPUs without AVX512-BF16 or AMX, oneDNN emulates bf16 and is slower
    than fp32, so the flags are checked, not just whether bf16 works at all.
    """
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return device == "cpu" and cpu_has_native_bf16()


def pick_attention(config: LoRAConfig, device: str, model_config, longest: int) -> str:
    """The attention implementation for training; see ``LoRAConfig.attention``."""
    if config.attention is not None:
        return config.attention
    if device != "cpu":
        return "sdpa"
    heads = model_config.num_attention_heads * model_config.num_hidden_layers
    need = config.batch_size * heads * longest**2 * 6
    return "eager" if need <= EAGER_ATTENTION_BYTES else "sdpa"


def _batches(examples: list[TokenizedExample], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: seeded shuffle, then length-sorted within groups of 8 batches.

    Sorting within a group keeps padding low; shuffling before grouping and
    shuffling the batch order after keep the epoch random.
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    group = batch_size * 8
    batches = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g : g + group], key=lambda i: len(examples[i]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate_batch(examples: list[TokenizedExample], pad_id: int, device):
    """Right-padded ids, attention mask, and the completion-token mask of a batch (one row per example)."""
    import torch

    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        attn[row, : len(e)] = 1
        target[row, e.n_prompt : len(e)] = True
    return ids.to(device), attn.to(device), target.to(device)


def target_logits(causal_lm, ids, attn, target):
    """Logits (fp32) for every position marked in ``target``, row by row: ``(n_targets, vocab)``.

    Runs the transformer body on the whole sequence but the LM head only on
    the hidden states that predict a target token (position t-1 predicts t).
    Returns the logits and the target token ids, in the same order.
    """
    hidden = causal_lm.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    predicts = target[:, 1:]  # hidden state at t predicts token t+1
    h = hidden[:, :-1][predicts]
    return causal_lm.get_output_embeddings()(h).float(), ids[:, 1:][predicts]


def completion_loss(causal_lm, ids, attn, target):
    """Mean cross-entropy over the positions marked in ``target`` (``target_logits``)."""
    import torch.nn.functional as F

    logits, tokens = target_logits(causal_lm, ids, attn, target)
    return F.cross_entropy(logits, tokens)


def completion_logprobs(causal_lm, ids, attn, target):
    """Log-probability of each token marked in ``target``, flat in row-major order (``target_logits``)."""
    logits, tokens = target_logits(causal_lm, ids, attn, target)
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def train_lora(
    model_dir: str | os.PathLike,
    examples: Sequence[SFTExample],
    config: LoRAConfig = LoRAConfig(),
    out_dir: str | os.PathLike = "adapter",
    progress: Callable[[int, int, float], None] | None = None,
    *,
    overwrite: bool = False,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` and save it as a PEFT folder in ``out_dir`` (or, with
    ``method="full"``, every weight, saved as a whole checkpoint; ``"auto"`` chooses by model size).

    ``progress(step, total_steps, loss)`` is called after every optimizer
    step. Raises NothingToTrain when no example is usable, FileExistsError
    when ``out_dir`` holds files (unless ``overwrite``).

    With ``config.processes > 1`` (and no ``ranks``), training runs in that
    many processes started by torchrun (``tandem.train.launch``), and this
    returns what they saved. ``ranks`` (``tandem.train.ranks.join``) makes
    this call one rank of such a group: it trains its share of every global
    batch under DDP; rank 0 reports progress and writes the adapter.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = resolve_config(config, model_dir)
    if not examples:
        raise NothingToTrain("no SFT examples to train on (no trace passed the metric?)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds files; pick a new directory or pass overwrite=True")

    device = ranks.device if ranks else config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = bf16_supported(device) if config.bf16 is None else config.bf16
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data, n_dropped = tokenize_examples(tokenizer, examples, config.max_length)
    if not data:
        raise NothingToTrain(
            f"all {len(examples)} SFT examples are longer than max_length={config.max_length} tokens"
        )
    pad_id = padding_id(tokenizer)
    if ranks is None and config.processes > 1:
        from tandem.train.launch import launch

        return TrainResult.from_training(out_dir, launch(model_dir, examples, config, out_dir, progress,
                                                                 overwrite=overwrite))
    main = ranks is None or ranks.is_main

    attention = pick_attention(config, device, AutoConfig.from_pretrained(model_dir), max(map(len, data)))
    base, model = load_trainable(model_dir, config, device=device, bf16=use_bf16, attention=attention)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_ratio * total_steps)) if config.warmup_ratio > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    net = ranks.wrap(base) if ranks else None
    (log.info if main else log.debug)(
        "%s on %s: %d examples (%d dropped), %d steps, lr %g, %s, %s attention, %s trainable params",
        f"LoRA r={config.rank}" if config.method == "lora" else "full fine-tuning", model_dir.name, len(data),
        n_dropped, total_steps, config.learning_rate,
        "bf16" if use_bf16 else "fp32", attention, f"{trainable:,}",
    )

    causal_lm = base
    rng = random.Random(config.seed)
    losses: list[float] = []
    completion_tokens = total_tokens = 0
    model.train()
    start = time.perf_counter()
    for _epoch in range(config.epochs):
        for batch in _batches(data, config.batch_size, rng):
            rows = [data[i] for i in batch]
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
                if ranks is None:
                    loss = completion_loss(causal_lm, *collate_batch(rows, pad_id, device))
                else:
                    loss, value = ranks.batch_loss(net, rows, pad_id)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item() if ranks is None else value)
            completion_tokens += sum(r.n_completion for r in rows)
            total_tokens += sum(len(r) for r in rows)
            if progress is not None and main:
                progress(len(losses), total_steps, losses[-1])
            log.debug("step %d/%d loss %.4f", len(losses), total_steps, losses[-1])
    wall = time.perf_counter() - start

    modules: dict[str, int] = {}
    for d in data:
        modules[d.module] = modules.get(d.module, 0) + 1
    result = TrainResult(
        adapter_dir=out_dir, n_examples=len(data), n_dropped=n_dropped, steps=len(losses),
        completion_tokens=completion_tokens, total_tokens=total_tokens, losses=losses,
        wall_s=wall, trainable_params=trainable, bf16=use_bf16, attention=attention, modules=modules,
    )
    training = result.to_dict()
    training.pop("adapter_dir")
    training["final_loss"] = result.losses[-1]
    if main:
        save_trained(model, model_dir, out_dir, config, training)
    if ranks:
        ranks.barrier()  # every rank returns once the adapter is on disk
    (log.info if main else log.debug)("trained %d steps in %.1fs (%.0f tokens/s), loss %.3f -> %.3f; saved %s",
             result.steps, wall, result.tokens_per_s, losses[0], losses[-1], out_dir)
    return result


def padding_id(tokenizer) -> int:
    """The id right-padding uses: the tokenizer's pad token, else its EOS (padding is masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_trainable(model_dir: str | os.PathLike, config: LoRAConfig, *, device: str, bf16: bool, attention: str,
                   adapter: str | os.PathLike | None = None):
    """The model to train, on ``device``: ``(causal_lm, model)``.

    ``causal_lm`` is the transformers model whose body and head the losses
    run (``completion_loss``); ``model`` is what trains and saves: a peft
    model with a fresh LoRA from ``config`` (initialised from ``config.seed``),
    or with ``adapter``'s LoRA loaded trainable when one is given, or the base
    itself for ``method="full"``. With bf16 the frozen base is stored in bf16
    (autocast would otherwise re-cast every fp32 weight on each forward);
    peft keeps the LoRA weights in fp32.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if config.method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full' here (resolve 'auto' first), not {config.method!r}")
    full = config.method == "full"
    base = AutoModelForCausalLM.from_pretrained(  # full fine-tuning keeps fp32 master weights
        model_dir, dtype=torch.bfloat16 if bf16 and not full else torch.float32, attn_implementation=attention,
    ).to(device)
    torch.manual_seed(config.seed)  # LoRA's A matrices are initialised randomly
    if full:
        return base, base
    if adapter is not None:
        return base, PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    return base, get_peft_model(base, PeftLoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM",
    ))


def save_trained(model, model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: LoRAConfig,
                 training: dict) -> None:
    """PEFT files + tandem_adapter.json (``training``: the run's summary), written under a temporary
    name then renamed, so a killed run leaves no half adapter."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if config.method == "full":  # a whole checkpoint: the engine also needs the tokenizer and tandem.json
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
            info = json.loads((model_dir / "tandem.json").read_text()) if (model_dir / "tandem.json").exists() else {}
            info.update(name=f"{info.get('name', model_dir.name)}+full-{out_dir.name}", finetuned_from=str(model_dir))
            (tmp / "tandem.json").write_text(json.dumps(info, indent=1))
        write_meta(tmp, model_dir, config.to_dict(), training)
