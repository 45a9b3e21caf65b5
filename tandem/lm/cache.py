"""On-disk call cache (SQLite), shared by every backend (``tandem.lm.caching`` uses it).

Keys are hashes of (model fingerprint incl. adapter, rendered prompt, sampling
parameters); only deterministic requests are cached (greedy, or seeded).
WAL mode and one connection per thread make it safe for many threads and for
several processes using the same file. ``TANDEM_CACHE=0`` switches it off.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from tandem.lm.protocol import Completion
from tandem.settings import tandem_home

_SCHEMA = """
create table if not exists calls (
  key text primary key,
  text text not null,
  prompt_tokens integer not null,
  output_tokens integer not null,
  finish_reason text not null
)
"""


class CallCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().execute(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("pragma journal_mode=wal")
            conn.execute("pragma synchronous=normal")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> Completion | None:
        row = self._conn().execute(
            "select text, prompt_tokens, output_tokens, finish_reason from calls where key=?", (key,)
        ).fetchone()
        if row is None:
            return None
        return Completion(row[0], row[1], row[2], row[3], cached=True)

    def put(self, key: str, c: Completion) -> None:
        self._conn().execute(
            "insert or replace into calls values (?,?,?,?,?)",
            (key, c.text, c.prompt_tokens, c.output_tokens, c.finish_reason),
        )

    def __len__(self) -> int:
        return self._conn().execute("select count(*) from calls").fetchone()[0]


_default: CallCache | None = None
_lock = threading.Lock()


def default_cache() -> CallCache | None:
    """The cache under TANDEM_HOME, or None when TANDEM_CACHE=0."""
    global _default
    if os.environ.get("TANDEM_CACHE", "1") in ("0", "false", "off", "no"):
        return None
    path = tandem_home() / "calls.sqlite"
    with _lock:
        if _default is None or _default.path != path:
            _default = CallCache(path)
        return _default
