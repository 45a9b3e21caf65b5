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


class StepProgress:
    """One bar per phase label ("bootstrap", "candidates", "training", ...), for optimizer callbacks."""

    def __init__(self, bar: Progress, prefix: str = "") -> None:
        self.bar, self.prefix, self.tasks = bar, prefix, {}

    def __call__(self, label: str, done: int, total: int) -> None:
        key = self.prefix + label
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(key, total=total or None)
        self.bar.update(self.tasks[key], completed=done, total=total or None)


def steps_table(history, title: str) -> Table:
    table = Table(title=title)
    for col in ("step", "kind", "status", "val %", "inner %", "wall s", "LM calls", "tokens", "SFT ex", "detail"):
        table.add_column(col, justify="left" if col in ("kind", "status", "detail") else "right")
    for r in history:
        u = r.usage or {}
        table.add_row(
            str(r.index + 1), r.kind, r.status,
            "-" if r.val_score is None else f"{r.val_score:.1f}",
            "-" if r.inner_score is None else f"{r.inner_score:.1f}",
            f"{r.wall_s:.0f}", str(u.get("calls", 0)),
            str(u.get("prompt_tokens", 0) + u.get("output_tokens", 0)),
            str(r.train_examples) if r.kind == "w" else "-", r.detail[:70],
        )
    return table


def cmd_optimize(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tandem.evaluate import evaluate
    from tandem.experiments.config import load_config, resolve_task
    from tandem.lm.registry import get_lm
    from tandem.optimize import BetterTogether, BootstrapFinetune, RandomSearch, SplitPlan

    cfg = load_config(args.config, args.set, task=args.task, model=args.model, strategy=args.strategy,
                      seed=args.seed, run_dir=args.run_dir)
    task = resolve_task(cfg)
    splits = task.load(data=cfg.data, seed=cfg.seed, **({"sizes": cfg.sizes} if cfg.sizes else {}))
    ptrain, pval = cfg.prompt_train, cfg.prompt_val
    if ptrain is None and task.prompt_sizes:
        ptrain, pval = task.prompt_sizes
    run_dir = cfg.default_run_dir()
    bt = BetterTogether(
        task.metric, strategy=cfg.strategy,
        prompt_optimizer=RandomSearch(task.metric, num_candidates=cfg.num_candidates, max_demos=cfg.max_demos,
                                      num_threads=cfg.threads),
        weight_optimizer=BootstrapFinetune(task.metric, config=cfg.lora_config(), num_threads=cfg.threads),
        splits=SplitPlan(ptrain, pval), run_dir=run_dir, num_threads=cfg.threads,
    )
    console.print(
        f"[bold]{task.name}[/] strategy [bold]{cfg.strategy}[/], seed {cfg.seed}, model {cfg.model}: "
        f"train {len(splits['train'])} / dev {len(splits['dev'])} / test {len(splits['test'])}; run dir {run_dir}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    t0 = time.perf_counter()
    lm = get_lm(cfg.model, **cfg.backend_options)
    with console.status("loading the model"):
        lm.start()
    load_s = time.perf_counter() - t0
    program = task.program().set_lm(lm)
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            steps = StepProgress(bar)
            result = bt.compile(program, trainset=splits["train"], valset=splits["dev"], seed=cfg.seed,
                                resume=args.resume, progress=steps)
            with_test = evaluate(result.program, splits["test"], task.metric, num_threads=cfg.threads,
                                 progress=lambda d, t: steps("test", d, t))
    finally:
        lm.close()
    total_s = time.perf_counter() - t0
    Console().print(steps_table(result.history, f"{task.name}: {cfg.strategy} (seed {cfg.seed})"))
    best = result.extra["best_step"]
    summary = {
        "task": task.name, "model": cfg.model, "strategy": cfg.strategy, "seed": cfg.seed,
        "best_step": best, "dev_score": result.score, "test_score": with_test.score,
        "test_failures": with_test.failures, "wall_s": round(total_s, 1), "model_load_s": round(load_s, 1),
        "history": [r.to_dict() for r in result.history],
    }
    (run_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    Console().print(
        f"returned program: step {best + 1} (dev {result.score:.1f}); "
        f"[bold]test {with_test.score:.1f}%[/] on {with_test.n} examples; total {total_s:.0f} s; "
        f"saved to {run_dir / 'final'}"
    )
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

    o = sub.add_parser("optimize", help="optimize a program's prompts and weights (BetterTogether)")
    o.add_argument("task", nargs="?", default=None, help="task name or task .py file (or set it in --config)")
    o.add_argument("--config", default=None, help="TOML config file (see examples/)")
    o.add_argument("--strategy", default=None, help='e.g. "p -> w -> p" (default), "p", "w -> p"')
    o.add_argument("--model", default=None, help="[backend:]model (default smollm2-135m)")
    o.add_argument("--seed", type=int, default=None)
    o.add_argument("--run-dir", default=None, help="default runs/<task>-<strategy>-s<seed>")
    o.add_argument("--resume", action="store_true", help="continue a killed run from its last finished step")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config setting, e.g. --set lora.epochs=3 --set sizes=50,50,50")
    o.set_defaults(func=cmd_optimize)
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
