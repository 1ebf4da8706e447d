"""Always-on metrics log: one JSON object per ``log`` call in ``<job_dir>/monitor/metrics.jsonl``.

Each line goes out in a single ``write`` on an ``O_APPEND`` descriptor: nothing sits in a user-space
buffer (a killed run keeps every line it logged) and the explore and train processes of a split run
can append to the same file without tearing each other's lines. A resumed run first forgets the
records of the steps it will redo (``forget_steps_after``), so every step is logged once; writers
hold a shared ``flock`` and the forgetting an exclusive one, so no line is lost in between.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trinity.jobdir import JobDir
from trinity.monitor.base import RunInfo, to_number
from trinity.registry import MONITORS


def _json_value(value: Any) -> Any:
    number = to_number(value)
    if number is None:
        return value if isinstance(value, str) else repr(value)
    if isinstance(number, float) and not math.isfinite(number):
        return None  # strict JSON (jq, pandas) has no NaN / Infinity
    return number


@MONITORS.register("jsonl")
class JsonlMonitor:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @classmethod
    def from_run(cls, run: RunInfo) -> JsonlMonitor:
        return cls(JobDir(run.job_dir).metrics_file)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._fd is None:
            raise RuntimeError(f"log() after close() on {self.path}")
        record = {"step": int(step), "time": time.time()}
        record.update({key: _json_value(value) for key, value in metrics.items()})
        data = (json.dumps(record, allow_nan=False) + "\n").encode()
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # only on a full disk or a signal; finish the line
                written += os.write(self._fd, data[written:])
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def forget_steps_after(path: str | Path, step: int, roles: Iterable[str]) -> int:
    """Drop the records of ``roles`` (and untagged ones) logged for steps after ``step``: a run
    resumed from the checkpoint of ``step`` redoes them. Rewritten in place under an exclusive
    lock, so a process appending meanwhile loses nothing. Returns how many were dropped."""
    path, roles = Path(path), set(roles)
    if not path.exists():
        return 0
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "rb") as file:
            lines = file.read().splitlines(keepends=True)
        kept = [line for line in lines if not _redone(line, step, roles)]
        if len(kept) < len(lines):
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"".join(kept), 0)
        return len(lines) - len(kept)
    finally:
        os.close(fd)  # releases the lock


def _redone(line: bytes, step: int, roles: set[str]) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return True  # the torn last line of a killed run
    return record.get("step", 0) > step and record.get("role", next(iter(roles), None)) in roles


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (run killed mid-write) is skipped."""
    return scan_metrics(path)[0]


def scan_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, numbers of the lines skipped): a line that is not a JSON object with an integer
    ``step`` (torn by a kill, still being written, or edited by hand) is left out, and a tool
    showing the run can say which."""
    records, skipped = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                skipped.append(number)
    return records, skipped
