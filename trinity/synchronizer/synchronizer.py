"""When the explorer swaps to newer trained weights, and how it learns about them.

Semantics follow the original (``sync_interval``, ``sync_offset``, ``sync_style``): with interval
1 and offset 0 every explore step uses the weights trained on the previous step's data; with
offset k the explorer runs k steps ahead, so sampling and training overlap (one-step off-policy
for k = 1). Published weights are always recorded in the run directory (``JobDir.write_sampler``)
so an explorer in another process can follow by polling; in one process an ``asyncio.Condition``
wakes it at once. With ``trainer_driven`` / ``fully_async`` the explorer never waits for
weights, but at most ``max_inflight_batches`` explore steps may be ahead of the train steps that
consumed them (the original's ``explorer.max_inflight_batches``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trinity.jobdir import JobDir, atomic_write


class SyncTimeoutError(TimeoutError):
    pass


@dataclass
class Published:
    version: int
    ref: str | None


class Synchronizer:
    def __init__(
        self,
        job_dir: str | Path,
        *,
        sync_interval: int = 1,
        sync_offset: int = 0,
        sync_style: str = "fixed",
        sync_timeout: float = 3600.0,
        explorer_sync_interval: int | None = None,
        trainer_sync_interval: int | None = None,
        poll_seconds: float = 1.0,
        max_inflight_batches: int = 2,
    ):
        self.job_dir = JobDir(job_dir)
        self.explorer_interval = explorer_sync_interval or sync_interval
        self.trainer_interval = trainer_sync_interval or sync_interval
        self.offset = sync_offset
        self.style = sync_style
        self.timeout = sync_timeout
        self.poll_seconds = poll_seconds
        self.max_inflight = max_inflight_batches
        self._consumed = 0
        self._latest = Published(0, None)
        self._trainer_finished = False
        self._changed: asyncio.Condition | None = None
        self._created = time.time()

    def reset(self) -> None:
        """A new trainer is starting: a finished marker from an earlier run no longer holds."""
        self.job_dir.trainer_finished_file.unlink(missing_ok=True)
        self.job_dir.trainer_consumed_file.unlink(missing_ok=True)
        self._trainer_finished = False
        self._consumed = 0

    # ---- trainer side -------------------------------------------------------------------------
    def trainer_should_publish(self, train_step: int) -> bool:
        return train_step % self.trainer_interval == 0

    async def consumed(self, train_step: int) -> None:
        """The trainer read the batch of ``train_step``: one more explore batch may start."""
        if not self.bounds_inflight():
            return  # no explorer waits on it
        self.job_dir.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.job_dir.trainer_consumed_file, str(train_step))
        self._consumed = train_step
        await self._notify()

    async def publish(self, version: int, ref: str | None) -> None:
        self.job_dir.write_sampler(version, ref)
        self._latest = Published(version, ref)
        await self._notify()

    async def trainer_finished(self) -> None:
        atomic_write(self.job_dir.trainer_finished_file, str(self._latest.version))
        self._trainer_finished = True
        await self._notify()

    # ---- explorer side ------------------------------------------------------------------------
    def explorer_should_sync(self, explore_steps_done: int) -> bool:
        """Before the next explore step: is this a sync point?"""
        if self.style in ("trainer_driven", "fully_async"):
            return True  # take whatever is newest at every step, never wait
        steps = explore_steps_done - self.offset
        return explore_steps_done > self.offset and steps % self.explorer_interval == 0

    def required_version(self, explore_steps_done: int, current_version: int) -> int:
        """The oldest weights version the explorer may use for its next step."""
        if self.style in ("trainer_driven", "fully_async"):
            return current_version
        if self.style == "explorer_driven":
            return current_version + 1
        return explore_steps_done - self.offset

    def bounds_inflight(self) -> bool:
        return self.style in ("trainer_driven", "fully_async")

    async def wait_inflight(self, explore_steps_done: int) -> None:
        """Before the next explore step (dynamic styles): wait until fewer than
        ``max_inflight_batches`` explored batches are still unread by the trainer."""
        if not self.bounds_inflight():
            return
        await self._wait_until(
            lambda: explore_steps_done - self.trainer_consumed() < self.max_inflight,
            lambda: (
                f"the trainer read no batch past step {self.trainer_consumed()} within "
                f"synchronizer.sync_timeout={self.timeout:g}s while the explorer waits with "
                f"explorer.max_inflight_batches={self.max_inflight} batches in flight"
            ),
        )

    def trainer_consumed(self) -> int:
        """Train steps whose batch was read, in this process or by a trainer in another."""
        try:
            self._consumed = max(
                self._consumed, int(self.job_dir.trainer_consumed_file.read_text())
            )
        except (FileNotFoundError, ValueError):
            pass
        return self._consumed

    async def wait_for(self, version: int) -> Published:
        """Newest published weights with version >= ``version``; returns early if training ended."""
        await self._wait_until(
            lambda: self.latest().version >= version,
            lambda: (
                f"no trained weights of version {version} within synchronizer.sync_timeout="
                f"{self.timeout:g}s (latest is {self.latest().version})"
            ),
        )
        return self.latest()

    async def _wait_until(self, done: Callable[[], bool], timeout_message: Callable[[], str]):
        """Poll ``done`` (woken early in this process) until it holds or training ended; past
        ``sync_timeout`` a ``SyncTimeoutError`` with ``timeout_message()``."""
        deadline = time.monotonic() + self.timeout
        while not (done() or self.is_trainer_finished()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SyncTimeoutError(timeout_message())
            await self._wait_change(min(remaining, self.poll_seconds))

    def latest(self) -> Published:
        """In-memory state, or the files a trainer in another process wrote."""
        version, ref = self.job_dir.latest_sampler()
        if version > self._latest.version:
            self._latest = Published(version, ref)
        return self._latest

    def is_trainer_finished(self) -> bool:
        """Finished in this process, or a trainer process wrote its marker since this run began
        (a marker an earlier run left is not this run's: a resumed trainer removes it)."""
        marker = self.job_dir.trainer_finished_file
        try:
            return self._trainer_finished or marker.stat().st_mtime >= self._created
        except FileNotFoundError:
            return False

    # ---- plumbing -----------------------------------------------------------------------------
    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    async def _wait_change(self, seconds: float) -> None:
        try:
            async with self._condition():
                await asyncio.wait_for(self._condition().wait(), seconds)
        except TimeoutError:
            pass
