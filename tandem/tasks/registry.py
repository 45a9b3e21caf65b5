"""Tasks by name, for the CLI and experiment grids.

A task bundles a loader that returns train/dev/test splits for a seed, a
program factory and a metric. Users add their own through config files
(tandem.experiments.config) rather than by editing this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tandem.program import Example, Module


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[..., dict[str, list[Example]]]  # (data=None, seed=0, sizes=None) -> splits
    program: Callable[[], Module]
    metric: Callable
    sizes: tuple[int, int, int]  # paper's train/dev/test sizes
    # Prompt-optimization subsample sizes (train, val) from the paper.
    prompt_sizes: tuple[int, int] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _iris() -> Task:
    from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris

    def load(data=None, seed=0, sizes=(50, 50, 50)):
        return split_iris(load_iris(data), seed=seed, sizes=tuple(sizes))

    return Task("iris", load, IrisClassifier, iris_metric, (50, 50, 50), (15, 35))


_FACTORIES: dict[str, Callable[[], Task]] = {"iris": _iris}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    _FACTORIES[name] = factory


def get_task(name: str) -> Task:
    if name not in _FACTORIES:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(_FACTORIES)}")
    return _FACTORIES[name]()


def task_names() -> list[str]:
    return sorted(_FACTORIES)
