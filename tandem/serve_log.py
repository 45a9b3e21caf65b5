"""The request log of ``tandem serve --log DIR``: every answered request and its feedback, in SQLite.

    log = RequestLog.create("logs/iris", program="tandem.tasks.iris:IrisClassifier",
                            input_fields=["sepal_length", ...], label_fields=["species"])
    log.record(request_id, time.time(), "/v1/predict", inputs, 200, outputs, None, usage, 0.01, "v1")
    log.add_feedback(request_id, label={"species": "setosa"}, score=None)
    log = RequestLog.open("logs/iris")               # read it back (tandem data from-log)
    for row in log.with_feedback(): ...

``DIR/requests.sqlite`` in WAL mode with ``synchronous=FULL``: ``record`` commits
(and the commit reaches the disk) before it returns, and the server sends an
answer only after ``record`` returned, so a server killed with SIGKILL (or a
machine that loses power) loses no request that was answered. Readers
(``tandem data from-log``) may read while the server writes.

Tables:

- ``meta``: ``format`` (``tandem.request_log``), ``format_version``, ``program``
  (the served class), ``input_fields`` and ``label_fields`` (JSON lists), ``created``;
- ``requests``: ``id``, ``time`` (unix seconds, when the request was taken), ``endpoint``,
  ``inputs``, ``outputs`` (JSON; null when the program failed), ``status``,
  ``error`` (the error object, JSON), ``usage`` (JSON), ``latency_s``, ``program_version``;
- ``feedback``: ``seq`` (order given), ``request_id``, ``time``, ``label`` (JSON object
  ``{field: value}`` or null), ``score`` (0..1 or null), ``comment``. Every feedback
  is kept; readers take the last one of a request (``with_feedback``).

One connection, shared by the server's threads under a lock (SQLite writes
one transaction at a time anyway).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

FORMAT = "tandem.request_log"
FORMAT_VERSION = 1
DB_NAME = "requests.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
  id TEXT PRIMARY KEY, time REAL NOT NULL, endpoint TEXT NOT NULL, inputs TEXT NOT NULL,
  outputs TEXT, status INTEGER NOT NULL, error TEXT, usage TEXT, latency_s REAL,
  program_version TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL REFERENCES requests(id),
  time REAL NOT NULL, label TEXT, score REAL, comment TEXT);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id, seq);
CREATE INDEX IF NOT EXISTS requests_time ON requests(time);
"""


class LogError(ValueError):
    """A folder that is not a request log, or a log of another program; the message says which and why."""


