"""The engine's helper processes: watched while they start, killed when tandem dies without cleaning up.

vLLM runs its engine core and workers in child processes (3.5-4.5 GB each on
CPU). When tandem exits normally, or on SIGTERM/Ctrl-C, it shuts them down;
when it is SIGKILLed or OOM-killed it cannot, and they would live on as
orphans holding their memory. ``watch(children)`` starts a small watcher
process (its own session, so signals to tandem's process group don't reach
it) that polls the parent every half second and, once it is gone, kills the
listed processes (each identified by pid and start time, so a reused pid is
never hit).

``Watched`` follows the processes an engine start creates, so that one that
dies before the engine is up is noticed (``tandem.lm.vllm_engine``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Callable

import psutil

_WATCHER = r"""
import os, sys, time, signal
import psutil
parent, parent_start = int(sys.argv[1]), float(sys.argv[2])
targets = [(int(p), float(t)) for p, t in (a.split(":") for a in sys.argv[3:])]

def alive(pid, start):
    try:
        return abs(psutil.Process(pid).create_time() - start) < 0.01
    except psutil.Error:
        return False

while alive(parent, parent_start):
    if not any(alive(p, t) for p, t in targets):
        sys.exit(0)  # shut down normally
    time.sleep(0.5)
for p, t in targets:
    if alive(p, t):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
"""


def watch(pids: list[int]) -> subprocess.Popen | None:
    """Kill ``pids`` when this process dies. Returns the watcher, or None when none of them is alive."""
    targets = []
    for pid in pids:
        try:
            targets.append(f"{pid}:{psutil.Process(pid).create_time()}")
        except psutil.Error:
            continue
    if not targets:
        return None
    me = psutil.Process(os.getpid()).create_time()
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(os.getpid()), str(me), *targets],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


def children() -> set[int]:
    """The pids of this process's descendants."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


class Watched:
    """The processes added that ``wanted`` accepts, and which of them have ended."""

    def __init__(self, wanted: Callable[[psutil.Process], bool]) -> None:
        self.wanted = wanted
        self._procs: dict[int, psutil.Process] = {}

    def add(self, pids: set[int]) -> None:
        for pid in pids - set(self._procs):
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                continue  # gone before we saw what it was
            if self.wanted(proc):
                self._procs[pid] = proc

    def pids(self) -> set[int]:
        return set(self._procs)

    def dead(self) -> str | None:
        """``pid N (name)`` of a watched process that has ended, or None."""
        for pid, proc in self._procs.items():
            try:
                running = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                running = False
            if not running:
                return f"{pid} ({self._label(proc)})"
        return None

    @staticmethod
    def _label(proc: psutil.Process) -> str:
        try:
            return proc.name()
        except psutil.Error:
            return "python"


def kill(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that still runs."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
