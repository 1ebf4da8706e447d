"""Checkpoint time-to-live: ``set-ttl`` and the reaper that deletes what expired.

A checkpoint saved with ``ttl_seconds`` (or given one later through ``PUT
/training_runs/RUN/checkpoints/ID/ttl``, the SDK's ``set_checkpoint_ttl_from_tinker_path`` and
``tinker checkpoint set-ttl``) stores ``expires_at``. Lookups and listings skip it from that moment
(``store.py``); ``Service.reap`` then deletes its row and files. Like Tinker, ``set-ttl`` takes
1 hour to 10 years from now, or None to remove the expiry.
"""

from __future__ import annotations

import logging
import time

from trinity.server.checkpoints import Checkpoints
from trinity.server.futures import ServiceError
from trinity.server.store import Store

log = logging.getLogger("trinity.server")
MIN_TTL_S = 3600
MAX_TTL_S = 10 * 365 * 24 * 3600


class CheckpointTTL:
    def __init__(self, store: Store, checkpoints: Checkpoints):
        self.store, self.checkpoints = store, checkpoints

    def set(self, tenant: str, run_id: str, checkpoint_id: str, ttl_seconds: object) -> None:
        """Expire checkpoint ``run_id/checkpoint_id`` ``ttl_seconds`` from now (None: never)."""
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int)
            or not MIN_TTL_S <= ttl_seconds <= MAX_TTL_S
        ):
            raise ServiceError(
                400,
                f"ttl_seconds must be an integer from {MIN_TTL_S} (1 hour) to {MAX_TTL_S} "
                f"(10 years), or null to remove the expiry; got {ttl_seconds!r}",
            )
        ckpt = self.store.checkpoint(run_id, checkpoint_id)
        if ckpt is None or ckpt["tenant"] != tenant:
            raise ServiceError(404, f"checkpoint {checkpoint_id!r} of run {run_id!r} not found")
        expires_at = None if ttl_seconds is None else time.time() + ttl_seconds
        self.store.set_checkpoint_expiry(run_id, checkpoint_id, expires_at)

    def reap(self) -> list[str]:
        """Delete every expired checkpoint; their tinker paths."""
        deleted = []
        for ckpt in self.store.expired_checkpoints():
            self.checkpoints.remove(ckpt)
            deleted.append(ckpt["tinker_path"])
        if deleted:
            log.info("deleted %d expired checkpoints: %s", len(deleted), ", ".join(deleted))
        return deleted