class UnknownRequest(KeyError):
    """Feedback for a request id the log does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class LoggedRequest:
    """A request with its last feedback (``with_feedback``)."""

    id: str
    time: float
    inputs: dict
    outputs: dict | None
    status: int
    program_version: str
    label: dict | None  # the last feedback's
    score: float | None
    feedback_time: float
    feedback_count: int


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class RequestLog:
    """A request log folder; build with ``create`` (server) or ``open`` (readers)."""

    def __init__(self, directory: Path, conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
        self.directory, self._conn, self.meta = directory, conn, meta
        self._lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:  # a folder we may not write to, say
            raise LogError(f"cannot open the request log {path}: {exc}") from None
        return conn

    @staticmethod
    def _read_meta(conn: sqlite3.Connection, where: Path) -> dict[str, Any]:
        try:
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:  # not a database, or no meta table
            raise LogError(f"{where} is not a tandem request log ({exc})") from None
        if rows.get("format") != FORMAT:
            raise LogError(f"{where} is not a tandem request log (format {rows.get('format')!r})")
        version = int(rows.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise LogError(f"{where} is a request log of format version {version}; this tandem reads up to "
                           f"{FORMAT_VERSION}: upgrade tandem")
        return {"program": rows.get("program", ""), "created": rows.get("created", ""),
                "input_fields": json.loads(rows.get("input_fields", "[]")),
                "label_fields": json.loads(rows.get("label_fields", "[]"))}

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "RequestLog":
        """An existing log, to read (and add feedback to); a one-line LogError when ``directory`` is not one."""
        directory = Path(directory)
        db = directory / DB_NAME
        if not directory.is_dir():
            raise LogError(f"{directory} is not a request log: no such folder")
        if not db.is_file():
            raise LogError(f"{directory} is not a request log: it has no {DB_NAME} (tandem serve --log DIR makes one)")
        conn = cls._connect(db)
        try:
            return cls(directory, conn, cls._read_meta(conn, db))
        except BaseException:
            conn.close()
            raise

    @classmethod
    def create(cls, directory: str | os.PathLike, *, program: str, input_fields: list[str],
               label_fields: list[str]) -> "RequestLog":
        """Open the log in ``directory`` for a server of ``program``, making it when the folder is new or empty.

        A folder holding other files, a log of another program class, or a log whose input or
        label fields differ is a LogError: a log holds the requests of one program's task.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise LogError(f"--log {directory} is a file; give a folder (it is made if missing)")
        db = directory / DB_NAME
        if directory.is_dir() and not db.exists() and any(directory.iterdir()):
            raise LogError(f"--log {directory} holds other files and no {DB_NAME}; give a new or empty folder, "
                           "or an existing request log")
        if db.exists() and db.stat().st_size > 0:  # (an empty file: a log whose making was cut short)
            log = cls.open(directory)
            want = {"program": program, "input_fields": list(input_fields), "label_fields": list(label_fields)}
            for key, value in want.items():
                if log.meta[key] != value:
                    log.close()
                    raise LogError(f"--log {directory} holds requests of another program ({key} {log.meta[key]!r}, "
                                   f"this one's {value!r}); give another folder")
            log._wal()
            return log
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogError(f"cannot make the request log folder {directory}: {exc.strerror or exc}") from None
        conn = cls._connect(db)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "program": program,
                "input_fields": json.dumps(list(input_fields)), "label_fields": json.dumps(list(label_fields)),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:  # the schema and meta in one transaction: a kill leaves a whole log or an empty file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise LogError(f"cannot write the request log {db}: {exc}") from None
        log = cls(directory, conn, cls._read_meta(conn, db))
        log._wal()
        return log

    def _wal(self) -> None:
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before record() returns

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- writing ----------------------------------------------------------------------------
    def record(self, request_id: str, received: float, endpoint: str, inputs: dict, status: int,
               outputs: dict | None, error: dict | None, usage: dict | None, latency_s: float | None,
               program_version: str) -> None:
        """Write one answered request and commit it (to disk) before returning."""
        row = (request_id, received, endpoint, _dumps(inputs), _dumps(outputs), status, _dumps(error),
               _dumps(usage), latency_s, program_version)
        with self._lock:
            self._conn.execute("INSERT INTO requests (id, time, endpoint, inputs, outputs, status, error, usage, "
                               "latency_s, program_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def add_feedback(self, request_id: str, *, label: dict | None = None, score: float | None = None,
                     comment: str | None = None) -> int:
        """Keep one feedback of a logged request; returns how many that request has now.
        An id the log does not hold is an UnknownRequest (nothing is written)."""
        if label is not None and not isinstance(label, dict):
            raise TypeError(f"a label is an object of label fields, got {label!r}")
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is None:
                    raise UnknownRequest(f"no request {request_id!r} in the log")
                conn.execute("INSERT INTO feedback (request_id, time, label, score, comment) VALUES (?, ?, ?, ?, ?)",
                             (request_id, time.time(), _dumps(label), score, comment))
                (count,) = conn.execute("SELECT COUNT(*) FROM feedback WHERE request_id = ?", (request_id,)).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return int(count)

    # -- reading ----------------------------------------------------------------------------
    def count(self) -> dict[str, int]:
        """``{"requests": n, "feedback": n, "requests_with_feedback": n}``."""
        with self._lock:
            c = self._conn
            return {"requests": c.execute("SELECT COUNT(*) FROM requests").fetchone()[0],
                    "feedback": c.execute("SELECT COUNT(*) FROM feedback").fetchone()[0],
                    "requests_with_feedback": c.execute(
                        "SELECT COUNT(DISTINCT request_id) FROM feedback").fetchone()[0]}

    def get(self, request_id: str) -> dict | None:
        """One request as stored (JSON fields decoded), or None."""
        with self._lock:
            cur = self._conn.execute("SELECT * FROM requests WHERE id = ?", (request_id,))
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        if row is None:
            return None
        out = dict(zip(names, row))
        for key in ("inputs", "outputs", "error", "usage"):
            out[key] = _loads(out[key])
        return out

    def ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT id FROM requests")}

    def feedback_of(self, request_id: str) -> list[dict]:
        """Every feedback of a request, in the order given."""
        with self._lock:
            rows = self._conn.execute("SELECT seq, time, label, score, comment FROM feedback WHERE request_id = ? "
                                      "ORDER BY seq", (request_id,)).fetchall()
        return [{"seq": s, "time": t, "label": _loads(lab), "score": sc, "comment": c} for s, t, lab, sc, c in rows]

    def with_feedback(self) -> Iterator[LoggedRequest]:
        """The requests that have feedback, oldest first, each with its last feedback."""
        query = """
            SELECT r.id, r.time, r.inputs, r.outputs, r.status, r.program_version, f.label, f.score, f.time,
                   (SELECT COUNT(*) FROM feedback g WHERE g.request_id = r.id)
            FROM requests r JOIN feedback f ON f.request_id = r.id
            WHERE f.seq = (SELECT MAX(seq) FROM feedback h WHERE h.request_id = r.id)
            ORDER BY r.time, r.id"""
        with self._lock:
            rows = self._conn.execute(query).fetchall()
        for rid, t, inputs, outputs, status, version, label, score, ftime, n in rows:
            yield LoggedRequest(rid, t, _loads(inputs), _loads(outputs), status, version, _loads(label), score,
                                ftime, n)
