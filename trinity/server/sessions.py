"""Idle expiry of sessions: a client that stops without ``close()`` must not hold memory forever.

The SDK heartbeats every 10 s while its ``ServiceClient`` lives (``/session_heartbeat``), so a
session silent for ``idle_s`` (heartbeats and calls alike) belongs to a client that is gone:
``Service.reap`` finishes it, which frees its training models and sampler snapshots. Its next
heartbeat gets 410 (the SDK then stops heartbeating) and its calls a 400 saying it expired.
Times are monotonic and in memory: a restarted server gives every open session a fresh start.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_IDLE_S = 600.0  # 60 missed heartbeats; `trinity server --session-idle-timeout`


class IdleClock:
    def __init__(self, idle_s: float | None, clock: Callable[[], float] = time.monotonic):
        """``idle_s`` None or <= 0: sessions never expire."""
        self.idle_s = idle_s if idle_s and idle_s > 0 else None
        self._clock = clock
        self._seen: dict[str, float] = {}

    def touch(self, session_id: str) -> None:
        self._seen[session_id] = self._clock()

    def forget(self, session_id: str) -> None:
        self._seen.pop(session_id, None)

    def idle(self) -> list[str]:
        """Sessions silent for longer than ``idle_s``."""
        if self.idle_s is None:
            return []
        cutoff = self._clock() - self.idle_s
        return [sid for sid, seen in self._seen.items() if seen < cutoff]

    @property
    def reason(self) -> str:
        return f"expired: no heartbeat or call for {self.idle_s:g} s"

    @property
    def check_every_s(self) -> float:
        """How often the reaper looks: a quarter of the timeout, at most once a minute."""
        return min(60.0, self.idle_s / 4) if self.idle_s else 60.0
