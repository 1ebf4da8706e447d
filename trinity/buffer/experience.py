"""The experience buffer between explorer (producer) and trainer (consumer).

Two implementations of one small interface (``put`` / ``get_batch`` / ``close`` / ``pending``):

- ``ExperienceQueue``: in-process asyncio queue, for ``mode: both`` (explorer and trainer in one
  event loop).
- ``SqliteExperienceBuffer``: a SQLite file (WAL mode) shared by two OS processes, for
  ``mode: explore`` + ``mode: train`` run side by side on the same job dir.

Semantics, identical for both:

- ``get_batch(n)`` waits until ``n`` experiences are available and returns exactly ``n``, oldest
  first. An experience is consumed when ``get_batch`` returns it: the SQLite buffer takes a batch
  in one transaction, so a reader killed before that commit loses nothing; one killed after it
  has taken the batch (at-most-once delivery, as the original's queue).
- ``close()`` (producer finished): readers then get what remains, possibly a short last batch,
  and after that ``[]``: the end signal the trainer loop checks.
- Waiting longer than ``max_read_timeout`` raises ``TimeoutError`` naming the config key.
- ``put`` waits while ``capacity`` experiences are pending (backpressure); a batch is accepted
  whenever there is room for one more, so a put larger than the capacity cannot deadlock.

Optionally every experience the explorer produces is also kept, never consumed, in a table
``explorer_output`` (``backup=True``) for inspection with any SQLite tool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import json
import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trinity.workflows.types import Experience

TIMEOUT_KEY = "buffer.trainer_input.experience_buffer.max_read_timeout"


@runtime_checkable
class ExperienceBuffer(Protocol):
    async def put(self, experiences: Sequence[Experience]) -> None: ...

    async def get_batch(self, n: int, timeout: float | None = None) -> list[Experience]: ...

    async def close(self) -> None: ...

    def pending(self) -> int: ...


def _read_timeout_error(n: int, timeout: float, available: int) -> TimeoutError:
    return TimeoutError(
        f"experience buffer: waited {timeout:g} s for a batch of {n} experiences but only "
        f"{available} arrived; is the explorer running? (raise {TIMEOUT_KEY} to wait longer)"
    )


def _write_timeout_error(capacity: int, timeout: float) -> TimeoutError:
    return TimeoutError(
        f"experience buffer: full ({capacity} pending) for {timeout:g} s; is the trainer running? "
        f"(buffer.trainer_input.experience_buffer.capacity)"
    )


def _check_n(n: int) -> None:
    if n <= 0:
        raise ValueError(f"get_batch needs n >= 1, got {n}")


class ExperienceQueue:
    """In-process buffer: a deque guarded by an ``asyncio.Condition``."""

    def __init__(
        self,
        capacity: int = 10000,
        max_read_timeout: float = 1800.0,
        *,
        backup_path: str | Path | None = None,
    ):
        self.capacity = capacity
        self.max_read_timeout = max_read_timeout
        self._items: collections.deque[Experience] = collections.deque()
        self._cond = asyncio.Condition()
        self._closed = False
        self._archive = SqliteExperienceBuffer(backup_path, backup=True) if backup_path else None

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        return len(self._items)

    async def put(self, experiences: Sequence[Experience]) -> None:
        if self._closed:
            raise RuntimeError("put() on a closed experience buffer")
        timeout = self.max_read_timeout
        async with self._cond:
            try:
                async with asyncio.timeout(None if math.isinf(timeout) else timeout):
                    await self._cond.wait_for(lambda: len(self._items) < self.capacity)
            except TimeoutError:
                raise _write_timeout_error(self.capacity, timeout) from None
            self._items.extend(experiences)
            self._cond.notify_all()
        if self._archive is not None:
            await asyncio.to_thread(self._archive.archive, experiences)

    async def get_batch(self, n: int, timeout: float | None = None) -> list[Experience]:
        _check_n(n)
        timeout = self.max_read_timeout if timeout is None else timeout
        async with self._cond:
            try:
                async with asyncio.timeout(None if math.isinf(timeout) else timeout):
                    await self._cond.wait_for(lambda: len(self._items) >= n or self._closed)
            except TimeoutError:
                raise _read_timeout_error(n, timeout, len(self._items)) from None
            batch = [self._items.popleft() for _ in range(min(n, len(self._items)))]
            self._cond.notify_all()  # room for a blocked producer
            return batch

    async def close(self) -> None:
        async with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._archive is not None:
            self._archive.close_connection()

    async def reopen(self) -> None:
        """A producer starts (again): forget an earlier ``close``."""
        async with self._cond:
            self._closed = False


class ReplayBuffer:
    """The original's prioritized replay buffer (``experience_buffer.replay_buffer``), in process.

    ``get_batch(n)`` takes the ``n`` experiences of highest priority, oldest first among equals,
    and puts each back for reuse with ``use_count`` + 1 (after ``reuse_cooldown_time`` seconds
    when set), so an experience is trained on again while nothing fresher outranks it. Priority
    (``priority_fn``):

    - ``linear_decay {decay: 2}``: ``model_version - decay * use_count``;
    - ``linear_decay_use_count_control_randomization {decay: 2, use_count_limit: 3, sigma: 0}``:
      the same plus N(0, sigma^2) noise, and an experience is put back only while its
      ``use_count`` is below the limit.

    ``capacity`` counts stored experiences: when full, a new one replaces the lowest-priority one
    if it outranks it and is dropped otherwise (``put`` never blocks). After ``close`` a read
    returns what is stored (the run ends at its step count, not when the buffer runs dry).
    """

    def __init__(
        self,
        capacity: int = 10000,
        max_read_timeout: float = 1800.0,
        *,
        priority_fn: str = "linear_decay",
        priority_fn_args: dict | None = None,
        reuse_cooldown_time: float | None = None,
        seed: int = 0,
    ):
        import random

        args = {"decay": 2.0, **(priority_fn_args or {})}
        self.decay = float(args["decay"])
        randomized = priority_fn != "linear_decay"
        self.use_count_limit = int(args.get("use_count_limit", 3)) if randomized else None
        self.sigma = float(args.get("sigma", 0.0)) if randomized else 0.0
        self.capacity = capacity
        self.max_read_timeout = max_read_timeout
        self.reuse_cooldown_time = reuse_cooldown_time
        self._rng = random.Random(seed)
        self._heap: list[tuple[float, int, int, Experience]] = []  # (-priority, seq, uses, exp)
        self._cooling: list[tuple[float, int, Experience]] = []  # (ready_at, uses, exp)
        self._seq = itertools.count()
        self._cond = asyncio.Condition()
        self._closed = False

    def pending(self) -> int:
        return len(self._heap) + len(self._cooling)

    def _priority(self, exp: Experience, uses: int) -> float:
        noise = self._rng.gauss(0.0, self.sigma) if self.sigma else 0.0
        return exp.model_version - self.decay * uses + noise

    def _push(self, exp: Experience, uses: int) -> None:
        entry = (-self._priority(exp, uses), next(self._seq), uses, exp)
        if self.pending() < self.capacity:
            heapq.heappush(self._heap, entry)
            return
        if not self._heap:
            return
        lowest = max(range(len(self._heap)), key=lambda i: self._heap[i][:2])
        if entry[:2] < self._heap[lowest][:2]:  # outranks the lowest: replaces it
            self._heap[lowest] = entry
            heapq.heapify(self._heap)

    def _promote(self) -> float | None:
        """Put cooled-down experiences back; the seconds until the next one is ready."""
        now = time.monotonic()
        still = []
        for ready_at, uses, exp in self._cooling:
            if ready_at <= now:
                self._push(exp, uses)
            else:
                still.append((ready_at, uses, exp))
        self._cooling = still
        return min((r for r, _, _ in still), default=now) - now if still else None

    async def put(self, experiences: Sequence[Experience]) -> None:
        if self._closed:
            raise RuntimeError("put() on a closed experience buffer")
        async with self._cond:
            for exp in experiences:
                self._push(exp, 0)
            self._cond.notify_all()

    async def get_batch(self, n: int, timeout: float | None = None) -> list[Experience]:
        _check_n(n)
        timeout = self.max_read_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        async with self._cond:
            while True:
                next_ready = self._promote()
                if len(self._heap) >= n or (self._closed and (self._heap or not self._cooling)):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _read_timeout_error(n, timeout, len(self._heap))
                wait = left if next_ready is None else min(left, next_ready)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if math.isinf(wait) else wait):
                        await self._cond.wait()
            taken = [heapq.heappop(self._heap) for _ in range(min(n, len(self._heap)))]
            ready_at = time.monotonic() + (self.reuse_cooldown_time or 0.0)
            for _, _, uses, exp in taken:
                if self.use_count_limit is None or uses + 1 < self.use_count_limit:
                    if self.reuse_cooldown_time:
                        self._cooling.append((ready_at, uses + 1, exp))
                    else:
                        self._push(exp, uses + 1)
            return [
                dataclasses.replace(e, info={**e.info, "use_count": u + 1}) for _, _, u, e in taken
            ]

    async def close(self) -> None:
        async with self._cond:
            self._closed = True
            self._cond.notify_all()

    async def reopen(self) -> None:
        async with self._cond:
            self._closed = False


_SCHEMA = """
CREATE TABLE IF NOT EXISTS experience (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version INTEGER NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS explorer_output (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version INTEGER NOT NULL,
    task_id TEXT,
    group_id TEXT,
    reward REAL,
    is_eval INTEGER,
    data TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _output_rows(experiences: Sequence[Experience], datas: list[str], now: float) -> list[dict]:
    """Rows of ``explorer_output``, in its column order."""
    return [
        {
            "model_version": e.model_version,
            "task_id": e.task_id,
            "group_id": e.group_id,
            "reward": e.reward,
            "is_eval": int(e.is_eval),
            "data": data,
            "created": now,
        }
        for e, data in zip(experiences, datas, strict=True)
    ]


class SqliteExperienceBuffer:
    """Buffer in a SQLite file, shared by processes on one machine (one file system).

    Rows of ``experience`` are pending experiences (JSON of ``Experience.to_dict``) with their
    ``model_version``; a reader takes the oldest ``n`` and deletes them in one ``BEGIN IMMEDIATE``
    transaction, so concurrent readers never see the same row. A ``closed`` row in ``meta`` is the
    producer's end marker; a producer's first ``put`` (or ``reopen``) clears a stale one left by an
    earlier run, and a reader told so (``ignore_end_markers_before``) does not stop at one. Readers poll with exponential backoff (50 ms to 1 s): SQLite has no notifications
    across processes, and one query per second is nothing next to a training step.
    """

    POLL_MIN = 0.05
    POLL_MAX = 1.0

    def __init__(
        self,
        path: str | Path,
        capacity: int = 10000,
        max_read_timeout: float = 1800.0,
        *,
        backup: bool = False,
    ):
        self.path = Path(str(path).removeprefix("sqlite:///"))
        self.capacity = capacity
        self.max_read_timeout = max_read_timeout
        self.backup = backup
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._producing = False
        self._closed_here = False
        self._ends_after = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as conn:
            conn.executescript(_SCHEMA)

    # --- connection -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self):
        """The connection, opened lazily (so an instance pickles to a spawned process)."""
        with self._lock:
            if self._conn is None:
                conn = sqlite3.connect(
                    self.path, timeout=60.0, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a killed process
                self._conn = conn
            yield self._conn

    @contextlib.contextmanager
    def _transaction(self):
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close_connection(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_conn"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- synchronous core (run in a worker thread by the async API) --------------------------

    def pending(self) -> int:
        with self._connection() as conn:
            return conn.execute("SELECT COUNT(*) FROM experience").fetchone()[0]

    def ignore_end_markers_before(self, moment: float) -> None:
        """An end marker written before ``moment`` is an earlier producer's: a reader started
        beside a producer that has not cleared it yet waits for that producer's rows."""
        self._ends_after = moment

    def _ends(self, marker: tuple | None) -> bool:
        return marker is not None and float(marker[0]) >= self._ends_after

    def is_closed(self) -> bool:
        with self._connection() as conn:
            return self._ends(
                conn.execute("SELECT value FROM meta WHERE key = 'closed'").fetchone()
            )

    def _insert(self, experiences: Sequence[Experience]) -> None:
        now = time.time()
        rows = [(exp.model_version, json.dumps(exp.to_dict()), now) for exp in experiences]
        with self._transaction() as conn:
            if not self._producing:
                conn.execute("DELETE FROM meta WHERE key = 'closed'")
            conn.executemany(
                "INSERT INTO experience (model_version, data, created) VALUES (?, ?, ?)", rows
            )
            if self.backup:
                self._archive_rows(conn, experiences, [r[1] for r in rows], now)
        self._producing = True

    def archive(self, experiences: Sequence[Experience]) -> None:
        """Keep a copy in ``explorer_output`` only (the in-process queue's backup)."""
        now = time.time()
        with self._transaction() as conn:
            self._archive_rows(
                conn, experiences, [json.dumps(e.to_dict()) for e in experiences], now
            )

    @staticmethod
    def _archive_rows(conn, experiences, datas, now) -> None:
        conn.executemany(
            "INSERT INTO explorer_output "
            "(model_version, task_id, group_id, reward, is_eval, data, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [tuple(row.values()) for row in _output_rows(experiences, datas, now)],
        )

    def _take(self, n: int) -> tuple[list[Experience] | None, int]:
        """Take the oldest ``n`` (or the rest once closed) in one transaction.

        Returns (batch, available): batch is None when the caller should wait and poll again.
        """
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT id, data FROM experience ORDER BY id LIMIT ?", (n,)
            ).fetchall()
            marker = conn.execute("SELECT value FROM meta WHERE key = 'closed'").fetchone()
            if len(rows) < n and not self._ends(marker):
                return None, len(rows)
            if rows:
                # AUTOINCREMENT ids only grow and we hold the write lock: these are the n oldest
                conn.execute("DELETE FROM experience WHERE id <= ?", (rows[-1][0],))
                self._on_taken(conn, rows)
        return [Experience.from_dict(json.loads(data)) for _, data in rows], len(rows)

    def _on_taken(self, conn: sqlite3.Connection, rows: list) -> None:
        """Hook between delete and commit (tests kill a reader here)."""

    def _mark_closed(self, closed: bool) -> None:
        with self._transaction() as conn:
            if closed:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('closed', ?)",
                    (str(time.time()),),
                )
            else:
                conn.execute("DELETE FROM meta WHERE key = 'closed'")

    # --- the async interface ----------------------------------------------------------------

    async def put(self, experiences: Sequence[Experience]) -> None:
        if self._closed_here:
            raise RuntimeError("put() on a closed experience buffer")
        if not experiences:
            return
        timeout = self.max_read_timeout
        deadline = time.monotonic() + timeout
        delay = self.POLL_MIN
        while await asyncio.to_thread(self.pending) >= self.capacity:
            if time.monotonic() >= deadline:
                raise _write_timeout_error(self.capacity, timeout)
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 1.5, self.POLL_MAX)
        await asyncio.to_thread(self._insert, list(experiences))

    async def get_batch(self, n: int, timeout: float | None = None) -> list[Experience]:
        _check_n(n)
        timeout = self.max_read_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = self.POLL_MIN
        while True:
            batch, available = await asyncio.to_thread(self._take, n)
            if batch is not None:
                return batch
            left = deadline - time.monotonic()
            if left <= 0:
                raise _read_timeout_error(n, timeout, available)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, self.POLL_MAX)

    async def close(self) -> None:
        """Producer finished: write the end marker readers in any process will see."""
        self._closed_here = True
        await asyncio.to_thread(self._mark_closed, True)
        self.close_connection()

    async def reopen(self) -> None:
        """A producer starts (again): clear an end marker left by an earlier run."""
        self._closed_here = False
        await asyncio.to_thread(self._mark_closed, False)


