"""Kill a process's helper processes when it dies without cleaning up.

vLLM runs its engine core and workers in child processes (3.5-4.5 GB each on
CPU). When tandem exits normally, or on SIGTERM/Ctrl-C, it shuts them down;
when it is SIGKILLed or OOM-killed it cannot, and they would live on as
orphans holding their memory. ``watch(children)`` starts a small watcher
process (its own session, so signals to tandem's process group don't reach
it) that polls the parent every half second and, once it is gone, kills the
listed processes (each identified by pid and start time, so a reused pid is
never hit).
"""

from __future__ import annotations

import os
import subprocess
import sys

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
    """Kill ``pids`` when this process dies. Returns the watcher, or None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
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
    try:
        import psutil
    except ImportError:
        return set()
    return {p.pid for p in psutil.Process().children(recursive=True)}
