"""The ``tandem`` command.

    tandem eval iris --model smollm2-135m --split dev
    tandem optimize iris --strategy "p -> w -> p"

Library code logs; progress bars, tables and colour live here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


@contextmanager
def progress_bar(label: str) -> Iterator:
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as bar:
        task_id = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        yield update


def _quiet_engines() -> None:
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


def cmd_eval(args: argparse.Namespace) -> int:
    from tandem.evaluate import evaluate
    from tandem.lm.registry import get_lm
    from tandem.tasks.registry import get_task

    task = get_task(args.task)
    splits = task.load(data=args.data, seed=args.seed)
    data = splits[args.split][: args.limit] if args.limit else splits[args.split]
    lm = get_lm(args.model, **({"cache": False} if args.no_cache else {}))
    program = task.program().set_lm(lm)
    console.print(f"[bold]{task.name}[/] {args.split} split: {len(data)} examples, model {args.model}")
    t0 = time.perf_counter()
    with console.status("loading the model"):
        lm.start()
    console.print(f"model ready in {time.perf_counter() - t0:.1f} s")
    try:
        with progress_bar("evaluating") as update:
            result = evaluate(program, data, task.metric, num_threads=args.threads, progress=update)
    finally:
        lm.close()
    table = Table(title=f"{task.name} / {args.split} / {args.model}")
    for col in ("score %", "correct", "n", "failed", "wall s", "LM calls", "cached", "prompt tok", "output tok"):
        table.add_column(col, justify="right")
    u = result.usage
    table.add_row(
        f"{result.score:.1f}", f"{result.correct:g}", str(result.n), str(result.n_failed),
        f"{result.wall_s:.1f}", str(u.calls), str(u.cached_calls), str(u.prompt_tokens), str(u.output_tokens),
    )
    Console().print(table)
    if result.failures:
        console.print("failures by kind: " + ", ".join(f"{k}={v}" for k, v in sorted(result.failures.items())))
        first = next(r for r in result.records if r.failure)
        console.print(f"first failure (example {first.index}): {first.error}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result.to_dict(), fh, indent=1, default=str)
        console.print(f"records written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of the library and engines")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="evaluate a task's program on a split")
    e.add_argument("task", help="task name, e.g. iris")
    e.add_argument("--model", default="smollm2-135m", help="[backend:]model, e.g. smollm2-135m, hf:smollm2-135m, /path/to/checkpoint")
    e.add_argument("--split", default="dev", choices=("train", "dev", "test"))
    e.add_argument("--seed", type=int, default=0, help="seed of the data split")
    e.add_argument("--data", default=None, help="data file (default: the task's bundled source)")
    e.add_argument("--limit", type=int, default=None, help="only the first N examples")
    e.add_argument("--threads", type=int, default=64, help="examples run concurrently")
    e.add_argument("--no-cache", action="store_true", help="don't read or write the call cache")
    e.add_argument("--json", default=None, help="write per-example records to this file")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_engines()
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
