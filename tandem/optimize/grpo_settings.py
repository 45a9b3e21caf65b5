"""The RL step's settings, ``GRPOSettings`` (``[rl]`` in a run config); ``tandem.optimize.grpo`` uses them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from tandem.train import LoRAConfig


@dataclass(frozen=True)
class GRPOSettings:
    """The RL step's settings (``[rl]`` in a run config); ``check()`` gives one-line errors."""

    steps: int = 10  # RL steps (one update each)
    batch_size: int = 4  # training examples per step (whose rollouts differ in reward, with oversample > 1)
    oversample: int = 1  # draw batch_size x oversample examples per step and train on the first batch_size
    #   whose rollouts differ in reward (DAPO's dynamic sampling): equal-reward groups teach nothing
    rollouts: int = 4  # n: program runs per example; advantages compare them
    temperature: float = 0.7  # rollouts' sampling; at 1.0 SmolLM2-135M rambles (docs/training.md)
    learning_rate: float = 1e-4  # AdamW on the LoRA
    clip_epsilon: float = 0.2  # PPO/GRPO clip range of the ratio
    beta: float = 0.0  # KL to the base model (k3); 0 as TRL's default: no reference forward
    format_penalty: float = 0.0  # subtracted from the reward of a run whose reply did not parse
    max_tokens: int | None = None  # new tokens per LM call in rollouts; None: each predictor's own
    per_module: bool = False  # one LoRA per module instead of one per LM
    updates: int = 1  # optimizer steps per RL step on the same rollouts (mu)
    micro_batch: int = 8  # completions per forward pass (gradient accumulation)
    sync_every: int = 1  # updates between putting the new LoRA on the engine
    checkpoint_every: int | None = None  # RL steps between checkpoints (a multiple of sync_every); None: at
    #   every sync; 0: none. Also after the last step. (tandem.optimize.grpo_checkpoint)
    method: str = "lora"  # "lora": train a LoRA; "full": every weight (small models; beta must be 0)
    lora: LoRAConfig = LoRAConfig(method="lora")  # rank, alpha, targets, max_length, max_grad_norm, seed, device;
    #   its own method is not used (``method`` above decides)

    def check(self) -> "GRPOSettings":
        """Raise a one-line ValueError naming the first bad setting; return self."""
        ints = {"steps": 1, "batch_size": 1, "oversample": 1, "rollouts": 2, "updates": 1, "micro_batch": 1,
                "sync_every": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                why = " (advantages compare the rollouts of one example)" if name == "rollouts" else ""
                raise ValueError(f"RL setting `{name}` must be an integer >= {low}{why}, got {v!r}")
        for name, positive in (("temperature", True), ("learning_rate", True), ("clip_epsilon", True),
                               ("beta", False), ("format_penalty", False)):
            v = getattr(self, name)
            bad = not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
            if bad or v < 0 or (positive and v == 0):
                raise ValueError(f"RL setting `{name}` must be a number {'> 0' if positive else '>= 0'}, got {v!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ValueError(f"RL setting `max_tokens` must be an integer >= 1 (or unset), got {self.max_tokens!r}")
        ce = self.checkpoint_every
        if ce is not None and (not isinstance(ce, int) or isinstance(ce, bool) or ce < 0 or ce % self.sync_every):
            raise ValueError(f"RL setting `checkpoint_every` must be 0 (none) or a multiple of sync_every="
                             f"{self.sync_every} (a checkpoint is taken when the engine serves the trainer's "
                             f"weights), got {ce!r}")
        if not isinstance(self.per_module, bool):
            raise ValueError(f"RL setting `per_module` must be true or false, got {self.per_module!r}")
        if not isinstance(self.lora, LoRAConfig):
            raise ValueError(f"RL setting `lora` must be a LoRAConfig, got {type(self.lora).__name__}")
        if self.method not in ("lora", "full"):
            raise ValueError(f"RL setting `method` must be 'lora' or 'full', got {self.method!r}")
        if self.method == "full" and self.per_module:
            raise ValueError("RL setting `per_module` needs method = 'lora': one engine serves the modules' LoRAs, "
                             "not one fully tuned copy per module")
        if self.method == "full" and self.beta:
            raise ValueError(f"RL setting `beta` must be 0 with method = 'full' (the KL reference is the base with "
                             f"the LoRA disabled), got {self.beta!r}")
        return self

    def policy_lora(self) -> LoRAConfig:
        """The trainer's LoRAConfig: ``lora`` with ``method`` as this step's."""
        return replace(self.lora, method=self.method)

    @classmethod
    def from_dict(cls, values: dict, lora: LoRAConfig = LoRAConfig(method="lora")) -> "GRPOSettings":
        """Settings from a config table (unknown names are a one-line error), checked."""
        known = [f.name for f in fields(cls) if f.name != "lora"]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown RL setting(s) {unknown}; known: {known}")
        return cls(**values, lora=lora).check()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d
