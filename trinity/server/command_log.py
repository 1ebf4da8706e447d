"""The command log of one training model: its commands run in ``seq_id`` order, each once.

The SDK numbers a training client's calls (fwd/bwd, optim, save, load) from 1 and sends a call's
chunks in parallel, first chunk last, so commands can arrive out of order: an early arrival is
held until the gap before it fills, then every contiguous command is handed on in order. A
retried ``seq_id`` (the SDK retries on timeouts) gets the future of its first arrival and runs
nothing again. Request ids are ``{model_id}:{seq_id}`` in ``Futures``, which persists them, so a
retry is recognised after a graceful restart too (the service saves ``next_seq`` with the model).

A command checks its request only once it has its place (``prepare``): a rejected one still uses
up its ``seq_id``, as a failed future, so the commands after it run (the SDK numbers the next
call regardless; before, they waited for the rejected one forever).

A command held for a gap that never fills would wait forever, and with it its request's memory:
``expire`` fails every command held longer than ``held_timeout_s`` with a message naming the
missing ``seq_id``s (it keeps its place as used, like a rejected one), and a tenant may have at
most ``max_held`` commands waiting over all its models (``held`` counts them per tenant): one
more is a 429, which the SDK retries after a pause in which the gap may fill.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable

from trinity.server.futures import Future, Futures, Result, ServiceError

Job = Callable[[], Result]


class CommandLog:
    def __init__(
        self,
        model_id: str,
        tenant: str,
        futures: Futures,
        run: Callable[[Future, Job], None],
        next_seq: int = 1,
        *,
        held_timeout_s: float = 300.0,
        max_held: int = 64,
        held: Counter[str] | None = None,
    ):
        """``run(future, job)`` hands a command on (the service queues it on the engine worker,
        whose FIFO order then is the seq_id order). ``held``: commands waiting per tenant,
        shared by the tenant's models, at most ``max_held``."""
        self.model_id, self.tenant, self.futures, self._run = model_id, tenant, futures, run
        self.next_seq = next_seq
        self.held_timeout_s, self.max_held = held_timeout_s, max_held
        self.tenant_held = held if held is not None else Counter()
        self.held: dict[int, Callable[[], None]] = {}  # seq_id -> hand it on
        self._waiting: dict[int, tuple[float, Future]] = {}  # held seq_id -> (since, future)

    def submit(
        self,
        seq_id: int | None,
        prepare: Callable[[], Job],
        on_dispatch: Callable[[], None] | None = None,
    ) -> Future:
        """The future of command ``seq_id``, whose job runs once every earlier one was handed on.

        ``prepare()`` checks the request and returns the job; an error it raises is re-raised
        (the HTTP answer) after the ``seq_id`` was used up by a failed future. ``on_dispatch``
        runs as the job is handed on, for bookkeeping that must follow the command order rather
        than the arrival order."""
        if seq_id is None or seq_id <= 0:  # unordered (older SDKs): after what is queued
            job = prepare()
            future, _ = self.futures.open(f"{self.model_id}:{uuid.uuid4().hex}", self.tenant)
            self._dispatch(future, job, on_dispatch)
            return future
        request_id = f"{self.model_id}:{seq_id}"
        if self.futures.exists(request_id):  # a retry: the same future (open checks the owner)
            return self.futures.open(request_id, self.tenant)[0]
        if seq_id < self.next_seq:
            raise ServiceError(
                400,
                f"seq_id {seq_id} was already used for model "
                f"{self.model_id!r} (next expected {self.next_seq})",
            )
        if seq_id > self.next_seq and self.tenant_held[self.tenant] >= self.max_held:
            raise ServiceError(
                429,
                f"seq_id {seq_id} of model {self.model_id!r} would wait for seq_id "
                f"{self.next_seq}, but {self.max_held} commands of this user already wait "
                "for earlier ones; send the missing seq_ids first",
            )
        future, _ = self.futures.open(request_id, self.tenant)
        try:
            job = prepare()
        except Exception as exc:
            self.futures.reject(future, exc)
            self._hold(seq_id, lambda: None)
            raise
        if seq_id > self.next_seq:
            self._waiting[seq_id] = (time.monotonic(), future)
            self.tenant_held[self.tenant] += 1
        self._hold(seq_id, lambda: self._dispatch(future, job, on_dispatch))
        return future

    def expire(self, now: float | None = None) -> int:
        """Fail the commands held longer than ``held_timeout_s``; how many were failed."""
        now = time.monotonic() if now is None else now
        expired = [
            s for s, (since, _) in self._waiting.items() if now - since > self.held_timeout_s
        ]
        for seq_id in expired:
            since, future = self._unwait(seq_id)
            missing = [s for s in range(self.next_seq, seq_id) if s not in self.held]
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            self.futures.reject(
                future,
                ServiceError(
                    408,
                    f"seq_id {seq_id} of model {self.model_id!r} waited {now - since:.0f} s "
                    f"(the limit) for seq_id {shown}, which never arrived; it did not run",
                ),
            )
            self.held[seq_id] = lambda: None  # its place stays used, as a rejected command's
        return len(expired)

    def _unwait(self, seq_id: int) -> tuple[float, Future]:
        self.tenant_held[self.tenant] -= 1
        return self._waiting.pop(seq_id)

    def _hold(self, seq_id: int, hand_on: Callable[[], None]) -> None:
        """Keep ``hand_on`` for its turn, then hand on every command whose turn has come."""
        self.held[seq_id] = hand_on
        while self.next_seq in self.held:
            if self.next_seq in self._waiting:
                self._unwait(self.next_seq)
            self.held.pop(self.next_seq)()
            self.next_seq += 1

    def _dispatch(self, future: Future, job: Job, on_dispatch: Callable[[], None] | None) -> None:
        if on_dispatch is not None:
            on_dispatch()
        self._run(future, job)
