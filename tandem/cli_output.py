"""What the ``tandem`` command prints: errors, notes, progress and tables.

Everything here reads at 80 columns and in a log file. On a terminal,
progress is rich bars; anywhere else (a pipe, a log file, CI) it is plain
lines, ``label: done/total (elapsed s)``, when a phase starts, every
``interval_s`` seconds and when it ends. Tables are compact (no cell
borders, whole headers) and a step's detail goes on its own wrapped line
under the table, not into a column one word wide. Text from the library
(errors, details, labels) is printed literally: a ``[lora]`` in it is text,
not rich markup.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

# Progress, notes and errors; results go to stdout. No emoji codes: "model fake:m: ..." is text.
console = Console(stderr=True, emoji=False)

ProgressFn = Callable[[str, int, int], None]


def stdout() -> Console:
    """A console on stdout, for results (tables, the summary line)."""
    return Console(emoji=False)


def error(message: object) -> None:
    """Print ``error: <message>`` on one line (not wrapped), the message literally: a ``[lora]`` in it
    is text, not a markup tag."""
    console.print(f"[red]error:[/] {escape(str(message))}", soft_wrap=True)


def note(message: object, label: str = "note") -> None:
    """Print ``<label>: <message>`` (yellow label) on one line, the message literally."""
    console.print(f"[yellow]{label}:[/] {escape(str(message))}", soft_wrap=True)


# -- progress ---------------------------------------------------------------------------------------
class StepProgress:
    """One bar per phase label ("bootstrap", "candidates", "training", ...), for optimizer callbacks."""

    def __init__(self, bar: Progress, prefix: str = "") -> None:
        self.bar, self.prefix, self.tasks = bar, prefix, {}

    def __call__(self, label: str, done: int, total: int, status: str | None = None) -> None:
        key = self.prefix + label
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(escape(key), total=total or None)
        shown = {"description": escape(f"{key} ({status})")} if status else {}
        self.bar.update(self.tasks[key], completed=done, total=total or None, **shown)


class LogProgress:
    """Progress as plain lines, for output that is not a terminal: ``label: done/total (elapsed s)``
    when a phase starts, at most every ``interval_s`` seconds while it runs, and when it ends.

    A label that comes again from 0, from 1 after it finished, or with another total (the
    next step's "bootstrap") starts a new phase, its time counted from there; any other
    smaller count (threads report out of order) is ignored. A count that comes with a
    ``status`` (the RL step's mean reward) is printed each time, with it.
    """

    def __init__(self, out: Console, prefix: str = "", interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.prefix, self.interval_s, self.clock = out, prefix, interval_s, clock
        self.phases: dict[str, dict] = {}
        self.lock = threading.Lock()

    def __call__(self, label: str, done: int, total: int, status: str | None = None) -> None:
        key, now = self.prefix + label, self.clock()
        with self.lock:
            phase = self.phases.get(key)
            if (phase is None or total != phase["total"] or (phase["finished"] and done <= 1)
                    or (done == 0 < phase["done"])):
                phase = self.phases[key] = {"start": now, "printed": now, "done": done, "total": total,
                                            "finished": bool(total) and done >= total}
                self._line(key, done, total, 0.0, status)
                return
            if done < phase["done"]:  # threads report out of order: a count that went back is stale
                return
            advanced, phase["done"] = done > phase["done"], done
            finished = bool(total) and done >= total
            if ((finished and not phase["finished"]) or (status and advanced)
                    or (not finished and now - phase["printed"] >= self.interval_s)):
                phase["printed"], phase["finished"] = now, finished
                self._line(key, done, total, now - phase["start"], status)

    def _line(self, key: str, done: int, total: int, elapsed: float, status: str | None = None) -> None:
        count = f"{done}/{total}" if total else str(done)
        self.out.print(f"{key}: {count} ({elapsed:.0f} s)" + (f", {status}" if status else ""), markup=False,
                       highlight=False, emoji=False, soft_wrap=True)


@contextmanager
def progress(out: Console | None = None, prefix: str = "", transient: bool = False, interval_s: float = 10.0,
             clock: Callable[[], float] = time.monotonic) -> Iterator[ProgressFn]:
    """A ``progress(label, done, total)`` callback: bars on a terminal, else periodic plain lines."""
    out = out or console
    if not out.is_terminal:
        yield LogProgress(out, prefix, interval_s, clock)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=out, transient=transient) as bar:
        yield StepProgress(bar, prefix)


# -- tables -----------------------------------------------------------------------------------------
def _table(title: str, columns: list[tuple[str, str]], wrap: tuple[str, ...] = ()) -> Table:
    """A compact table: a rule under the header, two spaces between columns, no borders; headers
    are never cut, and only the ``wrap`` columns may take a second line."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  padding=(0, 1), title_justify="left")
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name not in wrap, min_width=len(name))
    return table


def _count(n: int) -> str:
    return f"{n:,}"


def _score(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


STEP_COLUMNS = [("step", "right"), ("kind", "left"), ("status", "left"), ("dev %", "right"), ("inner %", "right"),
                ("wall s", "right"), ("LM calls", "right"), ("tokens", "right"), ("SFT ex", "right")]


def steps_table(history, title: str) -> RenderableType:
    """The steps of a run (BetterTogether's ``history``: ``[0]`` is the start, the given program), one
    row each, then each step's detail on its own lines: ``<index> <kind>: <detail>``, wrapped."""
    table = _table(title, STEP_COLUMNS, wrap=("status",))
    details = Table.grid(padding=(0, 1))
    details.add_column(no_wrap=True)
    details.add_column(overflow="fold")
    for r in history:
        u = r.usage or {}
        table.add_row(
            str(r.index), Text(r.kind), Text(r.status.replace("_", " ")), _score(r.val_score), _score(r.inner_score),
            f"{r.wall_s:.0f}", _count(u.get("calls", 0)),
            _count(u.get("prompt_tokens", 0) + u.get("output_tokens", 0)),
            str(r.train_examples) if r.kind == "w" else "-",
        )
        if r.detail:
            details.add_row(Text(f"{r.index} {r.kind}:"), Text(r.detail))
    return Group(table, details) if details.row_count else table


def result_table(result, title: str) -> Table:
    """One evaluation (``EvalResult``): score, counts, time and tokens, in one row."""
    table = _table(title, [(name, "right") for name in (
        "score %", "correct", "n", "failed", "wall s", "LM calls", "cached", "prompt tok", "output tok")])
    u = result.usage
    table.add_row(f"{result.score:.1f}", f"{result.correct:g}", str(result.n), str(result.n_failed),
                  f"{result.wall_s:.1f}", _count(u.calls), _count(u.cached_calls), _count(u.prompt_tokens),
                  _count(u.output_tokens))
    return table


def chosen_text(summary: dict, history) -> str:
    """Which program a run returned: a step's, the start (history index 0), or the program as it is."""
    best, dev = summary["best_step"], summary["dev_score"]
    if best is None:
        return f"the program as it is (dev {dev:.1f})"
    if best == 0:
        return f"the start, the given program (dev {dev:.1f}; every step scored lower)"
    kind = history[best].kind if best < len(history) else "?"
    return f"step {best} ({kind}, dev {dev:.1f})"


def paired_text(test: dict | None) -> str:
    """``; +40.0 points [+26.0, +54.0], McNemar p < 0.001`` for a run's test against its baseline, or ``""``."""
    if not test:
        return ""
    p = test["p_value"]
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    method = "McNemar" if test["method"].startswith("mcnemar") else "paired bootstrap"
    lo, hi = test["ci95"]
    return f"; {test['diff']:+.1f} points [{lo:+.1f}, {hi:+.1f}], {method} {p_text}"
