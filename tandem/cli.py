"""The ``tandem`` command: evaluate, optimize, compare, report and serve LM programs.

    tandem eval iris --model smollm2-135m --split dev
    tandem eval --program runs/iris-pwp-s0 --split test --json records.json
    tandem optimize iris --strategy "p -> w -> p"
    tandem optimize examples/wine_task.py --set sizes=30,20,30
    tandem compare runs/iris-p-s0 runs/iris-pwp-s0
    tandem experiment examples/iris_table.toml
    tandem report runs/exp-iris
    tandem serve runs/iris-pwp-s0 --port 8000
    tandem promote runs/iris-from-log --over deploy/iris --data data.jsonl   (tandem.cli_cycle)

Library code logs; what the command prints (errors, progress, tables) is in
``tandem.cli_output``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager

from rich.markup import escape

from tandem import __version__, quiet
from tandem.interrupts import Interrupted, on_signals, shield_children
from tandem.lm.protocol import LMUnavailable
from tandem.cli_output import (chosen_text, console, error, note, paired_text, progress, result_table, steps_table,
                               stdout)

__all__ = ["build_parser", "error", "main", "note", "positive_int"]

DESCRIPTION = """\
Make an LM program better by optimizing its prompts (instructions and few-shot
demos) and its weights (a LoRA adapter) in alternation (BetterTogether), on a
laptop CPU or on GPUs and inference servers."""
EPILOG = """examples:
  tandem eval iris --split dev
  tandem optimize iris --strategy "p -> w -> p" --seed 0
  tandem compare runs/iris-p-s0 runs/iris-pwp-s0
  tandem experiment examples/iris_table.toml