class SqlExperienceBuffer(SqliteExperienceBuffer):
    """The SQLite buffer's semantics over any database SQLAlchemy reaches (``storage_type: sql``
    with a URL ``path``: ``sqlite:///x.db``, ``postgresql://...``, ``mysql+pymysql://...``).

    Pending experiences are rows of table ``name``, the end marker a row of ``<name>_meta``. A
    reader takes its rows and deletes them in one transaction: SQLite's is ``BEGIN IMMEDIATE``
    (one writer at a time), other databases lock the rows (``FOR UPDATE SKIP LOCKED``), so two
    readers never take the same experience. ``explorer_output`` (the SQLite buffer's columns)
    keeps what ``archive`` or, with ``backup``, ``put`` is given; it is created on first use.
    """

    def __init__(
        self,
        url: str,
        capacity: int = 10000,
        max_read_timeout: float = 1800.0,
        *,
        name: str = "experience_buffer",
        backup: bool = False,
    ):
        import sqlalchemy as sa

        self.url = url
        self.name = name
        self.capacity = capacity
        self.max_read_timeout = max_read_timeout
        self.backup = backup
        self._lock = threading.Lock()
        self._producing = False
        self._closed_here = False
        self._ends_after = 0.0
        metadata = sa.MetaData()
        self._rows = sa.Table(
            name,
            metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("model_version", sa.Integer, nullable=False),
            sa.Column("data", sa.Text, nullable=False),
            sa.Column("created", sa.Float, nullable=False),
        )
        self._meta = sa.Table(
            f"{name}_meta",
            metadata,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.Text, nullable=False),
        )
        self._output = sa.Table(
            "explorer_output",
            sa.MetaData(),  # its own: created on first use, not with the pending rows' tables
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("model_version", sa.Integer, nullable=False),
            sa.Column("task_id", sa.Text),
            sa.Column("group_id", sa.Text),
            sa.Column("reward", sa.Float),
            sa.Column("is_eval", sa.Integer),
            sa.Column("data", sa.Text, nullable=False),
            sa.Column("created", sa.Float, nullable=False),
        )
        self._output_ready = False
        self._engine = None
        self._metadata = metadata
        metadata.create_all(self._connect())

    def _connect(self):
        import sqlalchemy as sa

        if self._engine is None:
            engine = sa.create_engine(self.url)
            if engine.dialect.name == "sqlite":  # take the write lock when the transaction starts

                @sa.event.listens_for(engine, "connect")
                def _autocommit(dbapi_connection, record):
                    dbapi_connection.isolation_level = None

                @sa.event.listens_for(engine, "begin")
                def _immediate(conn):
                    conn.exec_driver_sql("BEGIN IMMEDIATE")

            self._engine = engine
        return self._engine

    def close_connection(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_engine"] = None
        return state

    def pending(self) -> int:
        import sqlalchemy as sa

        with self._connect().connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self._rows)).scalar_one()

    def is_closed(self) -> bool:
        with self._connect().connect() as conn:
            return self._closed_marker(conn)

    def _closed_marker(self, conn) -> bool:
        import sqlalchemy as sa

        query = sa.select(self._meta.c.value).where(self._meta.c.key == "closed")
        return self._ends(conn.execute(query).first())

    def _insert(self, experiences: Sequence[Experience]) -> None:
        now = time.time()
        rows = [
            {"model_version": e.model_version, "data": json.dumps(e.to_dict()), "created": now}
            for e in experiences
        ]
        if self.backup:
            self._create_output()
        with self._connect().begin() as conn:
            if not self._producing:
                conn.execute(self._meta.delete().where(self._meta.c.key == "closed"))
            conn.execute(self._rows.insert(), rows)
            if self.backup:
                self._archive_rows(conn, experiences, [r["data"] for r in rows], now)
        self._producing = True

    def archive(self, experiences: Sequence[Experience]) -> None:
        self._create_output()
        datas = [json.dumps(e.to_dict()) for e in experiences]
        with self._connect().begin() as conn:
            self._archive_rows(conn, experiences, datas, time.time())

    def _archive_rows(self, conn, experiences, datas, now) -> None:
        conn.execute(self._output.insert(), _output_rows(experiences, datas, now))

    def _create_output(self) -> None:
        if not self._output_ready:
            self._output.create(self._connect(), checkfirst=True)
            self._output_ready = True

    def _take(self, n: int) -> tuple[list[Experience] | None, int]:
        import sqlalchemy as sa

        table = self._rows
        query = sa.select(table.c.id, table.c.data).order_by(table.c.id).limit(n)
        if self._connect().dialect.name != "sqlite":
            query = query.with_for_update(skip_locked=True)
        with self._connect().begin() as conn:
            rows = conn.execute(query).all()
            if len(rows) < n and not self._closed_marker(conn):
                return None, len(rows)
            if rows:
                conn.execute(table.delete().where(table.c.id.in_([r.id for r in rows])))
        return [Experience.from_dict(json.loads(r.data)) for r in rows], len(rows)

    def _mark_closed(self, closed: bool) -> None:
        with self._connect().begin() as conn:
            conn.execute(self._meta.delete().where(self._meta.c.key == "closed"))
            if closed:
                conn.execute(self._meta.insert(), {"key": "closed", "value": str(time.time())})


