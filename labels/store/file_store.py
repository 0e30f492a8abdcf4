"""Embedded file store: one SQLite file, WAL mode, a zlib-compressed row per (namespace, image).

Why SQLite: it gives exactly what the trainer's processes need without a server: many reader
processes (data-loader workers, DDP ranks) beside one writer, and atomic transactions, so a writer
killed with SIGKILL leaves either the old or the new row, never a torn one. Rows are compressed
because a teacher predicts the same class for most crops of an image; that is what brings the
file below 2 bytes per hard label.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..namespace import Namespace
from .base import LabelStore, StoreError, stored_seed_limit

SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (nsid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    nsid INTEGER NOT NULL, key TEXT NOT NULL, row BLOB NOT NULL, PRIMARY KEY (nsid, key)
) WITHOUT ROWID;
"""
SQLITE_MAX_VARS = 900  # below SQLite's default limit on bound parameters per statement


def path_from_url(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


class _Conn:
    """A connection per process: data-loader workers fork, and SQLite handles must not cross."""

    def __init__(self, path: Path):
        self.path = path
        self._pid = None
        self._conn = None
        # One connection per process, shared by its threads (the service's thread pool): the
        # lock keeps one thread's transaction from swallowing another's statements.
        self.lock = threading.RLock()

    def get(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: safe against process crashes
            conn.execute("PRAGMA busy_timeout=60000")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def close(self):
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


def _open(path: Path) -> _Conn:
    path.parent.mkdir(parents=True, exist_ok=True)
    c = _Conn(path)
    try:
        c.get().executescript(SCHEMA)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a label store: {e}") from e
    return c


class FileStore(LabelStore):
    def __init__(self, url: str, namespace: Namespace, create: bool = True, seed_limit: int | None = None):
        super().__init__(namespace)
        self.url = url
        self.path = path_from_url(url)
        if not create and not self.path.exists():
            raise StoreError(f"file store {self.path} does not exist")
        self.conn = _open(self.path)
        db = self.conn.get()
        row = db.execute("SELECT nsid, meta FROM namespaces WHERE id = ?", (namespace.id,)).fetchone()
        if row is None:
            if not create:
                raise StoreError(f"namespace {namespace.id} not found in {self.path}")
            db.execute(
                "INSERT OR IGNORE INTO namespaces (id, meta) VALUES (?, ?)",
                (namespace.id, json.dumps(namespace.meta())),
            )
            row = db.execute("SELECT nsid, meta FROM namespaces WHERE id = ?", (namespace.id,)).fetchone()
        namespace.check_against(json.loads(row[1]))
        self.nsid = row[0]
        self._init_seed_limit(create, seed_limit)

    def _read_seed_limit(self) -> int | None:
        with self.conn.lock:
            row = self.conn.get().execute("SELECT meta FROM namespaces WHERE nsid = ?", (self.nsid,)).fetchone()
        return stored_seed_limit(json.loads(row[0]).get("seed_limit"), self.namespace.id) if row else None

    def _extend_seed_limit(self, limit: int) -> int:
        def extend(meta: dict) -> None:
            meta["seed_limit"] = max(int(meta.get("seed_limit") or 0), limit)

        return self._update_meta(extend)["seed_limit"]

    def probe_write(self) -> None:
        self._update_meta(lambda meta: None)  # a rewrite of the metadata row: fails on a full disk

    def _add_coverage(self, record: str) -> None:
        def add(meta: dict) -> None:
            meta["coverage"] = sorted(set(meta.get("coverage", [])) | {record})

        self._update_meta(add)

    def _read_coverage(self) -> list[str]:
        with self.conn.lock:
            row = self.conn.get().execute("SELECT meta FROM namespaces WHERE nsid = ?", (self.nsid,)).fetchone()
        return json.loads(row[0]).get("coverage", []) if row else []

    def _claim_fingerprint(self, record: str) -> str:
        def claim(meta: dict) -> None:
            meta.setdefault("fingerprint", record)

        return self._update_meta(claim)["fingerprint"]

    def _read_fingerprint(self) -> str | None:
        with self.conn.lock:
            row = self.conn.get().execute("SELECT meta FROM namespaces WHERE nsid = ?", (self.nsid,)).fetchone()
        return json.loads(row[0]).get("fingerprint") if row else None

    def _update_meta(self, change) -> dict:
        """Read-modify-write of the namespace's metadata, one writer at a time."""
        with self.conn.lock, self._transaction() as db:
            meta = json.loads(db.execute("SELECT meta FROM namespaces WHERE nsid = ?", (self.nsid,)).fetchone()[0])
            change(meta)
            db.execute("UPDATE namespaces SET meta = ? WHERE nsid = ?", (json.dumps(meta), self.nsid))
        return meta

    @contextlib.contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE (one writer at a time; readers keep reading the last commit) .. COMMIT.
        On an error, ROLLBACK unless SQLite already rolled back (it does on a full disk), so the
        error that is raised is the cause; a full disk or size limit is named as such."""
        db = self.conn.get()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
                raise StoreError(f"file store {self.path}: the disk (or the database's size limit) is full: {e}") from e
            raise

    def _select(self, db, keys: list[str]) -> dict[str, bytes]:
        out = {}
        for i in range(0, len(keys), SQLITE_MAX_VARS):
            chunk = keys[i : i + SQLITE_MAX_VARS]
            q = f"SELECT key, row FROM labels WHERE nsid = ? AND key IN ({','.join('?' * len(chunk))})"
            out.update((k, zlib.decompress(r)) for k, r in db.execute(q, (self.nsid, *chunk)))
        return out

    def _get_rows(self, keys: list[str]) -> list[bytes | None]:
        with self.conn.lock:
            found = self._select(self.conn.get(), keys)
        return [found.get(k) for k in keys]

    def _put_runs(self, runs: dict[str, list[tuple[int, bytes]]]) -> None:
        if not runs:
            return
        with self.conn.lock:
            self._write(runs)

    def _write(self, runs: dict[str, list[tuple[int, bytes]]]) -> None:
        with self._transaction() as db:
            old = self._select(db, list(runs))
            rows = []
            for key, parts in runs.items():
                row = bytearray(old.get(key, b""))
                for off, data in parts:
                    if len(row) < off + len(data):
                        row.extend(bytes(off + len(data) - len(row)))
                    row[off : off + len(data)] = data
                rows.append((self.nsid, key, zlib.compress(bytes(row), 6)))
            db.executemany("INSERT OR REPLACE INTO labels (nsid, key, row) VALUES (?, ?, ?)", rows)

    def iter_rows(self, batch: int = 1000) -> Iterator[list[tuple[str, bytes]]]:
        db = self.conn.get()
        last = ""
        while True:
            got = db.execute(
                "SELECT key, row FROM labels WHERE nsid = ? AND key > ? ORDER BY key LIMIT ?", (self.nsid, last, batch)
            ).fetchall()
            if not got:
                return
            yield [(k, zlib.decompress(r)) for k, r in got]
            last = got[-1][0]

    def num_keys(self) -> int:
        return self.conn.get().execute("SELECT COUNT(*) FROM labels WHERE nsid = ?", (self.nsid,)).fetchone()[0]

    def drop(self) -> int:
        with self.conn.lock, self._transaction() as db:
            deleted = db.execute("DELETE FROM labels WHERE nsid = ?", (self.nsid,)).rowcount
            db.execute("DELETE FROM namespaces WHERE nsid = ?", (self.nsid,))
        return deleted

    def bytes_used(self) -> int:
        """Bytes on disk of the file (+ WAL) attributed to this namespace's share of rows."""
        db = self.conn.get()
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        page = db.execute("PRAGMA page_size").fetchone()[0]
        used = (
            db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        ) * page
        total, mine = db.execute("SELECT COUNT(*), SUM(nsid = ?) FROM labels", (self.nsid,)).fetchone()
        return int(used * (mine or 0) / total) if total else 0

    def close(self) -> None:
        self.conn.close()


def list_namespaces(url: str) -> list[dict]:
    path = path_from_url(url)
    if not path.exists():
        raise StoreError(f"file store {path} does not exist")
    return [json.loads(m) for (m,) in _open(path).get().execute("SELECT meta FROM namespaces ORDER BY nsid")]
