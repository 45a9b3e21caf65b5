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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tandem.optimize.finetune import BOOTSTRAP_DEFAULTS, check_teacher_demos
from tandem.experiments.typed import check_fields
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


@dataclass
class RunConfig:
    task: str = "iris"  # a built-in task name, or a path to a task .py file
    model: str = "smollm2-135m"  # [backend:]model
    strategy: str = "p -> w -> p"  # the paper's headline strategy
    seed: int = 0
    data_seed: int | None = None  # seed of the train/dev/test split; None: the same as seed
    data: str | None = None  # data file or folder; None: the task's default source
    sizes: tuple[int, int, int] | None = None  # train/dev/test; None: the task's (paper's) sizes
    prompt_train: int | None = None  # prompt step: bootstrap examples; None: the task's (paper's)
    prompt_val: int | None = None  # prompt step: candidate-selection examples
    num_candidates: int = 9  # the paper's: 3 fixed + 6 random candidate programs
    max_demos: int = 3  # the paper's
    format: str | None = None  # prompt format of every predictor (tandem.program.formats); None: the program's own
    threads: int = 64  # concurrent program runs: enough to keep the engine's batch full
    run_dir: str | None = None  # default: runs/<task>-<strategy>-s<seed>
    lora: dict = field(default_factory=dict)  # LoRAConfig overrides
    weight_step: dict = field(default_factory=dict)  # BootstrapFinetune's bootstrap settings (WEIGHT_STEP_KEYS)
    rl: dict = field(default_factory=dict)  # the RL step's settings (GRPOSettings; its LoRA shape is [lora]'s)
    backend_options: dict = field(default_factory=dict)  # passed to the LM backend
    program_from: str | None = None  # start from this saved program (run, program or deployment folder)

    def lora_config(self) -> LoRAConfig:
        known = {f.name for f in fields(LoRAConfig)}
        unknown = set(self.lora) - known
        if unknown:
            raise ValueError(f"unknown [lora] setting(s) {sorted(unknown)}; known: {sorted(known)}")
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.lora.items()}
        check_fields(LoRAConfig, values, "lora")
        cfg = LoRAConfig(**values)
        return replace(cfg, seed=self.seed)

    def weight_step_options(self) -> dict:
        """The ``[weight_step]`` settings, checked: unknown names and bad values are one-line errors."""
        from tandem.optimize.balance import check_balance
        from tandem.optimize.bootstrap import check_bootstrap_settings

        unknown = set(self.weight_step) - set(WEIGHT_STEP_KEYS)
        if unknown:
            raise ValueError(f"unknown [weight_step] setting(s) {sorted(unknown)}; known: {list(WEIGHT_STEP_KEYS)}")
        opts = {**WEIGHT_STEP_KEYS, **self.weight_step}
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
        try:
            return GRPOSettings.from_dict(self.rl, lora=self.lora_config())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[rl] {str(exc).replace('RL setting', 'setting', 1)}") from None

    def check(self) -> "RunConfig":
        """Every setting checked, without loading data or a model; a one-line ValueError naming the setting.

        Called by ``load_config`` and by ``run_cell`` before it creates the run
        directory: the strategy parses, ``sizes`` are three positive integers,
        the ``[lora]``, ``[weight_step]`` and ``[rl]`` settings are known and valid, the
        prompt format exists, and the counts are integers in range.
        """
        from tandem.optimize.better_together import parse_strategy

        if not isinstance(self.strategy, str):
            raise ValueError(f"setting `strategy` must be text like 'p -> w -> p', got {self.strategy!r}")
        if not is_zero_shot(self.strategy):
            parse_strategy(self.strategy, set(STEP_LETTERS))  # the steps BetterTogether runs
        if self.sizes is not None:
            check_sizes(self.sizes)
        for name, low, optional in (("seed", None, False), ("data_seed", None, True), ("threads", 1, False),
                                    ("num_candidates", 1, False), ("max_demos", 0, False),
                                    ("prompt_train", 1, True), ("prompt_val", 1, True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                what = "an integer" if low is None else f"an integer >= {low}"
                raise ValueError(f"setting `{name}` must be {what}, got {value!r}")
        if self.program_from is not None and not (isinstance(self.program_from, str) and self.program_from):
            raise ValueError(f"setting `program_from` must be a saved program's folder, got {self.program_from!r}")
        for name in ("lora", "weight_step", "rl", "backend_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"setting `{name}` must be a table of settings, got {getattr(self, name)!r}")
        self.lora_config()
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


def _coerce(name: str, raw: str) -> Any:
    """A ``--set name=raw`` value as the setting's type; a one-line ValueError naming it when it is not one."""
    try:
        if name in ("seed", "data_seed", "num_candidates", "max_demos", "threads", "prompt_train", "prompt_val"):
            return int(raw)
        if name == "sizes":
            return tuple(int(x) for x in raw.split(","))
    except ValueError:
        what = "three integers, train,dev,test" if name == "sizes" else "an integer"
        raise ValueError(f"setting `{name}` must be {what}, got {raw!r}") from None
    return raw


def check_sizes(sizes: Any) -> None:
    """``sizes`` is three positive integers (train, dev, test); a one-line ValueError naming it otherwise."""
    ok = (isinstance(sizes, (tuple, list)) and len(sizes) == 3
          and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes))
    if not ok:
        shown = ",".join(map(str, sizes)) if isinstance(sizes, (tuple, list)) else repr(sizes)
        raise ValueError(f"setting `sizes` must be three positive integers train,dev,test (e.g. 50,50,50), "
                         f"got {shown}")


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
    """``defaults``, then the TOML file, then ``key=value`` overrides, then keyword arguments.

    Paths (``resolve_paths``): the file's against its folder; the overrides'
    and keyword arguments' against the current directory; ``defaults`` are
    taken as they are. The result is checked (``RunConfig.check``): a bad
    setting is a one-line ValueError here.
    """
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        path = Path(path)
        values.update(resolve_paths(read_toml(path, "config file"), path.parent))
    known = {f.name for f in fields(RunConfig)}
    given: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        if key.startswith("lora."):
            values.setdefault("lora", {})[key[5:]] = _number(raw)
        elif key.startswith("weight_step."):
            values.setdefault("weight_step", {})[key[12:]] = setting_value(raw)
        elif key.startswith("rl."):
            values.setdefault("rl", {})[key[3:]] = setting_value(raw)
        else:
            given[key] = _coerce(key, raw)
    given.update({k: v for k, v in kwargs.items() if v is not None})
    values.update(resolve_paths(given))
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
    if isinstance(values.get("sizes"), list):
        values["sizes"] = tuple(values["sizes"])
    return RunConfig(**values).check()


def check_format(name: Any) -> None:
    """A ``format`` setting names a registered prompt format (or is None); a one-line error otherwise."""
    if name is not None:
        from tandem.program.formats import get_format

        get_format(name)


def setting_value(raw: str) -> Any:
    """A ``--set section.key=raw`` value: a number, true/false, or the text."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    return _number(raw)


def _number(raw: str) -> Any:
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def resolve_task(cfg: RunConfig) -> Task:
    """The task ``cfg`` names: a built-in one, or a task file (``task_from_file``: errors name the file)."""
    if not cfg.task.endswith(".py"):
        return get_task(cfg.task)
    return task_from_file(cfg.task)