def build_experience_buffer(
    storage_type: str = "queue",
    path: str | Path | None = None,
    capacity: int = 10000,
    max_read_timeout: float = 1800.0,
    *,
    backup: bool = False,
    replay: Any = None,
    name: str = "experience_buffer",
) -> ExperienceQueue | SqliteExperienceBuffer | ReplayBuffer:
    """``queue`` (in-process; with ``backup`` the path's DB keeps all explorer output) or
    ``sqlite`` / ``sql`` (the file at ``path``, shared between explore and train processes);
    ``replay`` (the ``replay_buffer`` section) with ``enable`` makes the queue a ``ReplayBuffer``;
    ``sql`` with a database URL is a ``SqlExperienceBuffer`` (table ``name``)."""
    kind = storage_type.lower()
    if replay is not None and replay.enable:
        if kind != "queue":
            raise ValueError("the replay buffer is in-process: it needs storage_type 'queue'")
        return ReplayBuffer(
            capacity,
            max_read_timeout,
            priority_fn=replay.priority_fn,
            priority_fn_args=dict(replay.priority_fn_args),
            reuse_cooldown_time=replay.reuse_cooldown_time,
        )
    if kind == "queue":
        return ExperienceQueue(capacity, max_read_timeout, backup_path=path if backup else None)
    if kind == "sql" and path is not None and "://" in str(path):
        return SqlExperienceBuffer(str(path), capacity, max_read_timeout, name=name, backup=backup)
    if kind in ("sqlite", "sql"):
        if path is None:
            raise ValueError("a sqlite experience buffer needs a path")
        return SqliteExperienceBuffer(path, capacity, max_read_timeout, backup=backup)
    raise ValueError(
        f"unknown experience buffer storage_type '{storage_type}' (known: queue, sqlite)"
    )
