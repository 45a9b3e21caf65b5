"""Serve a saved program over HTTP: ``tandem serve RUN_DIR``.

    tandem serve runs/iris-pwp-s0                 # the run's final/ program, on 127.0.0.1:8000
    curl -s 127.0.0.1:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"inputs": {"sepal_length": "5.1", "sepal_width": "3.5", "petal_length": "1.4", "petal_width": "0.2"}}'

This module finds and loads the program of a run, program or deployment directory
(``load_for_serving``; a deployment, ``tandem.deploy``, serves its champion), and runs it
(``serve``: load, bind the port, start the engines, open the request log, run uvicorn, close the
engines). A served deployment or program folder is loaded again on ``POST /v1/reload`` or SIGHUP.
``docs/serving.md`` has every endpoint, example and error code. The rest lives in:

- ``tandem.serve_app``: ``create_app(program)``, the routes and their replies;
- ``tandem.program.fields``: the program's input and label fields;
- ``tandem.serve_inputs``: the request models and feedback checks;
- ``tandem.serve_http``: the error shape, the body limit, JSON replies from the HTTP parser;
- ``tandem.serve_log``: the request log (``--log DIR``) and its feedback.

``create_app`` and ``program_input_fields`` are importable from here as well.
"""

import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from tandem.persist import load_program, read_program_file, resolve_program_dir
from tandem.program.fields import InputSpec, program_input_fields, program_label_fields
from tandem.program.module import Module
from tandem.serve_app import MAX_BATCH_ITEMS, MAX_BODY_BYTES, MAX_CONCURRENCY, TIMEOUT_S, create_app
from tandem.serve_http import uvicorn_config

__all__ = [
    "InputSpec", "bind_socket", "create_app", "is_loopback", "load_for_serving", "parse_model_options",
    "program_input_fields", "program_version", "serve",
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


def load_for_serving(path: str | os.PathLike, model_options: dict | None = None, *,
                     lms: dict | None = None) -> tuple[Module, Path, str]:
    """(program, its directory, a name for it) from a run, program or deployment directory.

    ``model_options`` go to the backends (``load_program(lm_options=...)``); the call cache is
    off unless they say ``cache=True``: a server would otherwise write every request to disk.
    ``lms``: LMs built before, by model (a reload shares the engines of the first load).
    """
    from tandem.deploy import is_deployment, program_source

    program_dir = program_source(path)
    _import_user_task(program_dir)
    options = {"cache": False, **(model_options or {})}
    program = load_program(program_dir, lm_options=options, lms=lms)
    if is_deployment(path):
        name = Path(path).resolve().name
    else:
        name = program_dir.parent.name if program_dir.name == "final" else program_dir.name
    return program, program_dir, name or type(program).__name__


def program_version(path: str | os.PathLike, program_dir: Path) -> str:
    """A deployment's champion version (``v3``), else the first 12 hex digits of program.json's sha256."""
    from tandem.deploy import is_deployment

    if is_deployment(path):
        return program_dir.name
    return hashlib.sha256((program_dir / "program.json").read_bytes()).hexdigest()[:12]


def parse_model_options(items: list[str] | None) -> dict:
    """``["base_url=http://h:8000/v1", "tensor_parallel_size=2"]`` -> a dict, read as ``--set`` is
    (``tandem.experiments.overrides``): TOML or JSON values (numbers, true/false, objects), else text."""
    from tandem.experiments.overrides import parse_options

    return parse_options(items, "--model-options")


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
    log_dir: str | os.PathLike | None = None,
) -> None:
    """Load the program at ``path``, start its engines and serve it until interrupted.

    ``log_dir``: the request log (``tandem.serve_log``), made when new. SIGHUP reloads ``path``
    (a deployment's champion may have changed), as ``POST /v1/reload`` does."""
    import uvicorn

    from tandem.serve_log import RequestLog

    say = info or log.warning
    built: dict = {}  # every LM built, by model: reloads share engines; all closed at the end
    started: dict[int, object] = {}

    def load() -> tuple[Module, str]:
        program, program_dir, _ = load_for_serving(path, model_options, lms=built)
        for lm in program.lms():
            if id(lm) not in started:
                lm.start()
                started[id(lm)] = lm
        return program, program_version(path, program_dir)

    program, program_dir, name = load_for_serving(path, model_options, lms=built)
    version = program_version(path, program_dir)
    cls = type(program)
    request_log = None
    if log_dir is not None:  # a bad --log is an error before the port is taken or a model loads
        request_log = RequestLog.create(
            log_dir, program=f"{cls.__module__}:{cls.__qualname__}",
            input_fields=[f.name for f in program_input_fields(program)[0]],
            label_fields=[s.name for s in program_label_fields(program)])
    if not is_loopback(host):
        say(f"listening on {host}: anyone who can reach this machine can run the model; "
            "tandem serve has no authentication (put a proxy with auth in front, or bind 127.0.0.1)")
    try:
        sock = bind_socket(host, port)
    except OSError:
        if request_log is not None:
            request_log.close()
        raise
    old_hup = None
    try:
        for lm in program.lms():
            lm.start()
            started[id(lm)] = lm
        app = create_app(program, max_body_bytes=max_body_bytes, name=name, max_batch_items=max_batch_items,
                         max_concurrency=max_concurrency, timeout_s=timeout_s, version=version,
                         request_log=request_log, reloader=load)
        config = uvicorn_config(app, log_level=log_level, timeout_graceful_shutdown=30)  # sets up its logging
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("uvicorn.error").info(
            "serving %s version %s (%s) on http://%s:%d (Ctrl-C to stop)%s", name, version, program_dir, shown,
            port, f"; request log {log_dir}" if log_dir is not None else "")
        old_hup = _reload_on_sighup(app.state.reload)
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
    finally:
        if old_hup is not None:
            signal.signal(signal.SIGHUP, old_hup)
        sock.close()
        for lm in started.values():
            try:
                lm.close()
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.warning("closing %r failed: %s", lm, exc)
        if request_log is not None:
            request_log.close()


def _reload_on_sighup(reload: Callable[[], dict]):
    """SIGHUP reloads the program in a thread (the signal handler returns at once); the old handler."""

    def run() -> None:
        try:
            reload()
        except Exception as exc:  # noqa: BLE001 - the served program stays
            logging.getLogger("uvicorn.error").error("reload on SIGHUP failed, still serving the old program: %s",
                                                     exc)

    def handler(signum, frame):  # noqa: ARG001
        threading.Thread(target=run, name="tandem-reload", daemon=True).start()

    try:
        return signal.signal(signal.SIGHUP, handler)
    except ValueError:  # not the main thread
        return None
