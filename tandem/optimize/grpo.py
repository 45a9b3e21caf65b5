"""The RL weight step ``r``: multi-module GRPO on a LoRA of the program's LM.

    rl = GRPO(metric, GRPOSettings(steps=10, batch_size=4, rollouts=4))
    result = rl.compile(program, trainset=train, valset=val, seed=0, out_dir="run/rl")

Each step takes ``batch_size`` training examples (a seeded shuffle, cycled
as epochs) and runs the whole program ``rollouts`` times on each, sampled on
the engine at ``temperature`` with a seed per (step seed, step, rollout), under
a trace. Reward = the metric with the trace (floats allowed, e.g. F1); a
reply that does not parse scores ``-format_penalty``; a metric that raises or
returns a non-number, or a program that raises, scores 0 and is counted; an
engine error drops the rollout from its group (not the policy's doing).
Advantage = (reward - group mean) / (group std + 1e-4) over one example's
rollouts (sample std, as TRL); a group whose rewards are all equal teaches
nothing and is left out (counted). Every module call of a rollout, the one
whose reply did not parse included, gets the rollout's advantage; the calls
are grouped per module (mmGRPO, Ziems et al. 2025): each module's calls
share one equal part of the loss. The update is tandem.train.grpo's clipped
policy gradient on one LoRA per LM the program uses (multi-task, as the weight
step), or one per module (``per_module``). After every ``sync_every``
updates (and after the last) the LoRA is saved and put on the program's LM
with ``with_adapter``, the path the weight step uses (merge-and-reload on CPU
vLLM), so the next rollouts sample from the new weights.

An LM that already has an adapter (``w -> r``) is trained on from it; the
KL reference is the base model. Prompts (demos included) are kept as they
are: the program is trained as it runs. Per step, ``rl_history.json`` in
``out_dir`` records the mean reward, the share of zero-variance groups, the
loss, failures and wall times.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from tandem.evaluate.evaluate import Metric, run_example
from tandem.lm.base import LM, Usage
from tandem.optimize.base import CompileResult, Progress, StepRecord, check_dataset
from tandem.program.example import Example
from tandem.program.module import Module
from tandem.program.predict import sampling_override
from tandem.train import LoRAConfig
from tandem.train.grpo import Policy, PolicyItem

log = logging.getLogger(__name__)

ADV_EPS = 1e-4  # added to the group's std (TRL's value)


@dataclass(frozen=True)
class GRPOSettings:
    """The RL step's settings (``[rl]`` in a run config); ``check()`` gives one-line errors."""

    steps: int = 10  # RL steps (one update each)
    batch_size: int = 4  # training examples per step
    rollouts: int = 4  # n: program runs per example; advantages compare them
    temperature: float = 0.7  # rollouts' sampling; at 1.0 SmolLM2-135M rambles (docs/training.md)
    learning_rate: float = 1e-4  # AdamW on the LoRA; not measured yet
    clip_epsilon: float = 0.2  # PPO/GRPO clip range of the ratio
    beta: float = 0.0  # KL to the base model (k3); 0 as TRL's default: no reference forward
    format_penalty: float = 0.0  # subtracted from the reward of a run whose reply did not parse
    max_tokens: int | None = None  # new tokens per LM call in rollouts; None: each predictor's own
    per_module: bool = False  # one LoRA per module instead of one per LM
    updates: int = 1  # optimizer steps per RL step on the same rollouts (mu)
    micro_batch: int = 8  # completions per forward pass (gradient accumulation)
    sync_every: int = 1  # updates between putting the new LoRA on the engine
    lora: LoRAConfig = LoRAConfig()  # rank, alpha, targets, max_length, max_grad_norm, seed, device

    def check(self) -> "GRPOSettings":
        """Raise a one-line ValueError naming the first bad setting; return self."""
        ints = {"steps": 1, "batch_size": 1, "rollouts": 2, "updates": 1, "micro_batch": 1, "sync_every": 1}
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
        if not isinstance(self.per_module, bool):
            raise ValueError(f"RL setting `per_module` must be true or false, got {self.per_module!r}")
        if not isinstance(self.lora, LoRAConfig) or self.lora.method != "lora":
            raise ValueError("RL setting `lora` must be a LoRAConfig with method 'lora': the RL step trains a LoRA")
        return self

    @classmethod
    def from_dict(cls, values: dict, lora: LoRAConfig = LoRAConfig()) -> "GRPOSettings":
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