Run tandem COMMAND --help for a command's options; README.md has the rest."""


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1, else argparse's one-line usage error naming the option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    """A task's program, or a saved one (``--program``), on a split or data file (``tandem.compare``)."""
    from tandem.compare import eval_config, eval_examples, model_label, program_to_eval
    from tandem.evaluate import evaluate
    from tandem.deploy import program_source

    if args.program and args.model:
        raise ValueError("--model with --program: a saved program runs on the model(s) its program.json names; "
                         "leave out --model")
    dirs = [program_source(args.program)] if args.program else []
    cfg = eval_config(dirs, config=args.config, overrides=args.set, task=args.task, data=args.data,
                      seed=args.seed, model=args.model)
    task, data, loaded = eval_examples(cfg, args.split, args.limit)
    program = program_to_eval(cfg, task, loaded, dirs[0] if dirs else None, no_cache=args.no_cache)
    model, lms = model_label(program), program.lms()
    what = f"program {dirs[0]}" if dirs else "its program"
    console.print(f"[bold]{escape(task.name)}[/] {args.split} split: {len(data)} examples, {escape(what)}, "
                  f"model {escape(model)}")
    t0 = time.perf_counter()
    try:
        with console.status("loading the model"):
            for lm in lms:
                lm.start()
        console.print(f"model ready in {time.perf_counter() - t0:.1f} s")
        with progress() as update:
            result = evaluate(program, data, task.metric, num_threads=args.threads,
                              progress=lambda done, total: update("evaluating", done, total))
    finally:
        for lm in lms:
            lm.close()
    stdout().print(result_table(result, f"{task.name} / {args.split} / {model}"))
    if result.failures:
        console.print("failures by kind: " + ", ".join(f"{k}={v}" for k, v in sorted(result.failures.items())))
        first = next(r for r in result.records if r.failure)
        console.print(f"first failure (example {first.index}): {escape(str(first.error))}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result.to_dict(), fh, indent=1, default=str)
        console.print(f"records written to {args.json}")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from tandem.experiments.config import load_config
    from tandem.experiments.run import check_program_from, load_data, run_cell, write_json
    from tandem.lm.registry import get_lm
    from tandem.optimize.base import StepRecord

    cfg = load_config(args.config, args.set, task=args.task, model=args.model, strategy=args.strategy,
                      seed=args.seed, run_dir=args.run_dir, data=args.data, program_from=args.program_from)
    shared: dict = {}
    task, data = load_data(cfg, cache=shared)  # data errors before the model loads
    check_program_from(cfg, task, data)  # and a --from program of another task or model
    run_dir = cfg.default_run_dir()
    console.print(
        f"[bold]{escape(task.name)}[/] strategy [bold]{escape(cfg.strategy)}[/], seed {cfg.seed}, "
        f"model {escape(cfg.model)}: train {len(data['train'])} / dev {len(data['dev'])} / "
        f"test {len(data['test'])}; run dir {escape(str(run_dir))}"
    )
    t0 = time.perf_counter()
    lm = get_lm(cfg.model, **cfg.backend_options)
    with console.status("loading the model"):
        lm.start()
    load_s = time.perf_counter() - t0
    try:
        with progress() as update:
            summary = run_cell(cfg, lm, update, resume=args.resume, run_dir=run_dir, shared=shared, info=note)
    finally:
        lm.close()
    total_s = time.perf_counter() - t0
    summary["model_load_s"] = round(load_s, 1)
    if "tandem.lm.vllm" in sys.modules:  # where the in-process engines' time went
        summary["engines"] = sys.modules["tandem.lm.vllm"].engine_stats()
    write_json(run_dir / "results.json", summary)
    history = [StepRecord.from_dict(r) for r in summary["history"]]
    out = stdout()
    if history:
        out.print(steps_table(history, f"{task.name}: {cfg.strategy} (seed {cfg.seed})"))
    if history and history[0].kind == "start":
        out.print(f"start  dev {history[0].val_score:.1f}  (the given program, before any step)")
    chosen = chosen_text(summary, history)
    out.print(
        f"returned program: {chosen}; [bold]test {summary['test_score']:.1f}%[/] on {summary['test_n']} examples "
        f"({'start program' if cfg.program_from else 'zero-shot'} {summary['zero_shot_test_score']:.1f}%: "
        f"{summary['fixed']} fixed, {summary['broken']} broken{paired_text(summary.get('test_vs_baseline'))}); "
        f"total {total_s:.0f} s; saved to {escape(str(run_dir / 'final'))}"
    )
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from tandem.experiments.grid import load_experiment, run_experiment

    exp = load_experiment(args.config, args.set)
    cells = exp.cells()
    done = sum(c.done() for c in cells)
    console.print(
        f"[bold]experiment[/] {len(exp.tasks)} task(s) x {len(exp.models)} model(s) x "
        f"{len(exp.strategies)} strateg{'y' if len(exp.strategies) == 1 else 'ies'} x {len(exp.seeds)} seed(s) = "
        f"{len(cells)} runs, {done} already finished; out {escape(str(exp.out))}"
    )
    if args.dry_run:
        for c in cells:
            state = ("done, other settings" if c.stale() else "done") if c.done() else "todo"
            console.print(f"  {state}  {escape(c.label)}  ->  {escape(str(c.run_dir))}")
        return 0
    position = {c.label: i + 1 for i, c in enumerate(cells)}

    @contextmanager
    def progress_for(cell):
        console.rule(escape(f"[{position[cell.label]}/{len(cells)}] {cell.label}"))
        with progress(transient=True) as update:
            yield update

    def on_cell(cell, summary):
        if summary.get("status") == "ok":
            console.print(f"[green]done[/] {escape(cell.label)}: dev {summary['dev_score']:.1f}, "
                          f"[bold]test {summary['test_score']:.1f}[/] ({summary['wall_s']:.0f} s)")
        else:
            console.print(f"[red]failed[/] {escape(cell.label)}: {escape(str(summary.get('error')))}")

    doc = run_experiment(exp, progress_for=progress_for, on_cell=on_cell, info=note)
    print((exp.out / "table.md").read_text())
    failed = [c for c in doc["cells"] if c.get("status") == "failed"]
    console.print(escape(f"results: {exp.out / 'results.json'}, table: {exp.out / 'table.md'}; "
                         f"report: tandem report {exp.out}"))
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed[/]; run the same command again to retry them")
        return 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Two saved programs on the same examples: scores, fixed/broken, paired test (``tandem.compare``)."""
    from tandem.compare import compare_saved, summary_lines

    with progress(prefix="evaluating ") as update:
        c = compare_saved(args.a, args.b, task=args.task, split=args.split, data=args.data, seed=args.seed,
                          config=args.config, overrides=args.set, limit=args.limit,
                          lm_options={"cache": False} if args.no_cache else None, threads=args.threads,
                          progress=update)
    for line in c.notes:
        note(line)
    for line in summary_lines(c):
        stdout().print(line, markup=False, soft_wrap=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(c.to_dict(), fh, indent=1, default=str)
        console.print(f"comparison written to {escape(args.json)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tandem.experiments.report import write_report

    html_path, summary = write_report(args.run_dir, out=args.out, max_examples=args.examples)
    print(summary)
    console.print(f"report written to {escape(str(html_path))}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tandem.serve import parse_model_options, serve

    try:
        serve(args.path, host=args.host, port=args.port, model_options=parse_model_options(args.model_options),
              max_body_bytes=args.max_body_bytes, max_batch_items=args.max_batch,
              max_concurrency=args.concurrency, timeout_s=args.timeout,
              log_level="debug" if args.verbose else "info",
              info=lambda msg: note(msg, "warning"), log_dir=args.log)
    except OSError as exc:  # the port is taken, the host does not resolve
        error(exc)
        return 2
    return 0


SPLIT_CHOICES = ("train", "dev", "test", "all")
DATA_HELP = ("data file or folder (iris: a CSV, or a folder with iris.csv or one CSV; gsm8k/hotpotqa: "
             "train.jsonl or its folder), relative to the current directory (default: iris bundled; "
             "gsm8k/hotpotqa: ../shared/data/<task>; a task file's own)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default, ``(default: X)``, unless its help speaks of the default already or
    there is none to show (None, off, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text
                or action.default in (None, False, [], argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def verbose_option(p: argparse.ArgumentParser, top: bool = False) -> None:
    """``-v`` before the command (``top``) or anywhere after it: a command's own -v sets the value only
    when given, so it does not undo one given before the command."""
    p.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="log progress of the library and engines")


def data_options(p: argparse.ArgumentParser, split: str, json_help: str) -> None:
    """The options of eval and compare that choose the examples, and how they run."""
    p.add_argument("--split", default=split, choices=SPLIT_CHOICES,
                   help="which examples: the task's train, dev or test split, or all: every example of the data")
    p.add_argument("--seed", type=int, default=None, help="seed of the data split (default: the run's, else 0)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--config", default=None, help="TOML config file: its task, data, sizes (and model, format)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting, e.g. --set sizes=60,50,60 or --set data=my.csv")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N examples (N >= 1)")
    p.add_argument("--threads", type=positive_int, default=64, help="examples run concurrently")
    p.add_argument("--no-cache", action="store_true", help="don't read or write the call cache")
    p.add_argument("--json", default=None, help=json_help)


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's word
    """A command: its help also its description, defaults shown, ``-v`` accepted after it."""
    parser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    verbose_option(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbose_option(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = add_command(sub, "eval", help="evaluate a task's program, or a saved one, on a split or a data file")
    e.add_argument("task", nargs="?", default=None,
                   help="task name (e.g. iris) or task .py file; default: --config's, or the --program run's")
    e.add_argument("--program", default=None, metavar="DIR",
                   help="a saved program folder (program.json) or a run directory (its final program)")
    e.add_argument("--model", default=None, help="[backend:]model, e.g. smollm2-135m (default), hf:smollm2-135m, /path/to/checkpoint")
    data_options(e, "dev", "write per-example records to this file")
    e.set_defaults(func=cmd_eval)

    c = add_command(sub, "compare", help="two saved programs on the same examples: scores, fixed/broken, paired test")
    c.add_argument("a", metavar="A", help="a saved program folder or run directory")
    c.add_argument("b", metavar="B", help="another one")
    c.add_argument("task", nargs="?", default=None,
                   help="task name or .py file (default: the one A's run recorded, else B's)")
    data_options(c, "test", "write the comparison, with per-example records, to this file")
    c.set_defaults(func=cmd_compare)

    o = add_command(sub, "optimize", help="optimize a program's prompts and weights (BetterTogether)")
    o.add_argument("task", nargs="?", default=None, help="task name or task .py file (or set it in --config)")
    o.add_argument("--config", default=None, help="TOML config file (see examples/)")
    o.add_argument("--strategy", default=None, help='e.g. "p -> w -> p" (default), "p", "w -> p"')
    o.add_argument("--model", default=None, help="[backend:]model (default smollm2-135m)")
    o.add_argument("--seed", type=int, default=None, help="the run's seed (default 0), also its data split's")
    o.add_argument("--run-dir", default=None, help="default runs/<task>-<strategy>-s<seed>")
    o.add_argument("--data", default=None, help=DATA_HELP)
    o.add_argument("--resume", action="store_true", help="continue a killed run from its last finished step")
    o.add_argument("--from", dest="program_from", default=None, metavar="PROGRAM_DIR",
                   help="start from a saved program (its prompts and adapter; a run or deployment folder) "
                        "instead of the task's")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config setting, e.g. --set lora.epochs=3 --set sizes=50,50,50")
    o.set_defaults(func=cmd_optimize)

    x = add_command(sub, "experiment", help="run tasks x models x strategies x seeds; write results.json and table.md")
    x.add_argument("config", help="experiment TOML file (see examples/iris_table.toml)")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override: seeds=0,1 / tasks=iris / sizes=20,20,20 (every run) / "
                        "per_task.gsm8k.sizes=100,50,100 / lora.epochs=1")
    x.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; run nothing")
    x.set_defaults(func=cmd_experiment)

    r = add_command(sub, "report", help="one self-contained HTML report of a run or an experiment")
    r.add_argument("run_dir", help="a run directory (tandem optimize) or an experiment's out folder")
    r.add_argument("--out", default=None, help="HTML file (default RUN_DIR/report.html)")
    r.add_argument("--examples", type=int, default=8, help="fixed / broken examples shown per run")
    r.set_defaults(func=cmd_report)

    v = add_command(sub, "serve", help="serve a saved program as an HTTP JSON API (docs/serving.md)")
    v.add_argument("path", metavar="RUN_DIR", help="a run directory (its final/ is served) or a saved program directory")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on")
    v.add_argument("--model-options", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, repeatable: --model-options tensor_parallel_size=2 "
                        "--model-options base_url=http://host:8000/v1 (values parse as JSON, else text)")
    v.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get a 413")
    v.add_argument("--max-batch", type=int, default=64, help="most items in one /v1/predict_batch request")
    v.add_argument("--concurrency", type=int, default=64, help="program calls running at once")
    v.add_argument("--timeout", type=float, default=600.0, help="seconds before a request gets a 504 (0: no limit)")
    v.add_argument("--log", default=None, metavar="DIR", help="record every request (SQLite) and take feedback")
    v.set_defaults(func=cmd_serve)
    from tandem.cli_cycle import add_cycle_commands

    add_cycle_commands(sub, add_command)  # data from-log, promote (docs/cycle.md)
    return p


def _exit_on_signals() -> None:
    """Ctrl-C and SIGTERM stop the command: engines stopped and calls in flight failed, then
    ``Interrupted`` unwinds the main thread (``main`` prints one line). Engine processes never see
    Ctrl-C themselves (``tandem.interrupts``)."""
    def stop() -> None:
        engines = sys.modules.get("tandem.lm.vllm")
        if engines is not None:  # fail calls in flight, so worker threads don't run on to the end
            engines.abort()

    shield_children()
    on_signals(stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _exit_on_signals()
    logging.basicConfig(level=quiet.for_command(args.verbose), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as exc:
        error(exc)
        return 2
    except LMUnavailable as exc:  # every server down after the retries: the finished steps are on disk
        error(exc)
        if getattr(args, "resume", None) is not None:
            note("the run directory keeps every finished step: run the same command with --resume once a "
                 "server answers")
        return 1
    except (Interrupted, KeyboardInterrupt) as exc:  # Ctrl-C or SIGTERM
        console.print("interrupted", soft_wrap=True)
        return exc.exit_code if isinstance(exc, Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
