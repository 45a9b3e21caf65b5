"""Scripted models and a real ``tandem serve`` process for the improvement-cycle tests (issue #18).

The model ``fake:m`` classifies irises by petal length, but calls every
non-setosa a virginica unless the prompt says ``Mind the versicolors``: a
champion without that instruction is wrong on versicolors, a challenger with
it is right on all. ``CYCLE_SLEEP`` (seconds, in the server's environment)
makes each reply slow, so a test can kill a server mid-burst.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from tandem.lm import FakeLM
from tandem.tasks.iris import IrisClassifier

FLOWER = {"sepal_length": "5.1", "sepal_width": "3.5", "petal_length": "1.4", "petal_width": "0.2"}
MARKER = "Mind the versicolors"


def species(petal: float, careful: bool) -> str:
    if petal < 2.5:
        return "setosa"
    if careful and petal < 4.85:
        return "versicolor"
    return "virginica"


def cycle_reply(text: str) -> str:
    delay = float(os.environ.get("CYCLE_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    petal = float(re.findall(r"Petal Length: ([\d.]+)", text)[-1])
    return f" petals {petal} cm.\nSpecies: {species(petal, MARKER in text)}"


def factory(model: str, **_options) -> FakeLM:
    return FakeLM(cycle_reply, name=model)


def iris_program(careful: bool = False, model: str = "m") -> IrisClassifier:
    program = IrisClassifier().set_lm(FakeLM(cycle_reply, name=model))
    if careful:
        sig = program.classify.signature
        program.classify.signature = sig.with_instructions(sig.instructions + " " + MARKER + ".")
    return program


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tandem_server(path: Path, *args: str, env: dict | None = None):
    """``tandem serve PATH --port P ARGS`` in a subprocess on ``fake:*``; yields (base URL, process)."""
    port = free_port()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from cycle_helpers import factory
        from tandem.lm.registry import register_backend
        from tandem.cli import main
        register_backend("fake", factory)
        sys.exit(main(["serve", {str(path)!r}, "--port", "{port}", *{list(args)!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(f"server did not start: {proc.stdout.read().decode()}")
                time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
