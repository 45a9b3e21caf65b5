"""The watcher that kills an engine's processes when tandem is SIGKILLed (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")

PARENT = r"""
import subprocess, sys, time
from tandem.lm import reaper
before = reaper.children()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
watcher = reaper.watch(sorted(reaper.children() - before))
print(child.pid, watcher.pid, flush=True)
if sys.argv[1] == "exit-clean":
    child.kill(); child.wait()
    time.sleep(30)
time.sleep(300)
"""


def _start(mode: str):
    p = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    child, watcher = map(int, p.stdout.readline().split())
    return p, child, watcher


def _gone(pid: int, within: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_children_are_killed_when_the_parent_is_sigkilled():
    p, child, watcher = _start("kill")
    assert psutil.pid_exists(child)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert _gone(child, 10), "the orphaned child is still running"
    assert _gone(watcher, 10)


def test_watcher_exits_when_the_children_end_normally():
    p, child, watcher = _start("exit-clean")
    try:
        assert _gone(watcher, 10)
    finally:
        p.kill()
        p.wait()


def test_abort_refuses_new_engine_calls(tiny_model_dir):
    """After SIGTERM's abort(), no engine starts again (worker threads fail fast instead)."""
    pytest.importorskip("vllm")
    from tandem.lm.base import LMError
    from tandem.lm import vllm as vllm_backend

    lm = vllm_backend.VLLM(tiny_model_dir)
    vllm_backend.abort()
    try:
        with pytest.raises(LMError, match="shutting down"):
            lm.engine()
    finally:
        vllm_backend.pool.aborted.clear()