@dataclass
class Rollout:
    example: int  # index in the step's batch
    reward: float
    failure: str | None
    entries: list  # TraceEntry: every call, the unparsed one included
    advantage: float | None = None  # None: its group teaches nothing, or an engine error


def group_advantages(rewards: list[float]) -> list[float] | None:
    """``(r - mean) / (std + 1e-4)`` with the sample std; None when all rewards are equal (no signal)."""
    if len(rewards) < 2 or max(rewards) - min(rewards) <= 1e-12:
        return None
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / (std + ADV_EPS) for r in rewards]


def module_weights(items: list[PolicyItem]) -> list[PolicyItem]:
    """``items`` reweighted so each module's calls share an equal part of the loss (weights sum to 1)."""
    per_module: dict[str, int] = {}
    for it in items:
        per_module[it.module] = per_module.get(it.module, 0) + 1
    return [replace(it, weight=1.0 / (len(per_module) * per_module[it.module])) for it in items]


def _base_lm(lm: LM) -> LM:
    return lm.with_adapter(None) if getattr(lm, "adapter", None) is not None and hasattr(lm, "with_adapter") else lm


class GRPO:
    """The RL step (tandem.optimize.base.Optimizer); ``policy_factory`` stands in for ``Policy`` in tests."""

    restarts_prompts = False  # it trains the program as it runs, prompts included

    def __init__(self, metric: Metric, settings: GRPOSettings | None = None, *, num_threads: int = 64,
                 out_dir: str | Path | None = None, policy_factory=Policy, **overrides) -> None:
        settings = settings or GRPOSettings()
        unknown = sorted(set(overrides) - {f.name for f in fields(GRPOSettings)})
        if unknown:
            raise ValueError(f"unknown RL setting(s) {unknown}; known: {[f.name for f in fields(GRPOSettings)]}")
        self.settings = replace(settings, **overrides).check()
        self.metric = metric
        self.num_threads = num_threads
        self.out_dir = Path(out_dir) if out_dir else None
        self.policy_factory = policy_factory

    # -- rollouts -----------------------------------------------------------------------
    def rollouts(self, program: Module, batch: list[Example], step: int, seed: int, usage: Usage) -> list[Rollout]:
        """``rollouts`` seeded, sampled runs of ``program`` per example of ``batch``, run concurrently."""
        s = self.settings
        jobs = [(i, k) for i in range(len(batch)) for k in range(s.rollouts)]
        params = {"temperature": s.temperature, **({"max_tokens": s.max_tokens} if s.max_tokens else {})}

        def run(job: tuple[int, int]) -> tuple[Rollout, Usage]:
            i, k = job
            sample_seed = random.Random(f"{seed}:{step}:{k}").randrange(2**31)
            with sampling_override(**params, seed=sample_seed):
                rec, t = run_example(program, batch[i], self.metric, i, metric_trace=True)
            if rec.failure is None:
                reward = rec.score
            elif rec.failure == "parse":
                reward = -s.format_penalty
            else:
                reward = 0.0
            return Rollout(i, reward, rec.failure, list(t.entries) + list(t.unparsed)), t.usage

        with ThreadPoolExecutor(max_workers=max(1, min(self.num_threads, len(jobs)))) as pool:
            done = list(pool.map(run, jobs))
        for _, u in done:
            usage.merge(u)
        return [r for r, _ in done]

    # -- the step -----------------------------------------------------------------------
    def compile(self, program: Module, *, trainset: list[Example], valset: list[Example] | None = None,
                seed: int = 0, progress: Progress | None = None, out_dir: str | Path | None = None) -> CompileResult:
        """``steps`` RL steps on ``trainset``; ``valset`` is not used (BetterTogether scores the result)."""
        check_dataset("trainset", trainset)
        s = self.settings
        out_dir = Path(out_dir or self.out_dir or "rl")
        start = time.perf_counter()
        new = program.deepcopy()
        preds = dict(new.named_predictors())
        groups = self._policy_groups(preds)  # before anything slow: a remote LM is an error here
        lora = s.lora if s.lora.seed == seed else replace(s.lora, seed=seed)
        policies = {key: self.policy_factory(
            g["base"].model_dir, lora, learning_rate=s.learning_rate, clip_epsilon=s.clip_epsilon, beta=s.beta,
            updates=s.updates, micro_batch=s.micro_batch, adapter=g["adapter"]) for key, g in groups.items()}
        module_key = {name: key for key, g in groups.items() for name in g["modules"]}

        rng = random.Random(seed)
        order: list[int] = []
        usage = Usage()
        history: list[dict] = []
        pending: set[str] = set()  # groups updated since their LoRA last reached the engine
        served: dict[str, tuple[LM, Path]] = {}
        items_total = updates_total = 0
        for step in range(s.steps):
            t0 = time.perf_counter()
            while len(order) < s.batch_size:  # epochs of a seeded shuffle
                more = list(range(len(trainset)))
                rng.shuffle(more)
                order += more
            batch_ids, order = order[:s.batch_size], order[s.batch_size:]
            runs = self.rollouts(new, [trainset[i] for i in batch_ids], step, seed, usage)
            rollout_s = time.perf_counter() - t0
            rec = self._advantages(runs, len(batch_ids))
            items: dict[str, list[PolicyItem]] = {}
            unknown = 0
            for r in runs:
                if r.failure == "lm" or r.advantage is None:
                    continue
                for e in r.entries:
                    key = module_key.get(e.predictor)
                    if key is None:
                        unknown += 1
                        continue
                    items.setdefault(key, []).append(PolicyItem(e.prompt, e.completion, r.advantage, e.predictor))
            rec.update(step=step + 1, examples=batch_ids, rollout_s=round(rollout_s, 2), untrained_calls=unknown,
                       items={k: len(v) for k, v in items.items()}, updates={})
            t1 = time.perf_counter()
            for key, its in sorted(items.items()):
                stats = policies[key].update(module_weights(its))
                if stats is not None:
                    rec["updates"][key] = stats.to_dict()
                    pending.add(key)
                    items_total += stats.items
                    updates_total += 1
            rec["train_s"] = round(time.perf_counter() - t1, 2)
            losses = [u["loss"] for u in rec["updates"].values()]
            rec["loss"] = sum(losses) / len(losses) if losses else None
            t2 = time.perf_counter()
            if pending and ((step + 1) % s.sync_every == 0 or step + 1 == s.steps):
                rec["adapters"] = self._sync(new, preds, groups, policies, pending, served, out_dir, step + 1)
                pending = set()
            rec["sync_s"] = round(time.perf_counter() - t2, 2)
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
            history.append(rec)
            _write_history(out_dir, s, history)
            log.info("RL step %d/%d: mean reward %.3f, %d of %d groups without variance, loss %s",
                     step + 1, s.steps, rec["mean_reward"], rec["zero_variance_groups"], rec["groups"], rec["loss"])
            if progress:
                progress("rl steps", step + 1, s.steps)

        summary = StepRecord(0, "r", usage=usage.to_dict(), train_examples=items_total,
                             trainable_params=sum(p.trainable_params for p in policies.values()))
        summary.wall_s = time.perf_counter() - start
        first, last = history[0]["mean_reward"], history[-1]["mean_reward"]
        zero = sum(h["zero_variance_groups"] for h in history)
        n_groups = sum(h["groups"] for h in history)
        summary.extra = {"settings": s.to_dict(), "steps": history,
                         "adapters": {k: str(v[1]) for k, v in served.items()}}
        summary.detail = (f"{s.steps} RL steps, {updates_total} updates on {items_total} module calls; mean reward "
                          f"{first:.3f} (step 1) -> {last:.3f} (step {s.steps}); {zero} of {n_groups} groups had "
                          "equal rewards")
        if not served:
            summary.status = "nothing_to_train"
            summary.detail += ": nothing to train on"
            return CompileResult(program.deepcopy(), [summary])
        return CompileResult(new, [summary])

    def _policy_groups(self, preds: dict) -> dict[str, dict]:
        """The LoRAs to train: one per base LM (or per module), with their modules and starting adapter."""
        groups: dict[str, dict] = {}
        for name, p in preds.items():
            lm = p.get_lm()
            base = _base_lm(lm)
            if getattr(base, "model_dir", None) is None:
                raise TypeError(f"{base!r} cannot be trained by the RL step: it has no local checkpoint (model_dir)")
            key = name if self.settings.per_module else base.fingerprint()
            g = groups.setdefault(key, {"base": base, "modules": [], "adapters": set()})
            g["modules"].append(name)
            g["adapters"].add(str(lm.adapter) if getattr(lm, "adapter", None) is not None else None)
        for key, g in groups.items():
            adapters = g.pop("adapters")
            g["adapter"] = next(iter(adapters)) if len(adapters) == 1 else None
            if len(adapters) > 1:
                log.warning("RL step: modules %s run on different adapters %s; their LoRA starts fresh",
                            g["modules"], sorted(map(str, adapters)))
        return groups

    def _advantages(self, runs: list[Rollout], n_examples: int) -> dict:
        """Set each rollout's advantage (None: its group teaches nothing); the step's reward record."""
        zero = 0
        failures: dict[str, int] = {}
        for r in runs:
            if r.failure:
                failures[r.failure] = failures.get(r.failure, 0) + 1
        for i in range(n_examples):
            group = [r for r in runs if r.example == i and r.failure != "lm"]
            adv = group_advantages([r.reward for r in group])
            if adv is None:
                zero += 1
            for r, a in zip(group, adv or [None] * len(group)):
                r.advantage = a
        rewards = [r.reward for r in runs if r.failure != "lm"]
        return {"mean_reward": sum(rewards) / len(rewards) if rewards else 0.0, "rollouts": len(runs),
                "groups": n_examples, "zero_variance_groups": zero, "zero_variance_share": zero / n_examples,
                "failures": failures}

    def _sync(self, program, preds, groups, policies, pending, served, out_dir: Path, step: int) -> dict:
        """Save the updated LoRAs and put them on the program's LM (the weight step's path)."""
        out = {}
        for gi, key in enumerate(sorted(groups)):
            if key not in pending:
                continue
            g = groups[key]
            name = f"adapter-{gi}" if len(groups) > 1 else "adapter"
            adir = policies[key].save(out_dir / "adapters" / f"{name}-step{step:03d}", {"rl_step": step,
                                                                                         "modules": g["modules"]})
            tuned = g["base"].with_adapter(adir)
            tuned.start()  # merge + reload (CPU vLLM) or adapter load
            for n in g["modules"]:
                preds[n].lm = tuned
            old = served.get(key)
            served[key] = (tuned, adir)
            if old is not None:  # the previous LoRA's folder: no longer served (the engine holds its own copy)
                shutil.rmtree(old[1], ignore_errors=True)
            out[key] = str(adir)
        return out


def _write_history(out_dir: Path, settings: GRPOSettings, history: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "rl_history.json.tmp"
    tmp.write_text(json.dumps({"settings": settings.to_dict(), "steps": history}, indent=1, default=str))
    tmp.replace(out_dir / "rl_history.json")
