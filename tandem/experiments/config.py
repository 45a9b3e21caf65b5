"""Run configuration: typed defaults, TOML files, ``key=value`` overrides.

A config names a task (built in, or a Python file of the user's), a model,
a strategy, a seed, split sizes and training settings::

    # tandem optimize --config examples/iris.toml
    task = "iris"
    model = "smollm2-135m"
    strategy = "p -> w -> p"
    seed = 0

    [lora]
    learning_rate = 3e-4

    [rl]                       # the RL step `r` (tandem.optimize.grpo.GRPOSettings)
    steps = 10
    rollouts = 4

Paths: a path in a config file (``task = "my_task.py"``, ``data = ...``) is
relative to the config file's folder; one on the command line (``--data``,
``--set data=...``, a task file argument) to the current directory. Both
become absolute paths here, so run directories record where they are.

The task file contract (worked example: ``examples/wine_task.py``). A task
file is a Python file that defines:

- ``program()``: a fresh ``tandem.Module``; with ``PROGRAM_TAKES_DATA = True``
  it is called as ``program(loaded)`` with what ``load`` returned (to build
  a retriever from it, say);
- ``metric(example, prediction, trace=None)``: a number or bool, higher is
  better (``trace`` is None in evaluation, the trace while bootstrapping);
- ``load(data, seed, sizes)``: ``{"train": [...], "dev": [...], "test": [...]}``
  of ``tandem.Example`` (each with its input fields set by ``with_inputs``).
  ``data`` is the ``--data`` / ``data =`` path (None: the file's own
  default source), ``seed`` the split seed, ``sizes`` the ``(train, dev,
  test)`` that were set (``--set sizes=60,50,60``, ``sizes = [...]``), or
  None for the file's defaults. A ``load(data, seed)`` without ``sizes`` works
  until sizes are set; then it is an error.

Optional: ``read(data)`` (every example of one data file, unsplit: ``tandem
eval --split all``), ``SIZES`` (the default train/dev/test sizes, for
reports; default 50, 50, 50), ``PROMPT_SIZES`` (the prompt step's
bootstrap/selection sizes). A task file without one of the three functions,
one that does not import, a ``load`` that raises or returns something else:
a one-line error naming the file. A program saved from a task file records
the file's absolute path in program.json, so ``tandem.load`` imports it
again from any directory (it must stay where it was)::

    task = "wine_task.py"      # next to this config file
    data = "wine.csv"          # optional: a CSV in the file's format
    sizes = [60, 50, 60]
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from annotated_types import Ge, Gt, MinLen

from tandem.optimize.finetune import BOOTSTRAP_DEFAULTS, TEACHER_DEMOS, check_teacher_demos
from tandem.experiments.overrides import parse_overrides, put
from tandem.experiments.typed import Expected, table, table_of, validate
from tandem.optimize.grpo import GRPOSettings
from tandem.tasks.registry import Task, get_task, task_from_file
from tandem.train import LoRAConfig


ZERO_SHOT = "zero-shot"  # the strategy that runs the given program as it is


def is_zero_shot(strategy: str) -> bool:
    return strategy.strip().lower() in (ZERO_SHOT, "zero_shot", "zeroshot")


#: The weight step's bootstrap settings and their defaults (BootstrapFinetune's).
WEIGHT_STEP_KEYS = BOOTSTRAP_DEFAULTS
#: The steps a run's strategy may name: prompt (p), weight (w) and RL (r) steps.
STEP_LETTERS = frozenset({"p", "w", "r"})

# The configuration's types (tandem.experiments.typed): every key of a run config, a `tandem optimize
# --config` file and `--set`, and (less the run's own name, seed and folder) of an experiment file.
PositiveInt = Annotated[int, Gt(0)]
Count = Annotated[int, Ge(1)]
#: ``[lora]``: LoRAConfig's fields (its seed is the run's).
LoraTable = table_of(LoRAConfig, "LoraTable")
#: ``[weight_step]``: BootstrapFinetune's bootstrap settings.
WeightStepTable = table("WeightStepTable", {
    "attempts": int, "temperature": float, "traces_per_example": int, "hint_attempts": int,
    "balance": Literal["auto"] | bool, "teacher_demos": Literal[TEACHER_DEMOS],
})
assert set(WeightStepTable.__annotations__) == set(WEIGHT_STEP_KEYS), "[weight_step] keys drifted"
#: ``[rl]``: GRPOSettings' fields (its LoRA shape is ``[lora]``'s).
RLTable = table_of(GRPOSettings, "RLTable", exclude=("lora",))


@dataclass
class RunConfig:
    """A run's settings, typed: ``check()`` (and ``load_config``) validate every key against these
    annotations, so a wrong type or an unknown key is one line naming it."""

    __pydantic_config__ = {"extra": "forbid", "strict": True}

    task: Optional[str] = "iris"  # a built-in task name, or a path to a task .py file (None: not given)
    model: str = "smollm2-135m"  # [backend:]model
    strategy: Annotated[str, Expected("a strategy like \"p -> w -> p\"")] = "p -> w -> p"  # the paper's
    seed: int = 0
    data_seed: Optional[int] = None  # seed of the train/dev/test split; None: the same as seed
    data: Optional[str] = None  # data file or folder; None: the task's default source
    sizes: Optional[tuple[PositiveInt, PositiveInt, PositiveInt]] = None  # train/dev/test; None: the task's
    prompt_train: Optional[Count] = None  # prompt step: bootstrap examples; None: the task's (paper's)
    prompt_val: Optional[Count] = None  # prompt step: candidate-selection examples
    num_candidates: Count = 9  # the paper's: 3 fixed + 6 random candidate programs
    max_demos: Annotated[int, Ge(0)] = 3  # the paper's
    format: Optional[str] = None  # prompt format of every predictor (tandem.program.formats); None: the program's own
    threads: Count = 64  # concurrent program runs: enough to keep the engine's batch full; 1: repeatable runs
    run_dir: Optional[str] = None  # default: runs/<task>-<strategy>-s<seed>
    lora: LoraTable = field(default_factory=dict)  # LoRAConfig overrides
    weight_step: WeightStepTable = field(default_factory=dict)  # BootstrapFinetune's bootstrap settings
    rl: RLTable = field(default_factory=dict)  # the RL step's settings (GRPOSettings; its LoRA shape is [lora]'s)
    backend_options: dict[str, Any] = field(default_factory=dict)  # passed to the LM backend
    program_from: Optional[Annotated[str, MinLen(1)]] = None  # start from this saved program (run, program
    #   or deployment folder)

    def lora_config(self) -> LoRAConfig:
        """The ``[lora]`` settings as a LoRAConfig with the run's seed; unknown names and wrong types
        are one-line errors."""
        values = validate(LoraTable, self.lora, ("lora",))
        cfg = replace(LoRAConfig(**values), seed=self.seed)
        if cfg.method == "auto" and self._lora_rl_after_weight_step():  # a LoRA RL step continues from a LoRA
            cfg = replace(cfg, method="lora")
        return cfg

    def _lora_rl_after_weight_step(self) -> bool:
        """Whether the strategy has an RL step (r) that trains a LoRA after a weight step (w)."""
        steps = [s.strip() for s in str(self.strategy).split("->")]
        return self.rl.get("method", "lora") != "full" and "w" in steps and "r" in steps[steps.index("w"):]

    def weight_step_options(self) -> dict:
        """The ``[weight_step]`` settings, checked: unknown names and bad values are one-line errors."""
        from tandem.optimize.balance import check_balance
        from tandem.optimize.bootstrap import check_bootstrap_settings

        opts = {**WEIGHT_STEP_KEYS, **validate(WeightStepTable, self.weight_step, ("weight_step",))}
        try:
            check_bootstrap_settings(opts["attempts"], opts["temperature"], opts["traces_per_example"],
                                     opts["hint_attempts"])
            check_balance(opts["balance"])
            check_teacher_demos(opts["teacher_demos"])
        except ValueError as exc:
            raise ValueError(f"[weight_step] {exc}") from None
        return opts

    def rl_settings(self) -> GRPOSettings:
        """The ``[rl]`` settings with ``[lora]``'s LoRA, checked: unknown names and bad values are one-line errors."""
        values = validate(RLTable, self.rl, ("rl",))
        try:
            # The RL step's LoRA has [lora]'s shape; [rl] method (not [lora]'s) says whether it trains every weight.
            return GRPOSettings.from_dict(values, lora=replace(self.lora_config(), method="lora"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[rl] {str(exc).replace('RL setting', 'setting', 1)}") from None

    def check(self) -> "RunConfig":
        """Every setting checked, without loading data or a model; a one-line ValueError naming the setting.

        Called by ``load_config`` and by ``run_cell`` before it creates the run
        directory: every key has its type (``validate``: ``sizes`` are three
        positive integers, ``threads`` an integer >= 1, ...), the strategy
        parses, the ``[lora]``, ``[weight_step]`` and ``[rl]`` settings are
        known and in range, and the prompt format exists.
        """
        from tandem.optimize.better_together import parse_strategy

        validate(RunConfig, asdict(self))
        if not is_zero_shot(self.strategy):
            parse_strategy(self.strategy, set(STEP_LETTERS))  # the steps BetterTogether runs
        if self.lora_config().method == "full" and self._lora_rl_after_weight_step():
            raise ValueError(f'[lora] method = "full" with strategy {self.strategy!r}: the RL step (r) trains a LoRA '
                             'and cannot continue from weights tuned in full; set [rl] method = "full", use '
                             '[lora] method = "lora", or put r first')
        self.weight_step_options()
        self.rl_settings()
        check_format(self.format)
        return self

    def split_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def default_run_dir(self) -> Path:
        slug = self.strategy.replace(" ", "").replace("->", "")
        name = Path(self.task).stem
        return Path(self.run_dir or f"runs/{name}-{slug}-s{self.seed}")


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict, or a ValueError that names the file and the problem."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def resolve_path(value: str, base: str | os.PathLike | None = None) -> str:
    """A path setting made absolute: relative to ``base`` (a config file's folder), else to the current directory."""
    p = Path(value).expanduser()
    return os.path.abspath(p if p.is_absolute() else Path(base or ".") / p)


def resolve_paths(values: dict[str, Any], base: str | os.PathLike | None = None) -> dict[str, Any]:
    """``values`` with a task file (``task`` ending in .py), ``data`` and ``program_from`` made absolute
    (``resolve_path``)."""
    task = values.get("task")
    if isinstance(task, str) and task.endswith(".py"):
        values["task"] = resolve_path(task, base)
    for key in ("data", "program_from"):
        if isinstance(values.get(key), str) and values[key]:
            values[key] = resolve_path(values[key], base)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                defaults: dict[str, Any] | None = None, **kwargs: Any) -> RunConfig:
    """``defaults``, then the TOML file, then ``key=value`` overrides (``--set``), then keyword arguments.

    Overrides are read by ``tandem.experiments.overrides`` (``sizes=50,50,50``,
    ``lora.rank=16``). Paths (``resolve_paths``): the file's against its
    folder; the overrides' and keyword arguments' against the current
    directory; ``defaults`` are taken as they are. The result is typed and
    checked (``RunConfig.check``): a bad setting is a one-line ValueError here.
    """
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        path = Path(path)
        values.update(resolve_paths(read_toml(path, "config file"), path.parent))
    given: dict[str, Any] = {}
    for key, value in parse_overrides(overrides, RunConfig):
        if len(key) == 1:
            given[key[0]] = value
        else:
            put(values, key, value)
    given.update({k: v for k, v in kwargs.items() if v is not None})
    values.update(resolve_paths(given))
    return validate(RunConfig, values).check()


def check_format(name: Any) -> None:
    """A ``format`` setting names a registered prompt format (or is None); a one-line error otherwise."""
    if name is not None:
        from tandem.program.formats import get_format

        get_format(name)


def resolve_task(cfg: RunConfig) -> Task:
    """The task ``cfg`` names: a built-in one, or a task file (``task_from_file``: errors name the file)."""
    if cfg.task is None:
        raise ValueError("no task given: name one (iris, gsm8k, hotpotqa or a task .py file), or set `task`")
    if not cfg.task.endswith(".py"):
        return get_task(cfg.task)
    return task_from_file(cfg.task)
