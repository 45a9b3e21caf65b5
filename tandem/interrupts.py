"""Ctrl-C and SIGTERM: tandem's main process stops, and stops its helper processes itself.

A terminal sends Ctrl-C's SIGINT to every process of its foreground group:
tandem, and vLLM's engine core and worker processes. An engine process that
gets it while the model loads dies with a long traceback, and its parent
then reports a failed start. ``shield_children()`` makes every process that
``multiprocessing`` starts from then on begin with SIGINT blocked (a
blocked signal stays blocked across fork and exec, and installing a Python
handler does not unblock it; CPython starts its own resource tracker the
same way). Only the main process reacts to Ctrl-C; the engines still get
the SIGTERM with which tandem (or vLLM) shuts them down.

``on_signals(stop)`` turns SIGINT and SIGTERM into ``Interrupted`` in the
main thread, after ``stop()`` (which fails calls in flight, so threads
waiting on them end in seconds). A second signal while the first unwinds,
or one while the interpreter exits, is ignored: the shutdown under way is
bounded (vLLM kills an engine process that does not exit within seconds).
"""

from __future__ import annotations

import multiprocessing.util
import os
import signal
import threading
from typing import Callable

__all__ = ["Interrupted", "on_signals", "shield_children"]


class Interrupted(SystemExit):
    """SIGINT or SIGTERM arrived (``signum``); the exit code is the shell's 128 + signum.

    A ``SystemExit``, not a ``KeyboardInterrupt``: vLLM catches KeyboardInterrupt around its
    sockets and carries on loading the model, and code that catches ``Exception`` must not
    swallow it either."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def shield_children() -> None:
    """Processes that ``multiprocessing`` starts from now on (spawn, forkserver or fork) do not get
    SIGINT. Idempotent."""
    spawn = multiprocessing.util.spawnv_passfds
    if getattr(spawn, "tandem_shielded", False):
        return

    def spawnv_passfds(path, args, passfds):
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return spawn(path, args, passfds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    spawnv_passfds.tandem_shielded = True  # type: ignore[attr-defined]
    spawnv_passfds.__wrapped__ = spawn  # type: ignore[attr-defined]
    multiprocessing.util.spawnv_passfds = spawnv_passfds  # popen_spawn_posix and forkserver call it by this name

    masks = threading.local()  # the forking thread's mask, restored in the parent after os.fork()

    def before() -> None:
        masks.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def after_in_parent() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, masks.old)

    os.register_at_fork(before=before, after_in_parent=after_in_parent)


def on_signals(stop: Callable[[], None]) -> None:
    """In the main thread: SIGINT and SIGTERM call ``stop()`` and raise ``Interrupted``. Ignored:
    later signals, and signals while the interpreter exits (the engines' shutdown at exit runs to
    its end instead of ending in a traceback). Outside the main thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        return
    fired: list[int] = []

    def handler(signum, frame):  # noqa: ARG001
        if fired or not threading.main_thread().is_alive():  # not alive: atexit handlers are running
            return
        fired.append(signum)
        stop()
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
