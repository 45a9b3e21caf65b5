"""Tasks by name, for the CLI and experiment grids.

A task bundles a loader that returns train/dev/test splits for a seed, a
program factory and a metric. Users add their own through config files
(tandem.experiments.config) rather than by editing this table.

    task = get_task("hotpotqa")
    data = task.load(data=None, seed=0)          # None: ../shared/data/hotpotqa if present
    program = task.make_program(data)            # MultiHopQA over data's BM25 retriever

Some programs need the loaded data (HotPotQA's retriever indexes the
loaded questions' paragraphs): such a task sets ``program_takes_data`` and
its ``program`` factory receives the object ``load`` returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tandem.program import Example, Module
from tandem.tasks.errors import DataError


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[..., dict[str, list[Example]]]  # (data=None, seed=0, sizes=None) -> splits
    program: Callable[..., Module]  # () -> program, or (loaded data) -> program with program_takes_data
    metric: Callable
    sizes: tuple[int, int, int]  # paper's train/dev/test sizes
    # Prompt-optimization subsample sizes (train, val) from the paper.
    prompt_sizes: tuple[int, int] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    program_takes_data: bool = False  # program(data): it needs what load returned (a retriever's corpus)

    def make_program(self, data=None) -> Module:
        """A fresh program; ``data`` is what ``load`` returned (needed when ``program_takes_data``)."""
        if self.program_takes_data:
            if data is None:
                raise ValueError(f"task {self.name!r} builds its program from the loaded data; pass task.load(...)'s result")
            return self.program(data)
        return self.program()


def shared_data_candidates(name: str) -> list[Path]:
    """Where a task's data is looked for when none is given: ``$TANDEM_DATA/<name>``, then
    ``../shared/data/<name>`` relative to the current directory and to the tandem checkout."""
    out = []
    if os.environ.get("TANDEM_DATA"):
        out.append(Path(os.environ["TANDEM_DATA"]) / name)
    out.append(Path.cwd().parent / "shared" / "data" / name)
    repo = Path(__file__).resolve().parents[2]
    out.append(repo.parent / "shared" / "data" / name)
    seen, uniq = set(), []
    for p in out:
        key = str(p.resolve()) if p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def default_data(name: str, data=None):
    """``data`` if given, else the first existing default folder, else a DataError saying what to pass."""
    if data is not None:
        return data
    for p in shared_data_candidates(name):
        if p.exists():
            return p
    looked = ", ".join(str(p) for p in shared_data_candidates(name))
    raise DataError(
        f"no data given for task {name!r} and none found (looked in {looked}); pass the data folder or file: "
        f"`--data PATH` on the command line, `data = \"PATH\"` in a config, or set TANDEM_DATA to a folder "
        f"holding {name}/"
    )


def _sizes(sizes, default: tuple[int, int, int]) -> tuple[int, int, int]:
    if sizes is None:
        return default
    sizes = tuple(sizes)
    if len(sizes) != 3:
        raise ValueError(f"sizes are train,dev,test: three numbers, got {sizes}")
    return sizes


def _iris() -> Task:
    from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris

    def load(data=None, seed=0, sizes=None):
        return split_iris(load_iris(data), seed=seed, sizes=_sizes(sizes, (50, 50, 50)))

    return Task("iris", load, IrisClassifier, iris_metric, (50, 50, 50), (15, 35))


# GSM8K: the paper's 1000 / 500 / 1319; the local copy is the official train file only,
# so test is cut from it first (fixed when train/dev sizes change). Prompt steps: 100 / 250.
GSM8K_SIZES = (1000, 500, 1319)


def _gsm8k() -> Task:
    from tandem.tasks.gsm8k import GSM8KSolver, gsm8k_metric, load_gsm8k

    def load(data=None, seed=0, sizes=None):
        train, dev, test = _sizes(sizes, GSM8K_SIZES)
        return load_gsm8k(default_data("gsm8k", data), train=train, dev=dev, test=test, seed=seed)

    return Task("gsm8k", load, GSM8KSolver, gsm8k_metric, GSM8K_SIZES, (100, 250),
                notes="test is cut from the train file (the official test split is not local)")


# HotPotQA: the paper's 1000 / 500 / 1500 does not fit the 600 + 300 local questions:
# train and dev come from train.jsonl (400 + 200), test is dev.jsonl (300). Prompt steps:
# the paper's 100 / 250, which fit the 400 training questions.
HOTPOTQA_SIZES = (400, 200, 300)


def _hotpotqa() -> Task:
    from tandem.tasks.hotpotqa import MultiHopQA, hotpotqa_em, load_hotpotqa

    def load(data=None, seed=0, sizes=None):
        train, dev, test = _sizes(sizes, HOTPOTQA_SIZES)
        return load_hotpotqa(default_data("hotpotqa", data), train=train, dev=dev, test=test, seed=seed)

    def program(data) -> Module:
        return MultiHopQA(data.retriever())

    return Task("hotpotqa", load, program, hotpotqa_em, HOTPOTQA_SIZES, (100, 250),
                notes="sizes scaled to the local 600 + 300 questions; BM25 over the pooled paragraphs",
                program_takes_data=True)


_FACTORIES: dict[str, Callable[[], Task]] = {"iris": _iris, "gsm8k": _gsm8k, "hotpotqa": _hotpotqa}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    _FACTORIES[name] = factory


def get_task(name: str) -> Task:
    if name not in _FACTORIES:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(_FACTORIES)}")
    return _FACTORIES[name]()


def task_names() -> list[str]:
    return sorted(_FACTORIES)
