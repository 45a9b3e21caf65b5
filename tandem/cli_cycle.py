"""The improvement cycle's commands (docs/cycle.md): ``tandem data from-log`` and ``tandem promote``.

    tandem data from-log logs/iris --out data.jsonl --split 0.6,0.2,0.2
    tandem promote runs/iris-p-s0 --init deploy/iris
    tandem promote runs/iris-from-log --over deploy/iris --data data.jsonl --notify http://127.0.0.1:8000
    tandem promote --rollback deploy/iris --notify http://127.0.0.1:8000

``tandem.cli.build_parser`` registers them (``add_cycle_commands``). ``tandem serve --log`` and
``tandem optimize --from`` are options of those commands, in ``tandem.cli``.
"""

from __future__ import annotations

import argparse
from typing import Callable

from rich.markup import escape

from tandem.cli_output import console, note, progress, stdout


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def notify(url: str | None) -> None:
    """Ask the server at ``url`` to reload its program (``POST /v1/reload``); a failure is a warning."""
    if not url:
        return
    import httpx

    try:
        r = httpx.post(url.rstrip("/") + "/v1/reload", timeout=600)
    except httpx.HTTPError as exc:
        note(f"the server at {url} was not told to reload ({exc}); POST {url}/v1/reload or send it SIGHUP", "warning")
        return
    if r.status_code == 200:
        body = r.json()
        console.print(f"server {escape(url)} now serves version {escape(str(body.get('program_version')))} "
                      f"(was {escape(str(body.get('previous_version')))})", soft_wrap=True)
    else:
        note(f"the server at {url} did not reload ({r.status_code}: {r.text[:300]})", "warning")


def cmd_from_log(args: argparse.Namespace) -> int:
    from tandem.log_examples import from_log, parse_split

    stats = from_log(args.log_dir, args.out, split=parse_split(args.split), min_score=args.min_score)
    splits = stats["splits"]
    shown = (", ".join(f"{k} {v}" for k, v in splits.items()) + " (by request time)") if splits else "no splits"
    stdout().print(
        f"{stats['examples']} examples written to {args.out} ({shown}) from {stats['requests']} requests, "
        f"{stats['with_feedback']} with feedback; left out: {stats['duplicates']} duplicates, "
        f"{stats['low_score']} scored below {args.min_score}, {stats['no_label']} without a label",
        markup=False, soft_wrap=True)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tandem import deploy

    modes = [m for m in ("over", "init", "rollback") if getattr(args, m)]
    if len(modes) != 1:
        raise ValueError("say one of: --over DEPLOY (promote through the gate), --init DEPLOY (a new deployment) "
                         "or --rollback DEPLOY")
    if args.rollback:
        if args.challenger:
            raise ValueError("--rollback DEPLOY takes no CHALLENGER")
        was, now = deploy.rollback(args.rollback, by=args.by)
        stdout().print(f"rolled back {args.rollback}: champion {now} (was {was})", markup=False, soft_wrap=True)
        notify(args.notify)
        return 0
    if not args.challenger:
        raise ValueError(f"which program? tandem promote PROGRAM --{modes[0]} DEPLOY")
    if args.init:
        version = deploy.init(args.challenger, args.init, by=args.by)
        stdout().print(f"{args.init}: champion {version} = {args.challenger}; serve it with "
                       f"tandem serve {args.init}", markup=False, soft_wrap=True)
        return 0
    if not args.data:
        raise ValueError("--over needs --data FILE: the examples both programs run on")
    from tandem.compare import summary_lines
    from tandem.promote import run_gate

    with progress(prefix="evaluating ") as update:
        outcome = run_gate(args.challenger, args.over, args.data, split=args.split, alpha=args.alpha,
                           guard=args.guard, guard_tolerance=args.guard_tolerance, task=args.task, by=args.by,
                           limit=args.limit, threads=args.threads, progress=update)
    out = stdout()
    for line in summary_lines(outcome.comparison):
        out.print(line, markup=False, soft_wrap=True)
    g = outcome.record["guard"]
    if g:
        out.print(f"guard {g['name']}: champion {g['champion']}, challenger {g['challenger']} "
                  f"({'lower' if g['lower_is_better'] else 'higher'} is better, tolerance {g['tolerance']}): "
                  f"{'passed' if g['passed'] else 'failed'}", markup=False, soft_wrap=True)
    if outcome.promoted:
        out.print(f"promoted: {outcome.record['reason']}; champion of {args.over} is now {outcome.version}",
                  markup=False, soft_wrap=True)
        notify(args.notify)
        return 0
    out.print(f"refused: {outcome.record['reason']}; the champion stays {outcome.record['champion']}",
              markup=False, soft_wrap=True)
    return 1


