"""The rollouts of a run, kept step by step in ``<job_dir>/monitor/rollouts.db`` (SQLite).

Curves say *that* the reward moved; the rollouts say *why*: what the model answered at step 40 and
what it scored. The explorer writes each step's experiences here (prompt, response, reward and its
components, advantage, length, model version, task); ``trinity studio`` queries them. SQLite keeps
it one file, queryable with any client, and in WAL mode a reader never blocks the writing run.
Every call opens its own connection, so the writer needs no closing and the explore process of a
split run and a studio reading it do not share state. The table is bounded by ``max_rows``
(``monitor.max_rollouts``): whole oldest steps are dropped first.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing trinity.workflows loads every workflow and reward
    from trinity.workflows.types import Experience

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    step INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    reward REAL NOT NULL,
    reward_components TEXT NOT NULL,
    advantage REAL,
    response_length INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rollouts_step ON rollouts (step);
CREATE INDEX IF NOT EXISTS rollouts_prompt ON rollouts (prompt);
"""
COLUMNS = (
    "id",
    "step",
    "task_id",
    "group_id",
    "model_version",
    "prompt",
    "response",
    "reward",
    "reward_components",
    "advantage",
    "response_length",
    "truncated",
)
INSERT = (  # id is the database's; time is when the step was written
    f"INSERT INTO rollouts ({', '.join(COLUMNS[1:])}, time) VALUES ({', '.join('?' * len(COLUMNS))})"
)
SORTS = {
    "step": "step, id",
    "-step": "step DESC, id",
    "reward": "reward, step, id",
    "-reward": "reward DESC, step, id",
}


class RolloutStoreError(RuntimeError):
    """A rollouts file that cannot be read (not SQLite, or not ours): one line naming it."""


class RolloutStore:
    def __init__(self, path: str | Path, max_rows: int = 20_000):
        self.path = Path(path)
        self.max_rows = max_rows

    @contextlib.contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_file():
            raise RolloutStoreError(f"{self.path}: no rollouts recorded")
        db = sqlite3.connect(self.path, timeout=30)
        try:
            if write:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
            with db:  # one transaction: commit, or roll back on error
                yield db
        except sqlite3.DatabaseError as error:
            raise RolloutStoreError(f"{self.path}: not a rollouts database ({error})") from None
        finally:
            db.close()

    # ---- writing (the explorer) -----------------------------------------------------------------
    def write(self, step: int, experiences: Sequence[Experience]) -> None:
        """Record ``step``'s experiences; a step written again (a resumed run re-explores the steps
        after its last checkpoint) replaces what was there from that step on."""
        now = time.time()
        rows = [
            (
                step,
                exp.task_id,
                exp.group_id,
                exp.model_version,
                exp.prompt_text,
                exp.response_text,
                float(exp.reward),
                json.dumps(exp.reward_components),
                statistics.fmean(exp.advantages) if exp.advantages else None,
                exp.response_length,
                int(exp.truncated),
                now,
            )
            for exp in experiences
        ]
        with self._connect(write=True) as db:
            db.execute("DELETE FROM rollouts WHERE step >= ?", (step,))
            db.executemany(INSERT, rows)
            self._trim(db)

    def _trim(self, db: sqlite3.Connection) -> None:
        """Drop whole oldest steps until ``max_rows`` rows remain; a newest step larger than that
        alone keeps its first ``max_rows``."""
        (cutoff,) = db.execute(
            "SELECT step FROM rollouts ORDER BY step DESC, id LIMIT 1 OFFSET ?", (self.max_rows,)
        ).fetchone() or (None,)
        if cutoff is None:
            return
        db.execute(
            "DELETE FROM rollouts WHERE step <= ? AND step < (SELECT MAX(step) FROM rollouts)",
            (cutoff,),
        )
        db.execute(
            "DELETE FROM rollouts WHERE id IN "
            "(SELECT id FROM rollouts ORDER BY step DESC, id LIMIT -1 OFFSET ?)",
            (self.max_rows,),
        )

    # ---- reading (trinity studio) ---------------------------------------------------------------
    def steps(self) -> list[dict[str, Any]]:
        """Per recorded step: its rollout count and mean reward."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT step, COUNT(*), AVG(reward) FROM rollouts GROUP BY step ORDER BY step"
            ).fetchall()
        return [{"step": s, "count": n, "reward": r} for s, n, r in rows]

    def query(
        self,
        *,
        step: int | None = None,
        prompt: str | None = None,
        search: str | None = None,
        min_reward: float | None = None,
        max_reward: float | None = None,
        sort: str = "step",
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(how many match, one page of them); ``search`` matches task id, prompt or response."""
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}, got '{sort}'")
        where, args = [], []
        for clause, value in (
            ("step = ?", step),
            ("prompt = ?", prompt),
            ("reward >= ?", min_reward),
            ("reward <= ?", max_reward),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        if search:
            where.append("(task_id LIKE ? OR prompt LIKE ? OR response LIKE ?)")
            args += [f"%{search}%"] * 3
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        with self._connect() as db:
            (total,) = db.execute(f"SELECT COUNT(*) FROM rollouts {condition}", args).fetchone()
            rows = db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM rollouts {condition} "
                f"ORDER BY {SORTS[sort]} LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        return total, [_record(row) for row in rows]

    def tasks(self, limit: int = 500) -> list[dict[str, Any]]:
        """Prompts seen at more than one step (the ones whose answers can be compared over
        training), the most often seen first; a task's id changes with the epoch, its prompt not."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT prompt, MIN(task_id), COUNT(DISTINCT step), MIN(step), MAX(step) "
                "FROM rollouts GROUP BY prompt HAVING COUNT(DISTINCT step) > 1 "
                "ORDER BY COUNT(DISTINCT step) DESC, MIN(step) LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {"prompt": p, "task_id": t, "steps": n, "first_step": a, "last_step": b}
            for p, t, n, a, b in rows
        ]


def _record(row: Sequence[Any]) -> dict[str, Any]:
    record = dict(zip(COLUMNS, row, strict=True))
    record["reward_components"] = json.loads(record["reward_components"])
    record["truncated"] = bool(record["truncated"])
    return record
