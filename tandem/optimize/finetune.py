"""The weight step ``w``: bootstrapped fine-tuning (a LoRA, or every weight with ``method="full"``).

The current program (prompts and weights) runs over the training set; every
module call in a passing run becomes one SFT example: the module's prompt
-> the reply it gave. By default the prompt is rendered zero-shot (demos
removed, as in the paper), so the tuned model learns to produce the passing
outputs without the demos. Modules that share an LM are trained together
into one LoRA (multi-task); ``multitask=False`` trains one LoRA per module.

The adapter is always trained on the *base* weights (a fresh LoRA, or the
base's weights themselves with ``LoRAConfig(method="full")``, whose result is
a whole checkpoint served in the base's place), from
traces of the current program, which may already run on an earlier adapter.
The step returns the program on the new weights with zero-shot prompts, or
with the incoming prompts when those score higher on the step's validation
set (``keep_demos`` trains with demos in the prompts instead).

No passing run means nothing to train on: the step reports
``nothing_to_train`` and returns the program unchanged, never crashing and
never pretending it trained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from tandem.evaluate.evaluate import Metric, evaluate
from tandem.lm.protocol import LM, TrainableLM, Usage
from tandem.optimize.base import CompileResult, Progress, StepRecord, check_dataset
from tandem.optimize.balance import balance_runs, check_balance
from tandem.optimize.bootstrap import bootstrap, check_bootstrap_settings
from tandem.program.example import Example
from tandem.program.formats import PLACEHOLDERS
from tandem.program.module import Module
from tandem.train import LoRAConfig, NothingToTrain, SFTExample, train_lora

log = logging.getLogger(__name__)


#: The weight step's bootstrap defaults (``BootstrapFinetune``, ``tandem optimize``'s
#: ``[weight_step]``), chosen by measurement: docs/training.md, "Traces for the weight step".
BOOTSTRAP_DEFAULTS = {"attempts": 6, "temperature": 0.7, "traces_per_example": 1, "hint_attempts": 2,
                      "balance": "auto", "teacher_demos": "complete"}
#: Which of the incoming program's demos the weight step's teacher keeps: ``complete`` (those
#: that show every output field, e.g. bootstrapped ones; labelled demos lacking the reasoning
#: are dropped) or ``all``. docs/training.md, "The teacher's demos", has the measurement.
TEACHER_DEMOS = ("complete", "all")


def check_teacher_demos(value: object) -> None:
    if value not in TEACHER_DEMOS:
        raise ValueError(f"teacher_demos must be one of {list(TEACHER_DEMOS)}, not {value!r}")


def teacher_program(program: Module, teacher_demos: str) -> Module:
    """The program the weight step bootstraps with: ``program`` with only complete demos (``complete``).

    A labelled demo shows a placeholder for the reasoning it lacks; the model
    copies it, and traces whose reasoning is the placeholder teach one answer.
    Demos whose value *is* the placeholder (bootstrapped from such a teacher)
    are dropped too.
    """
    if teacher_demos == "all":
        return program
    teacher = program.deepcopy()
    for pred in teacher.predictors():
        outs = [f.name for f in pred.signature.output_fields]
        pred.demos = [d for d in pred.demos if all(_written(d.get(n)) for n in outs)]
    return teacher


def _written(value: object) -> bool:
    """A demo's output value that a model wrote or a user gave: present and not a format's placeholder.

    Bootstrapped demos of a teacher that showed labelled demos often copy the
    placeholder as their reasoning; they are as empty as the labelled ones.
    """
    return value is not None and str(value).strip() not in PLACEHOLDERS


def _base_lm(lm: LM) -> LM:
    """The LM without its adapter (fresh LoRAs are trained on base weights)."""
    if isinstance(lm, TrainableLM) and lm.adapter is not None:
        return lm.with_adapter(None)
    return lm


class BootstrapFinetune:
    """The weight step (tandem.optimize.base.Optimizer): trains LoRA adapters into ``out_dir``."""

    restarts_prompts = False  # it trains on traces of the current program, prompts included

    def __init__(
        self,
        metric: Metric,
        *,
        config: LoRAConfig = LoRAConfig(),
        multitask: bool = True,
        keep_demos: bool = False,
        num_threads: int = 64,
        out_dir: str | Path | None = None,
        trainer=train_lora,
        attempts: int = BOOTSTRAP_DEFAULTS["attempts"],  # greedy, then samples, per training example
        temperature: float = BOOTSTRAP_DEFAULTS["temperature"],
        traces_per_example: int = BOOTSTRAP_DEFAULTS["traces_per_example"],
        hint_attempts: int = BOOTSTRAP_DEFAULTS["hint_attempts"],  # runs with the gold answer as a hint
        balance: object = BOOTSTRAP_DEFAULTS["balance"],
        teacher_demos: str = BOOTSTRAP_DEFAULTS["teacher_demos"],
    ) -> None:
        check_bootstrap_settings(attempts, temperature, traces_per_example, hint_attempts)
        check_balance(balance)
        check_teacher_demos(teacher_demos)
        self.metric = metric
        self.config = config
        self.multitask = multitask
        self.keep_demos = keep_demos
        self.num_threads = num_threads
        self.out_dir = Path(out_dir) if out_dir else None
        self.trainer = trainer  # train_lora; tests pass a stand-in with the same signature
        self.attempts = attempts
        self.temperature = temperature
        self.traces_per_example = traces_per_example
        self.hint_attempts = hint_attempts
        self.balance = balance
        self.teacher_demos = teacher_demos

    def _config_for(self, program: Module) -> LoRAConfig:
        """The training config for ``program``'s LMs: ``auto`` is a LoRA where an LM serves LoRAs only
        (a server), and ``full`` there is a clear error, raised before any run."""
        lms = [_base_lm(p.get_lm()) for p in program.predictors()]
        lora_only = [lm for lm in lms if isinstance(lm, TrainableLM) and not lm.serves_full_weights]
        if not lora_only or self.config.method == "lora":
            return self.config
        if self.config.method == "full":
            raise ValueError(f'[lora] method = "full": {lora_only[0]!r} serves LoRA adapters only, not weights '
                             'tuned in full; use method = "lora" (or "auto")')
        return replace(self.config, method="lora")

    def sft_examples(self, program: Module, runs) -> dict[str, list[SFTExample]]:
        """SFT examples from passing ``runs``, grouped by the LoRA they train (an LM, or a module).

        Trace entries name predictors as ``program.named_predictors()`` does,
        nested modules included; an entry of a predictor the program does not
        hold (one kept in a local variable or a private attribute) has no
        prompt to train and is left out with a warning.
        """
        preds = dict(program.named_predictors())
        bases = {name: _base_lm(p.get_lm()) for name, p in preds.items()}
        groups: dict[str, list[SFTExample]] = {}
        unknown: dict[str, int] = {}
        for run in runs:
            for e in run.entries:
                pred = preds.get(e.predictor)
                if pred is None:
                    unknown[e.predictor] = unknown.get(e.predictor, 0) + 1
                    continue
                demos = pred.demos if self.keep_demos else []
                text = bases[e.predictor].render(pred.format.build_prompt(pred.signature, demos, e.inputs))
                key = bases[e.predictor].fingerprint() if self.multitask else e.predictor
                groups.setdefault(key, []).append(SFTExample(text, e.completion, e.predictor))
        if unknown:
            log.warning("weight step: %d traced calls of predictors the program does not name were left out: %s "
                        "(its predictors: %s)", sum(unknown.values()), unknown, sorted(preds))
        return groups

    def compile(
        self, program: Module, *, trainset: list[Example], valset: list[Example], seed: int = 0,
        progress: Progress | None = None, out_dir: str | Path | None = None,
    ) -> CompileResult:
        check_dataset("trainset", trainset)
        config = self._config_for(program)
        out_dir = Path(out_dir or self.out_dir or "adapters")
        start = time.perf_counter()
        usage = Usage()
        boot = bootstrap(
            teacher_program(program, self.teacher_demos), trainset, self.metric, num_threads=self.num_threads, attempts=self.attempts,
            temperature=self.temperature, traces_per_example=self.traces_per_example,
            hint_attempts=self.hint_attempts, seed=seed,
            progress=(lambda d, t: progress("traces", d, t)) if progress else None,
        )
        usage.merge(boot.usage)
        runs, answers = balance_runs(boot.passed, trainset, self.balance)
        groups = self.sft_examples(program, runs)
        n_examples = sum(len(g) for g in groups.values())
        _write_sft(out_dir, groups)
        rec = StepRecord(0, "w", usage=usage.to_dict(), train_examples=n_examples)
        rec.extra = {"bootstrap": {**boot.sources, "passing_traces": len(boot.passed), "runs": boot.attempts},
                     "answers": answers}
        if not n_examples:
            rec.status = "nothing_to_train"
            rec.detail = f"{boot.summary()}: nothing to train on"
            rec.wall_s = time.perf_counter() - start
            log.warning("weight step skipped: %s", rec.detail)
            return CompileResult(program.deepcopy(), [rec])

        new = program.deepcopy()
        preds = dict(new.named_predictors())
        trained: dict[str, dict] = {}
        for gi, (key, examples) in enumerate(sorted(groups.items())):
            names = sorted({ex.module for ex in examples})
            base = _base_lm(preds[names[0]].get_lm())
            model_dir = base.model_dir if isinstance(base, TrainableLM) else None
            if model_dir is None:
                raise TypeError(f"{base!r} cannot be fine-tuned locally: it has no local checkpoint (model_dir)")
            cfg = config if config.seed == seed else _with_seed(config, seed)
            adir = out_dir / (f"adapter-{gi}" if len(groups) > 1 else "adapter")
            try:
                result = self.trainer(
                    model_dir, examples, cfg, adir, overwrite=True,
                    progress=(lambda s, t, _l: progress("training", s, t)) if progress else None,
                )
            except NothingToTrain as exc:
                rec.status = "nothing_to_train"
                rec.detail = str(exc)
                rec.wall_s = time.perf_counter() - start
                return CompileResult(program.deepcopy(), [rec])
            tuned = base.with_adapter(result.adapter_dir)
            t_serve = time.perf_counter()
            tuned.start()  # merge + engine start (merge mode) or adapter load, timed apart from inference
            serve_s = time.perf_counter() - t_serve
            targets = names if not self.multitask else [
                n for n, p in preds.items() if _base_lm(p.get_lm()).fingerprint() == base.fingerprint()
            ]
            for n in targets:
                preds[n].lm = tuned
            rec.trainable_params += result.trainable_params
            trained[str(result.adapter_dir)] = {**result.to_dict(), "modules": names, "losses": result.losses[-5:],
                                                "serve_setup_s": round(serve_s, 2)}

        # Which prompts go with the new weights: zero-shot (what it was trained
        # on) or the incoming ones; the step's validation set decides.
        variants = [("zero-shot prompts", new.reset_copy())]
        if any(p.demos for p in new.predictors()) and not self.keep_demos:
            variants.append(("incoming prompts", new))
        elif self.keep_demos:
            variants = [("incoming prompts", new)]
        results = [evaluate(v, valset, self.metric, num_threads=self.num_threads) for _, v in variants]
        for r in results:
            usage.merge(r.usage)
        best = max(range(len(variants)), key=lambda i: (results[i].score, -i))
        rec.usage = usage.to_dict()
        rec.inner_score = results[best].score
        rec.wall_s = time.perf_counter() - start
        rec.detail = (
            f"trained on {n_examples} examples; {boot.summary()}"
            f"{' (balanced by answer)' if answers['balanced'] else ''}; "
            f"kept {variants[best][0]} ({results[best].score:.1f})"
        )
        rec.extra.update(adapters=trained, variants={n: r.score for (n, _), r in zip(variants, results)})
        return CompileResult(variants[best][1], [rec], score=results[best].score)


def _write_sft(out_dir: Path, groups: dict[str, list[SFTExample]]) -> None:
    """The training set as ``sft.jsonl`` in the step's folder (prompt, completion, module), to read later."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sft.jsonl", "w") as fh:
        for key, examples in sorted(groups.items()):
            for ex in examples:
                fh.write(json.dumps({"group": key, "module": ex.module, "prompt": ex.prompt,
                                     "completion": ex.completion}) + "\n")


def _with_seed(cfg: LoRAConfig, seed: int) -> LoRAConfig:
    return replace(cfg, seed=seed)
