"""A deployment folder: the champion ``tandem serve`` serves, the programs it replaced, and every decision.

    tandem promote runs/iris-p-s0 --init deploy/iris      # v1: the first champion
    tandem serve deploy/iris --log logs/iris              # serves deploy.json's champion
    tandem promote runs/iris-from-log --over deploy/iris --data data.jsonl   # v2, if it wins
    tandem promote --rollback deploy/iris                 # back to v1

Layout::

    DEPLOY/deploy.json      the pointer: {"champion": "v2", "stack": ["v1", "v2"], "events": [...]}
    DEPLOY/versions/v1/     a copy of the program (program.json, adapters/, the run's config.json)
    DEPLOY/versions/v2/
    DEPLOY/.lock            held while deploy.json changes (two promotions do not interleave)

A version folder is copied whole under a temporary name and renamed, and
deploy.json is then replaced in one ``os.replace``: a kill at any moment
leaves the old champion or the new one, never half of either (at worst an
unreferenced version folder, which the next promotion numbers past).
``stack`` is the champions in the order they were promoted; a rollback pops
the top one. ``events`` records every init, promotion, refused promotion and
rollback (who, when, and for a promotion the scores, p-value and data hash).
A server serving DEPLOY re-reads deploy.json on ``POST /v1/reload`` or
SIGHUP; version folders are never changed after they are written, so a
program in use is never rewritten under the server.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tandem.fileio import atomic_dir, write_json
from tandem.program.program_file import read_program_file, resolve_program_dir

FILE = "deploy.json"
FORMAT = "tandem.deployment"
FORMAT_VERSION = 1


class DeploymentError(ValueError):
    """Not a deployment folder, a corrupt deploy.json, nothing to roll back to; one line."""


def is_deployment(path: str | os.PathLike) -> bool:
    return (Path(path) / FILE).is_file()


def who(by: str | None = None) -> str:
    """``by``, else ``user@host``."""
    if by:
        return by
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read(deploy: str | os.PathLike) -> dict:
    """deploy.json, checked: its champion and stack name version folders that exist."""
    deploy = Path(deploy)
    path = deploy / FILE
    if not path.is_file():
        hint = f"; make one with: tandem promote PROGRAM --init {deploy}" if not deploy.exists() or deploy.is_dir() else ""
        raise DeploymentError(f"{deploy} is not a deployment folder (no {FILE}){hint}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"{path} cannot be read ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DeploymentError(f"{path} is not a tandem deployment file")
    stack = doc.get("stack")
    if not (isinstance(stack, list) and stack and doc.get("champion") == stack[-1]
            and all(isinstance(v, str) and (deploy / "versions" / v / "program.json").is_file() for v in stack)):
        raise DeploymentError(f"{path} is corrupt: its champion or stack names no saved version")
    doc.setdefault("events", [])
    return doc


def champion(deploy: str | os.PathLike) -> tuple[Path, str]:
    """``(program folder, version)`` of the deployment's champion."""
    doc = read(deploy)
    return Path(deploy) / "versions" / doc["champion"], doc["champion"]


def program_source(path: str | os.PathLike) -> Path:
    """The program folder of a deployment (its champion), a run directory (its final/) or a program folder."""
    return champion(path)[0] if is_deployment(path) else resolve_program_dir(path)


@contextmanager
def locked(deploy: Path) -> Iterator[None]:
    with open(deploy / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _copy_version(deploy: Path, program_dir: Path) -> str:
    """Copy ``program_dir`` (program.json, adapters/, the run's config.json) to the next version folder."""
    versions = deploy / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[1:]) for p in versions.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()]
    version = f"v{max(numbers, default=0) + 1}"
    with atomic_dir(versions / version) as tmp:
        shutil.copy2(program_dir / "program.json", tmp / "program.json")
        if (program_dir / "adapters").is_dir():
            shutil.copytree(program_dir / "adapters", tmp / "adapters")
        run_config = program_dir.parent / "config.json" if program_dir.name == "final" else program_dir / "config.json"
        if run_config.is_file():  # the run's task and data settings: what tandem.compare.run_settings reads
            shutil.copy2(run_config, tmp / "config.json")
    return version


def init(program: str | os.PathLike, deploy: str | os.PathLike, *, by: str | None = None) -> str:
    """Make a new deployment folder with ``program`` (a program or run directory) as v1."""
    deploy = Path(deploy)
    program_dir = resolve_program_dir(program)
    read_program_file(program_dir)  # a corrupt program.json is an error before anything is written
    if is_deployment(deploy):
        raise DeploymentError(f"{deploy} is a deployment already (champion {read(deploy)['champion']}); "
                              f"promote into it with: tandem promote PROGRAM --over {deploy} --data FILE")
    if deploy.exists() and (not deploy.is_dir() or any(p.name != ".lock" for p in deploy.iterdir())):
        raise DeploymentError(f"{deploy} exists and is not an empty folder; give a new folder for the deployment")
    deploy.mkdir(parents=True, exist_ok=True)
    with locked(deploy):
        version = _copy_version(deploy, program_dir)
        event = {"event": "init", "version": version, "source": str(Path(program).resolve()), "by": who(by),
                 "time": now()}
        write_json(deploy / FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, "champion": version,
                        "stack": [version], "events": [event]})
    return version


def promote(deploy: str | os.PathLike, program_dir: Path, record: dict, *, expect: str | None = None) -> str:
    """Copy ``program_dir`` in as the new champion and keep ``record`` (what the gate decided).

    ``expect``: the champion the gate compared against; if another promotion or a rollback
    changed it meanwhile, nothing is written (a DeploymentError)."""
    deploy = Path(deploy)
    with locked(deploy):
        doc = read(deploy)
        if expect is not None and doc["champion"] != expect:
            raise DeploymentError(f"the champion of {deploy} changed to {doc['champion']} while this promotion ran "
                                  f"against {expect}; run it again")
        version = _copy_version(deploy, program_dir)
        doc["events"].append({"event": "promote", "version": version, "previous": doc["champion"], **record})
        doc["stack"].append(version)
        doc["champion"] = version
        write_json(deploy / FILE, doc)
    return version


def note_refusal(deploy: str | os.PathLike, record: dict) -> None:
    """Keep a refused promotion's record (the champion stays)."""
    deploy = Path(deploy)
    with locked(deploy):
        doc = read(deploy)
        doc["events"].append({"event": "refuse", "champion": doc["champion"], **record})
        write_json(deploy / FILE, doc)


def rollback(deploy: str | os.PathLike, *, by: str | None = None) -> tuple[str, str]:
    """Restore the previous champion: ``(from_version, to_version)``."""
    deploy = Path(deploy)
    with locked(deploy):
        doc = read(deploy)
        if len(doc["stack"]) < 2:
            raise DeploymentError(f"{deploy} has no previous champion to roll back to (champion {doc['champion']} "
                                  "is the first)")
        was = doc["stack"].pop()
        doc["champion"] = doc["stack"][-1]
        doc["events"].append({"event": "rollback", "version": doc["champion"], "previous": was, "by": who(by),
                              "time": now()})
        write_json(deploy / FILE, doc)
    return was, doc["champion"]
