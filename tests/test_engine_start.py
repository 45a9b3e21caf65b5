"""Engine start-up is watched (#16 item 9): a worker that dies while the vLLM engine starts, or a
start that takes longer than its timeout, is an error within seconds, not a hang (slow: real vLLM)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow


def _running(pids: set[int]) -> list[int]:
    """Those of ``pids`` still running (zombies and multiprocessing's resource tracker aside)."""
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and not any("resource_tracker" in a for a in p.cmdline()):
                out.append(pid)
        except psutil.Error:
            continue
    return out


def _workers(me) -> list:
    """vLLM's workers: processes of this interpreter that the engine core (our child) started."""
    import psutil

    out = []
    for p in me.children(recursive=True):
        try:
            if p.ppid() != me.pid and os.path.realpath(p.exe()) == os.path.realpath(sys.executable):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_a_worker_killed_while_the_engine_starts_is_an_error_within_seconds(tiny_model_dir):
    pytest.importorskip("vllm")
    import psutil

    from tandem.lm.vllm import VLLM, EngineStartError, pool

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    killed: dict = {}

    def kill_the_worker():
        # The worker is the engine core's child (a grandchild of this process).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "at" not in killed:
            if _workers(me):
                time.sleep(2.0)  # well into its start (loading the model)
                for w in _workers(me):
                    try:
                        w.send_signal(signal.SIGKILL)
                        killed.setdefault("pids", []).append(w.pid)
                    except psutil.Error:
                        pass
                killed["at"] = time.monotonic()
                return
            time.sleep(0.05)

    lm = VLLM(tiny_model_dir, start_timeout=600)
    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    with pytest.raises(EngineStartError, match="died while it started"):
        lm.start()
    failed_at = time.monotonic()
    killer.join(5)
    assert killed.get("pids"), "no worker process appeared to kill"
    assert failed_at - killed["at"] < 30, f"the start failed {failed_at - killed['at']:.0f} s after the kill"
    time.sleep(1)
    left = _running({p.pid for p in me.children(recursive=True)} - before)
    assert not left, f"the start left processes behind: {left}"
    assert not pool.engines()


def test_a_start_over_its_timeout_is_an_error(tiny_model_dir):
    pytest.importorskip("vllm")
    import psutil

    from tandem.lm.vllm import VLLM, EngineStartError

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    lm = VLLM(tiny_model_dir, start_timeout=3)
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match=r"did not start within 3 s .*TANDEM_ENGINE_START_TIMEOUT"):
        lm.start()
    assert time.monotonic() - t0 < 30
    time.sleep(1)
    left = _running({p.pid for p in me.children(recursive=True)} - before)
    assert not left, f"the start left processes behind: {left}"
