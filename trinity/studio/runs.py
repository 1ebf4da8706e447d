"""The runs under a checkpoint root, as the studio shows them: found, resolved safely, read.

Everything is read through ``JobDir`` (where a run keeps what), the monitor's readers
(``scan_metrics``, ``series``) and the rollout store, never through the trainer or explorer, so a
run of any mode (or one still running in another process) reads the same. Problems are
``StudioError``s: one line for the page, which keeps working.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trinity.jobdir import JobDir
from trinity.monitor.jsonl import scan_metrics
from trinity.monitor.plot import series
from trinity.monitor.rollouts import RolloutStore

MAX_DEPTH = 6  # <root>/<project>/<group>/<name>/<stage>, and some slack
LIVE_SECONDS = 60.0  # a run that wrote within this is shown as live


class StudioError(Exception):
    """A request the studio cannot answer, as one line for the page (and an HTTP status)."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


def find_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under ``root`` (a directory a run logged to), the most recently written first."""
    runs = []
    for directory, subdirs, _ in os.walk(root):
        job = JobDir(directory)
        depth = len(job.path.relative_to(root).parts)
        if job.is_run():
            subdirs.clear()  # a run's own folders (checkpoints, buffer, logs) hold no runs
            runs.append(_summary(root, job))
        elif depth >= MAX_DEPTH:
            subdirs.clear()
        subdirs.sort()
    return sorted(runs, key=lambda run: -run["updated"])


def _summary(root: Path, job: JobDir) -> dict[str, Any]:
    files = [f for f in (job.metrics_file, job.rollouts_db) if f.is_file()]
    updated = max(f.stat().st_mtime for f in files)
    return {
        "id": job.path.relative_to(root).as_posix(),
        "updated": updated,
        "live": time.time() - updated < LIVE_SECONDS,
        "has_rollouts": job.rollouts_db.is_file(),
        "has_config": job.config_file.is_file(),
    }


def resolve(root: Path, run_id: str) -> JobDir:
    """The run ``run_id`` (its path relative to ``root``), refusing anything outside ``root``."""
    path = (root / run_id).resolve()
    if not run_id or path != root and root not in path.parents:
        raise StudioError(f"'{run_id}' is not a run under {root}")
    job = JobDir(path)
    if not job.path.is_dir():
        raise StudioError(f"'{run_id}' is not a run under {root}: no such directory")
    if not job.is_run():
        raise StudioError(
            f"'{run_id}' is not a run directory: it has no monitor/metrics.jsonl "
            "and no monitor/rollouts.db"
        )
    return job


def metrics(job: JobDir, keys: Sequence[str]) -> dict[str, Any]:
    """The metric names the run logged, the series of ``keys``, and the lines that were skipped."""
    if not job.metrics_file.is_file():
        return {"keys": [], "series": {}, "skipped": [], "last_step": None}
    records, skipped = scan_metrics(job.metrics_file)
    names = sorted({key for record in records for key in record} - {"step", "time"})
    out = {}
    for key in keys:
        steps, values = series(records, key)
        if steps:
            out[key] = {"steps": steps, "values": values}
    return {
        "keys": names,
        "series": out,
        "skipped": skipped,
        "last_step": max((r["step"] for r in records), default=None),
    }


def config_text(job: JobDir) -> str:
    if not job.config_file.is_file():
        raise StudioError(
            f"{job.config_file.name} is missing: the run did not record its resolved config "
            "(runs record it when they start)"
        )
    return job.config_file.read_text(encoding="utf-8", errors="replace")


def rollouts(job: JobDir) -> RolloutStore:
    if not job.rollouts_db.is_file():
        raise StudioError("no rollouts recorded: monitor.max_rollouts was 0, or no step ran yet")
    return RolloutStore(job.rollouts_db)


def task_history(store: RolloutStore, prompt: str) -> dict[str, Any]:
    """The rollouts of one prompt at its first and last step, and a word diff between the best
    answer of each (the one with the highest reward, the earliest of equals)."""
    _, rows = store.query(prompt=prompt, limit=10_000)
    if not rows:
        raise StudioError("no rollouts of this task")
    first, last = rows[0]["step"], rows[-1]["step"]
    early = [r for r in rows if r["step"] == first]
    late = [r for r in rows if r["step"] == last]

    def best(group: list[dict[str, Any]]) -> dict[str, Any]:
        return max(group, key=lambda r: r["reward"])  # max keeps the first of equals

    return {
        "prompt": prompt,
        "early": {"step": first, "rollouts": early},
        "late": {"step": last, "rollouts": late},
        "diff": word_diff(best(early)["response"], best(late)["response"]),
    }


def word_diff(old: str, new: str) -> list[tuple[str, str]]:
    """``[(op, text)]`` with op ``=``, ``-`` (only in ``old``) or ``+`` (only in ``new``); words
    keep their following whitespace, so joining the ``=`` and ``+`` texts gives ``new`` back."""
    a, b = _words(old), _words(new)
    out: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(("=", "".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(("-", "".join(a[i1:i2])))
        if j2 > j1:
            out.append(("+", "".join(b[j1:j2])))
    return out


def _words(text: str) -> list[str]:
    words, start = [], 0
    for i in range(1, len(text) + 1):
        if i == len(text) or (text[i - 1].isspace() and not text[i].isspace()):
            words.append(text[start:i])
            start = i
    return words
