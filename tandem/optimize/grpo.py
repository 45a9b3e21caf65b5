"""The RL weight step ``r``: multi-module GRPO on a LoRA of the program's LM (or on every weight: ``method``).

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
nothing and is left out (counted). With ``oversample`` = k > 1 a step draws
k x ``batch_size`` examples and trains on the first ``batch_size`` whose
rollouts differ in reward (DAPO's dynamic sampling, in one draw). Every
module call of a rollout, the one whose reply did not parse included, gets
the rollout's advantage; the calls
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
``out_dir`` and the step record's ``extra["steps"]`` hold the reward curve
(mean, spread, the share of groups with equal rewards), the loss, failures,
tokens (rollouts' and trained) and the time per phase (rollouts, training,
sync, checkpoint). ``progress("rl steps", done, total, status="mean reward
...")`` after each RL step (``tandem.optimize.base.report``).

Checkpoints (``tandem.optimize.grpo_checkpoint``): every
``checkpoint_every`` RL steps (default: at every sync) and after the last,
the LoRA, its AdamW state, the data order and the history so far go to
``out_dir/checkpoint/``; ``compile`` with an ``out_dir`` holding a checkpoint
of the same run continues after it (BetterTogether hands a step it re-runs
on resume the same ``out_dir``).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

from tandem.evaluate.evaluate import Metric, run_example
from tandem.fileio import write_json
from tandem.lm.protocol import LM, TrainableLM, Usage
from tandem.optimize import grpo_checkpoint as checkpoint
from tandem.optimize.base import CompileResult, Progress, StepRecord, check_dataset, report
from tandem.optimize.grpo_settings import GRPOSettings
from tandem.program.example import Example
from tandem.program.module import Module
from tandem.program.predict import sampling_override
from tandem.train.grpo import Policy, PolicyItem

log = logging.getLogger(__name__)

ADV_EPS = 1e-4  # added to the group's std (TRL's value)


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


def keep_informative(runs: list[Rollout], limit: int) -> int:
    """Keep the advantages of the first ``limit`` examples (in draw order) whose rollouts differ in reward;
    clear the rest (DAPO's dynamic sampling, with ``oversample`` > 1). Returns the groups kept."""
    informative = sorted({r.example for r in runs if r.advantage is not None})
    kept = set(informative[:limit])
    for r in runs:
        if r.example not in kept:
            r.advantage = None
    return len(kept)


def _base_lm(lm: LM) -> LM:
    return lm.with_adapter(None) if isinstance(lm, TrainableLM) and lm.adapter is not None else lm


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
        """``steps`` RL steps on ``trainset``; ``valset`` is not used (BetterTogether scores the result).

        When ``out_dir`` holds a checkpoint of this run (same settings, seed, metric, trainset and
        program: ``grpo_checkpoint``), the step continues after it instead of starting over.
        """
        check_dataset("trainset", trainset)
        s = self.settings
        out_dir = Path(out_dir or self.out_dir or "rl")
        start = time.perf_counter()
        new = program.deepcopy()
        preds = dict(new.named_predictors())
        groups = self._policy_groups(preds)  # before anything slow: a remote LM is an error here
        lora = replace(s.policy_lora(), seed=seed)
        policies = {key: self.policy_factory(
            g["base"].model_dir, lora, learning_rate=s.learning_rate, clip_epsilon=s.clip_epsilon, beta=s.beta,
            updates=s.updates, micro_batch=s.micro_batch, adapter=g["adapter"]) for key, g in groups.items()}
        module_key = {name: key for key, g in groups.items() for name in g["modules"]}
        ident = checkpoint.identity(s.to_dict(), seed=seed, metric=self.metric, trainset=trainset, program=program,
                                    policy_factory=self.policy_factory)
        every = s.sync_every if s.checkpoint_every is None else s.checkpoint_every
        if every and not all(hasattr(p, "save_state") for p in policies.values()):
            log.warning("RL step: the trainer %r cannot save its state; no checkpoints", self.policy_factory)
            every = 0

        rng = random.Random(seed)
        run = {"order": [], "history": [], "items_total": 0, "updates_total": 0, "elapsed_s": 0.0}
        usage = Usage()
        served: dict[str, tuple[LM, Path, int]] = {}  # group -> (LM, LoRA folder, RL step it was saved at)
        found = checkpoint.read(out_dir, ident)
        if found is not None:
            run = self._restore(found, out_dir, rng, usage, preds, groups, policies, served)
            _write_history(out_dir, s, run["history"])
        history, first = run["history"], len(run["history"])
        pending: set[str] = set()  # groups updated since their LoRA last reached the engine
        report(progress, "rl steps", first, s.steps)
        for step in range(first, s.steps):
            t0 = time.perf_counter()
            draw = s.batch_size * s.oversample
            while len(run["order"]) < draw:  # epochs of a seeded shuffle
                more = list(range(len(trainset)))
                rng.shuffle(more)
                run["order"] += more
            batch_ids, run["order"] = run["order"][:draw], run["order"][draw:]
            step_usage = Usage()
            runs = self.rollouts(new, [trainset[i] for i in batch_ids], step, seed, step_usage)
            usage.merge(step_usage)
            rollout_s = time.perf_counter() - t0
            rec = self._advantages(runs, len(batch_ids))
            rec["trained_groups"] = keep_informative(runs, s.batch_size)
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
                       items={k: len(v) for k, v in items.items()}, updates={}, usage=step_usage.to_dict())
            t1 = time.perf_counter()
            for key, its in sorted(items.items()):
                stats = policies[key].update(module_weights(its))
                if stats is not None:
                    rec["updates"][key] = stats.to_dict()
                    pending.add(key)
                    run["items_total"] += stats.items
                    run["updates_total"] += 1
            rec["train_s"] = round(time.perf_counter() - t1, 2)
            losses = [u["loss"] for u in rec["updates"].values()]
            rec["loss"] = sum(losses) / len(losses) if losses else None
            rec["trained_tokens"] = sum(u["tokens"] for u in rec["updates"].values())
            t2 = time.perf_counter()
            if pending and ((step + 1) % s.sync_every == 0 or step + 1 == s.steps):
                rec["adapters"] = self._sync(new, preds, groups, policies, pending, served, out_dir, step + 1)
                pending = set()
            rec["sync_s"] = round(time.perf_counter() - t2, 2)
            history.append(rec)
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
            if every and ((step + 1) % every == 0 or step + 1 == s.steps):  # adds checkpoint_s to rec
                run["elapsed_s"] += time.perf_counter() - start
                start = time.perf_counter()
                served_at = {k: [str(v[1].relative_to(out_dir)), v[2]] for k, v in served.items()}
                state = {"identity": ident, "step": step + 1, "rng": rng.getstate(), "usage": usage.to_dict(),
                         "served": served_at, **run}
                checkpoint.write(out_dir, state, policies, sorted(groups))
            _write_history(out_dir, s, history)
            log.info("RL step %d/%d: mean reward %.3f, %d of %d groups without variance, loss %s",
                     step + 1, s.steps, rec["mean_reward"], rec["zero_variance_groups"], rec["groups"], rec["loss"])
            report(progress, "rl steps", step + 1, s.steps, status=f"mean reward {rec['mean_reward']:.3f}")
        run["elapsed_s"] += time.perf_counter() - start
        return self._result(program, new, history, run, usage, policies, served, first)

    def _result(self, program, new, history, run, usage, policies, served, first) -> CompileResult:
        """The step's record: the reward curve (``extra["steps"]``), totals per phase, tokens, adapters."""
        s = self.settings
        summary = StepRecord(0, "r", usage=usage.to_dict(), train_examples=run["items_total"],
                             trainable_params=sum(p.trainable_params for p in policies.values()))
        summary.wall_s = run["elapsed_s"]
        first_r, last_r = history[0]["mean_reward"], history[-1]["mean_reward"]
        zero = sum(h["zero_variance_groups"] for h in history)
        n_groups = sum(h["groups"] for h in history)
        phases = {name: round(sum(h.get(f"{name}_s") or 0.0 for h in history), 2)
                  for name in ("rollout", "train", "sync", "checkpoint")}
        summary.extra = {"settings": s.to_dict(), "steps": history,
                         "adapters": {k: str(v[1]) for k, v in served.items()}, "phases_s": phases,
                         "tokens": {"rollouts": usage.prompt_tokens + usage.output_tokens,
                                    "trained": sum(h.get("trained_tokens") or 0 for h in history)},
                         "resumed_after_step": first or None}
        summary.detail = (f"{s.steps} RL steps, {run['updates_total']} updates on {run['items_total']} module calls; "
                          f"mean reward {first_r:.3f} (step 1) -> {last_r:.3f} (step {s.steps}); {zero} of "
                          f"{n_groups} groups had equal rewards")
        if first:
            summary.detail += f"; resumed after RL step {first}"
        if not served:
            summary.status = "nothing_to_train"
            summary.detail += ": nothing to train on"
            return CompileResult(program.deepcopy(), [summary])
        return CompileResult(new, [summary])

    def _restore(self, found, out_dir: Path, rng, usage, preds, groups, policies, served) -> dict:
        """Continue from a checkpoint: the trainers' state, the data order, and the LoRAs back on the LM."""
        state, folder = found
        v, internal, gauss = state["rng"]
        rng.setstate((v, tuple(internal), gauss))
        for k, n in state["usage"].items():
            setattr(usage, k, n)
        for key, sub in state["policies"].items():
            policies[key].load_state(folder / sub)
        keep = {rel for rel, _ in state["served"].values()}
        for old in (out_dir / "adapters").glob("*"):  # folders of steps after the checkpoint
            if str(old.relative_to(out_dir)) not in keep:
                shutil.rmtree(old, ignore_errors=True)
        for key, (rel, step) in state["served"].items():  # saved again as _sync saved it: the same weights
            self._serve(preds, groups[key], policies[key], served, key, out_dir / rel, step)
        log.info("RL step: resuming from %s, after RL step %d of %d", folder, state["step"], self.settings.steps)
        return {k: state[k] for k in ("order", "history", "items_total", "updates_total", "elapsed_s")}

    def _policy_groups(self, preds: dict) -> dict[str, dict]:
        """The LoRAs to train: one per base LM (or per module), with their modules and starting adapter."""
        groups: dict[str, dict] = {}
        for name, p in preds.items():
            lm = p.get_lm()
            base = _base_lm(lm)
            if not isinstance(base, TrainableLM) or base.model_dir is None:
                raise TypeError(f"{base!r} cannot be trained by the RL step: it has no local checkpoint (model_dir)")
            if self.settings.method == "full" and not base.serves_full_weights:
                raise TypeError(f"RL setting `method` = 'full': {base!r} serves LoRAs only; use method = 'lora'")
            key = name if self.settings.per_module else base.fingerprint()
            g = groups.setdefault(key, {"base": base, "modules": [], "adapters": set()})
            g["modules"].append(name)
            adapter = lm.adapter if isinstance(lm, TrainableLM) else None
            g["adapters"].add(str(adapter) if adapter is not None else None)
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
        mean = sum(rewards) / len(rewards) if rewards else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards)) if rewards else 0.0
        return {"mean_reward": mean, "reward_std": std, "reward_min": min(rewards, default=None),
                "reward_max": max(rewards, default=None), "rollouts": len(runs), "groups": n_examples,
                "zero_variance_groups": zero, "zero_variance_share": zero / n_examples, "failures": failures}

    def _sync(self, program, preds, groups, policies, pending, served, out_dir: Path, step: int) -> dict:
        """Save the updated LoRAs and put them on the program's LM (the weight step's path)."""
        out = {}
        for gi, key in enumerate(sorted(groups)):
            if key not in pending:
                continue
            name = f"adapter-{gi}" if len(groups) > 1 else "adapter"
            adir = out_dir / "adapters" / f"{name}-step{step:03d}"
            old = served.get(key)
            self._serve(preds, groups[key], policies[key], served, key, adir, step)
            if old is not None:  # the previous LoRA's folder: no longer served (the engine holds its own copy)
                shutil.rmtree(old[1], ignore_errors=True)
            out[key] = str(adir)
        return out

    @staticmethod
    def _serve(preds, group: dict, policy, served: dict, key: str, adir: Path, step: int) -> None:
        """Save ``policy``'s LoRA to ``adir`` and put it on the group's modules' LM."""
        policy.save(adir, {"rl_step": step, "modules": group["modules"]})
        tuned = group["base"].with_adapter(adir)
        tuned.start()  # merge + reload (CPU vLLM) or adapter load
        for n in group["modules"]:
            preds[n].lm = tuned
        served[key] = (tuned, adir, step)


def _write_history(out_dir: Path, settings: GRPOSettings, history: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "rl_history.json", {"settings": settings.to_dict(), "steps": history})
