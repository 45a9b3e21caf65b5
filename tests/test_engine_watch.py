"""The watch around an engine start (fast: real processes, a stand-in for vLLM's start)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import psutil
import pytest

from tandem.lm.vllm_engine import EngineStartError, engine_process, watched_start


def _sleep() -> None:
    time.sleep(120)


def _hanging_start(children: list, started: threading.Event):
    """Starts two engine-like processes, then waits forever, as vLLM does when a worker dies."""

    def start():
        for _ in range(2):
            p = multiprocessing.get_context("fork").Process(target=_sleep, daemon=True)
            p.start()
            children.append(p)
        started.set()
        threading.Event().wait()

    return start


def test_a_process_that_dies_during_the_start_ends_it_within_seconds():
    children: list = []
    started = threading.Event()

    def kill_one():
        started.wait(60)
        time.sleep(1.0)
        os.kill(children[0].pid, signal.SIGKILL)

    threading.Thread(target=kill_one, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match=r"engine X: its process \d+ .* died while it started"):
        watched_start(_hanging_start(children, started), "engine X", timeout=600)
    assert time.monotonic() - t0 < 30
    children[1].join(10)  # the other one was killed with it
    assert not children[1].is_alive()


def test_a_start_over_its_timeout_or_stopped_ends_with_a_clear_error():
    children: list = []
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match=r"did not start within 2 s .*TANDEM_ENGINE_START_TIMEOUT"):
        watched_start(_hanging_start(children, threading.Event()), "engine Y", timeout=2)
    assert time.monotonic() - t0 < 20
    for p in children:
        p.join(10)
        assert not p.is_alive()
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    with pytest.raises(EngineStartError, match="shutting down"):
        watched_start(_hanging_start([], threading.Event()), "engine Z", timeout=600, stop=stop.is_set)


def test_a_start_that_returns_or_raises_passes_through():
    assert watched_start(lambda: "engine", "engine", timeout=5) == ("engine", [])
    with pytest.raises(ValueError, match="bad option"):
        watched_start(lambda: (_ for _ in ()).throw(ValueError("bad option")), "engine", timeout=5)


def test_helper_scripts_are_not_engine_processes():
    import subprocess
    import sys

    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    spawned = multiprocessing.get_context("spawn").Process(target=_sleep, daemon=True)
    spawned.start()
    try:
        time.sleep(0.5)
        assert not engine_process(psutil.Process(helper.pid))
        assert engine_process(psutil.Process(spawned.pid))
    finally:
        helper.kill()
        spawned.kill()
        helper.wait()
        spawned.join()


def test_an_exception_in_the_waiting_thread_kills_the_started_processes():
    """A signal handler raising in the main thread (Ctrl-C, SIGTERM) ends the start and its processes."""
    import _thread

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # not a handler an earlier test left
    children: list = []
    started = threading.Event()

    def interrupt():
        started.wait(60)
        time.sleep(0.5)
        _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            watched_start(_hanging_start(children, started), "engine W", timeout=600)
    finally:
        signal.signal(signal.SIGINT, previous)
    for p in children:
        p.join(10)
        assert not p.is_alive()
