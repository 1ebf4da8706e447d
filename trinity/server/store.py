"""SQLite persistence: sessions, training runs, checkpoints, samplers and future results.

Everything the server acknowledges is written here as it is acknowledged, so a restarted server
still answers ``retrieve_future`` for finished requests, lists runs and checkpoints, and loads
checkpoints. One connection behind a lock: the event loop and the engine worker threads both
write, and one process needs nothing more from SQLite's own locking.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created REAL NOT NULL,
    finished TEXT, meta TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT NOT NULL,
    base_model TEXT NOT NULL, lora TEXT, created REAL NOT NULL, last_request REAL NOT NULL,
    user_metadata TEXT, autosave TEXT, next_seq INTEGER);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, checkpoint_id TEXT NOT NULL, tenant TEXT NOT NULL,
    kind TEXT NOT NULL, tinker_path TEXT NOT NULL, directory TEXT NOT NULL,
    created REAL NOT NULL, size_bytes INTEGER, user_metadata TEXT, expires_at REAL,
    PRIMARY KEY (run_id, checkpoint_id));
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, base_model TEXT NOT NULL,
    model_path TEXT);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL,
    content_type TEXT, payload BLOB, created REAL NOT NULL, delivered REAL);
"""
_JSON_COLUMNS = ("lora", "user_metadata", "meta")
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


class Store:
    def __init__(self, path: Path | str):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def _sql(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for row in rows:
            d = dict(row)
            for key in _JSON_COLUMNS:
                if d.get(key) is not None:
                    d[key] = json.loads(d[key])
            out.append(d)
        return out

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = self._sql(sql, *args)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # sessions
    def add_session(self, session_id: str, tenant: str, meta: dict) -> None:
        self._sql(
            "INSERT OR IGNORE INTO sessions VALUES (?,?,?,?,?)",
            session_id,
            tenant,
            time.time(),
            None,
            _dump(meta),
        )

    def finish_session(self, session_id: str, reason: str) -> None:
        self._sql(
            "UPDATE sessions SET finished=? WHERE session_id=? AND finished IS NULL",
            reason,
            session_id,
        )

    def sessions(self) -> list[dict[str, Any]]:
        return self._sql("SELECT * FROM sessions")

    # training runs (run id == model id)
    def add_run(
        self,
        run_id: str,
        tenant: str,
        session_id: str,
        base_model: str,
        lora: dict | None,
        user_metadata: dict | None,
    ) -> None:
        now = time.time()
        self._sql(
            "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?)",
            run_id,
            tenant,
            session_id,
            base_model,
            _dump(lora),
            now,
            now,
            _dump(user_metadata),
            None,
            None,
        )

    def set_autosave(self, run_id: str, directory: str | None, next_seq: int | None) -> None:
        self._sql(
            "UPDATE runs SET autosave=?, next_seq=? WHERE run_id=?", directory, next_seq, run_id
        )

    def touch_run(self, run_id: str) -> None:
        self._sql("UPDATE runs SET last_request=? WHERE run_id=?", time.time(), run_id)

    def runs(self, tenant: str) -> list[dict[str, Any]]:
        return self._sql("SELECT * FROM runs WHERE tenant=? ORDER BY created", tenant)

    def run(self, run_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM runs WHERE run_id=?", run_id)

    # checkpoints
    def add_checkpoint(
        self,
        run_id: str,
        checkpoint_id: str,
        tenant: str,
        kind: str,
        tinker_path: str,
        directory: str,
        size_bytes: int,
        user_metadata: dict | None,
        expires_at: float | None,
    ) -> None:
        self._sql(
            "INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?,?,?,?,?,?)",
            run_id,
            checkpoint_id,
            tenant,
            kind,
            tinker_path,
            directory,
            time.time(),
            size_bytes,
            _dump(user_metadata),
            expires_at,
        )

    # A checkpoint past its expiry is gone for every lookup, before the reaper deletes its files.
    def checkpoints(self, tenant: str, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return self._sql(
                f"SELECT * FROM checkpoints WHERE tenant=? AND {_LIVE} ORDER BY created",
                tenant,
                time.time(),
            )
        return self._sql(
            f"SELECT * FROM checkpoints WHERE tenant=? AND run_id=? AND {_LIVE} ORDER BY created",
            tenant,
            run_id,
            time.time(),
        )

    def checkpoint_dirs(self) -> set[str]:
        """Every directory a checkpoint row points at (all tenants)."""
        return {r["directory"] for r in self._sql("SELECT directory FROM checkpoints")}

    def checkpoint(self, run_id: str, checkpoint_id: str) -> dict[str, Any] | None:
        return self._one(
            f"SELECT * FROM checkpoints WHERE run_id=? AND checkpoint_id=? AND {_LIVE}",
            run_id,
            checkpoint_id,
            time.time(),
        )

    def expired_checkpoints(self) -> list[dict[str, Any]]:
        return self._sql(
            "SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?",
            time.time(),
        )

    def set_checkpoint_expiry(
        self, run_id: str, checkpoint_id: str, expires_at: float | None
    ) -> None:
        self._sql(
            "UPDATE checkpoints SET expires_at=? WHERE run_id=? AND checkpoint_id=?",
            expires_at,
            run_id,
            checkpoint_id,
        )

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        self._sql(
            "DELETE FROM checkpoints WHERE run_id=? AND checkpoint_id=?", run_id, checkpoint_id
        )

    # samplers
    def add_sampler(
        self, sampler_id: str, tenant: str, base_model: str, model_path: str | None
    ) -> None:
        self._sql(
            "INSERT OR REPLACE INTO samplers VALUES (?,?,?,?)",
            sampler_id,
            tenant,
            base_model,
            model_path,
        )

    def samplers(self) -> list[dict[str, Any]]:
        return self._sql("SELECT * FROM samplers")

    # futures
    def add_future(self, request_id: str, tenant: str) -> None:
        self._sql(
            "INSERT OR IGNORE INTO futures VALUES (?,?,?,?,?,?,?)",
            request_id,
            tenant,
            "pending",
            None,
            None,
            time.time(),
            None,
        )

    def finish_future(self, request_id: str, state: str, content_type: str, payload: bytes) -> None:
        self._sql(
            "UPDATE futures SET state=?, content_type=?, payload=? WHERE request_id=?",
            state,
            content_type,
            payload,
            request_id,
        )

    def future(self, request_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM futures WHERE request_id=?", request_id)

    def mark_delivered(self, request_id: str) -> None:
        self._sql(
            "UPDATE futures SET delivered=? WHERE request_id=? AND delivered IS NULL",
            time.time(),
            request_id,
        )

    def purge_delivered(self, older_than_s: float) -> None:
        self._sql(
            "DELETE FROM futures WHERE delivered IS NOT NULL AND delivered < ?",
            time.time() - older_than_s,
        )

    def fail_pending_futures(self, payload: bytes) -> None:
        self._sql(
            "UPDATE futures SET state='failed', content_type='application/json', "
            "payload=? WHERE state='pending'",
            payload,
        )
