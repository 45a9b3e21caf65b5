"""Serve a saved program over HTTP: ``tandem serve RUN_DIR``.

    tandem serve runs/iris-pwp-s0                 # the run's final/ program, on 127.0.0.1:8000
    curl -s 127.0.0.1:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"inputs": {"sepal_length": "5.1", "sepal_width": "3.5", "petal_length": "1.4", "petal_width": "0.2"}}'

This module finds and loads the program of a run or program directory (``load_for_serving``),
and runs it (``serve``: load, bind the port, start the engines, run uvicorn, close the engines).
``docs/serving.md`` has every endpoint, example and error code. The rest lives in:

- ``tandem.serve_app``: ``create_app(program)``, the routes and their replies;
- ``tandem.serve_inputs``: the program's input fields and the request models;
- ``tandem.serve_http``: the error shape, the body limit, JSON replies from the HTTP parser.

``create_app`` and ``program_input_fields`` are importable from here as well.
"""

import ipaddress
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable

from tandem.program.module import Module
from tandem.program.persist import load_program, read_program_file, resolve_program_dir
from tandem.serve_app import MAX_BATCH_ITEMS, MAX_BODY_BYTES, MAX_CONCURRENCY, TIMEOUT_S, create_app
from tandem.serve_http import uvicorn_config
from tandem.serve_inputs import InputSpec, program_input_fields

__all__ = [
    "InputSpec", "bind_socket", "create_app", "is_loopback", "load_for_serving", "parse_model_options",
    "program_input_fields", "serve",
]

log = logging.getLogger(__name__)


# -- loading ----------------------------------------------------------------------------------
def _import_user_task(program_dir: Path) -> None:
    """A run of a task file (``task = "my_task.py"``) saved a class of that file: import it first."""
    config = program_dir.parent / "config.json"
    try:
        task = json.loads(config.read_text()).get("task", "")
    except (OSError, ValueError, AttributeError):
        return
    if not (isinstance(task, str) and task.endswith(".py")):
        return
    if not read_program_file(program_dir)["program"].startswith("tandem_user_task_"):
        return
    from tandem.experiments.config import RunConfig, resolve_task

    for candidate in (Path(task), program_dir.parent / task):
        if candidate.exists():
            resolve_task(RunConfig(task=str(candidate)))
            return


def load_for_serving(path: str | os.PathLike, model_options: dict | None = None) -> tuple[Module, Path, str]:
    """(program, its directory, a name for it) from a run or program directory.

    ``model_options`` go to the backends (``load_program(lm_options=...)``); the call cache is
    off unless they say ``cache=True``: a server would otherwise write every request to disk.
    """
    program_dir = resolve_program_dir(path)
    _import_user_task(program_dir)
    options = {"cache": False, **(model_options or {})}
    program = load_program(program_dir, lm_options=options)
    name = program_dir.parent.name if program_dir.name == "final" else program_dir.name
    return program, program_dir, name or type(program).__name__


def parse_model_options(items: list[str] | None) -> dict:
    """``["base_url=http://h:8000/v1", "tensor_parallel_size=2"]`` -> a dict; values are
    JSON when they parse as JSON (numbers, true/false, objects), else strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model option {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


# -- running ----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind now (a taken port fails before a model loads); uvicorn listens on it later."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port") from None
    sock.set_inheritable(True)
    return sock


def serve(
    path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_options: dict | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_batch_items: int = MAX_BATCH_ITEMS,
    max_concurrency: int = MAX_CONCURRENCY,
    timeout_s: float | None = TIMEOUT_S,
    log_level: str = "info",
    info: Callable[[str], None] | None = None,
) -> None:
    """Load the program at ``path``, start its engines and serve it until interrupted."""
    import uvicorn

    say = info or log.warning
    program, program_dir, name = load_for_serving(path, model_options)
    if not is_loopback(host):
        say(f"listening on {host}: anyone who can reach this machine can run the model; "
            "tandem serve has no authentication (put a proxy with auth in front, or bind 127.0.0.1)")
    sock = bind_socket(host, port)
    lms = program.lms()
    try:
        for lm in lms:
            lm.start()
        app = create_app(program, max_body_bytes=max_body_bytes, name=name, max_batch_items=max_batch_items,
                         max_concurrency=max_concurrency, timeout_s=timeout_s)
        config = uvicorn_config(app, log_level=log_level, timeout_graceful_shutdown=30)  # sets up its logging
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("uvicorn.error").info(
            "serving %s (%s) on http://%s:%d (Ctrl-C to stop)", name, program_dir, shown, port)
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
    finally:
        sock.close()
        for lm in lms:
            try:
                lm.close()
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.warning("closing %r failed: %s", lm, exc)