def add_cycle_commands(sub, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    d = add_command(sub, "data", help="make data files: from-log turns logged requests with feedback into examples")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND",
                            help="from-log: examples from a request log")
    f = add_command(dsub, "from-log", help="requests with feedback from a request log (tandem serve --log) "
                                           "as examples of the task, JSON lines")
    f.add_argument("log_dir", metavar="DIR", help="the request log folder (tandem serve --log DIR)")
    f.add_argument("--out", required=True, metavar="FILE", help="the examples file to write (JSON lines), e.g. data.jsonl")
    f.add_argument("--split", default=None, metavar="TRAIN,DEV,TEST",
                   help="fractions by request time, e.g. 0.6,0.2,0.2: oldest to train, newest to test "
                        "(default: no splits; tandem optimize then splits at random with its seed)")
    f.add_argument("--min-score", type=_float, default=1.0, metavar="S",
                   help="a feedback with only a score keeps the served answer as the label when the score is at "
                        "least this")
    f.set_defaults(func=cmd_from_log)

    p = add_command(sub, "promote", help="promote a challenger over the served champion if it is significantly "
                                         "better (or start a deployment, or roll back)")
    p.add_argument("challenger", metavar="CHALLENGER", nargs="?", default=None,
                   help="a saved program folder or run directory")
    p.add_argument("--over", default=None, metavar="DEPLOY", help="the deployment folder whose champion it must beat")
    p.add_argument("--init", default=None, metavar="DEPLOY", help="make a new deployment folder with CHALLENGER "
                                                                  "as its first champion (no gate)")
    p.add_argument("--rollback", default=None, metavar="DEPLOY", help="restore DEPLOY's previous champion")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="examples both run on: a tandem data from-log file, or the task's data")
    p.add_argument("--split", default=None, choices=("train", "dev", "test", "all"),
                   help="which examples of --data (default: test when it has one, else all of an examples file)")
    p.add_argument("--alpha", type=_float, default=0.05, metavar="A", help="significance level of the paired test")
    p.add_argument("--guard", default=None, metavar="NAME",
                   help="also no worse on: failures, tokens, output_tokens, calls, or module:function (a metric)")
    p.add_argument("--guard-tolerance", type=_float, default=0.0, metavar="X",
                   help="how much worse the guard may be, in its units: percent points, tokens, calls "
                        "(default 0: not worse at all)")
    p.add_argument("--task", default=None, help="the task (default: the one the programs' runs recorded)")
    p.add_argument("--limit", type=_count, default=None, metavar="N", help="only the first N examples")
    p.add_argument("--threads", type=_count, default=64, metavar="N", help="examples run concurrently")
    p.add_argument("--by", default=None, metavar="NAME", help="who promotes, for the record (default: user@host)")
    p.add_argument("--notify", default=None, metavar="URL",
                   help="a server to reload afterwards, e.g. http://127.0.0.1:8000 (POST /v1/reload)")
    p.set_defaults(func=cmd_promote)


__all__ = ["add_cycle_commands", "cmd_from_log", "cmd_promote", "notify"]
