"""Request ids and their results: every long-running call answers ``{"request_id"}`` at once and
the SDK polls ``/retrieve_future`` until the result is there.

A result is written to SQLite when it is produced and kept until well after it was delivered: a
client whose poll timed out mid-flight polls again and must find it (SkyRL's history shows what
evicting early costs). Long-polls wait at most ``long_poll_s`` (< the SDK's 45 s read timeout),
then answer ``try_again``. Results are ``(content_type, payload)``: protobuf for
``ForwardBackwardOutput`` / ``SampleResponse``, JSON otherwise, and failures as the SDK's
``RequestFailedResponse`` JSON so the SDK raises ``RequestFailedError`` with our message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pydantic
from tinker import types

from trinity.engine.worker import EngineWorker
from trinity.server.store import Store

JSON = "application/json"
Result = tuple[str, bytes]  # (content_type, payload)


class ServiceError(Exception):
    """An error answered directly with an HTTP status and a one-line message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def json_result(response: pydantic.BaseModel) -> Result:
    """An SDK response type as a JSON result."""
    return JSON, response.model_dump_json().encode()


def failure(message: str, user: bool) -> Result:
    body = types.RequestFailedResponse(error=message, category="user" if user else "server")
    return JSON, body.model_dump_json().encode()


def describe(exc: BaseException) -> Result:
    """An exception raised while running a request, as the failed-future payload.

    Engine ``ValueError``/``KeyError``/... are the caller's mistake (bad config value, unknown
    adapter); anything else is ours.
    """
    if isinstance(exc, ServiceError):
        return failure(exc.message, user=exc.status < 500)
    user = isinstance(exc, (ValueError, KeyError, TypeError, IndexError))
    return failure(f"{type(exc).__name__}: {exc}".splitlines()[0], user)


@dataclass
class Future:
    request_id: str
    tenant: str
    result: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    delivered: float | None = None


class Futures:
    def __init__(self, store: Store, long_poll_s: float):
        self.store = store
        self.long_poll_s = long_poll_s
        self._live: dict[str, Future] = {}

    def open(self, request_id: str, tenant: str) -> tuple[Future, bool]:
        """The future of ``request_id`` and whether it is new (a retry reuses the old one)."""
        future = self._find(request_id, tenant)
        if future is not None:
            return future, False
        future = self._live[request_id] = Future(request_id, tenant)
        self.store.add_future(request_id, tenant)
        return future, True

    def exists(self, request_id: str) -> bool:
        return request_id in self._live or self.store.future(request_id) is not None

    def _find(self, request_id: str, tenant: str) -> Future | None:
        future = self._live.get(request_id)
        if future is None:
            row = self.store.future(request_id)
            if row is None:
                return None
            future = Future(request_id, row["tenant"], delivered=row["delivered"])
            if row["state"] != "pending":
                future.result.set_result((row["content_type"], row["payload"]))
            self._live[request_id] = future
        if future.tenant != tenant:  # another tenant's id: as if it did not exist
            raise ServiceError(404, f"unknown request_id {request_id!r}")
        return future

    def resolve(self, future: Future, result: Result) -> None:
        """Persist, then wake the pollers; callable from any thread."""
        self.store.finish_future(future.request_id, "done", *result)
        future.result.set_result(result)

    def reject(self, future: Future, exc: BaseException) -> None:
        """Fail ``future`` with the error its request was answered with. That answer delivered
        it, so ``purge`` forgets it in time; until then a retry of the request finds it."""
        self.resolve(future, describe(exc))
        future.delivered = time.time()
        self.store.mark_delivered(future.request_id)

    def run(self, future: Future, worker: EngineWorker, job: Callable[[], Result]) -> None:
        """Run ``job`` on ``worker`` (after what is queued there) and resolve ``future`` with it."""

        def go() -> None:
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 - becomes a failed future
                result = describe(exc)
            self.resolve(future, result)

        worker.call(go)

    async def retrieve(self, tenant: str, request_id: str) -> Result | None:
        """The result, or None when the long-poll window passed first (the client polls again)."""
        future = self._find(request_id, tenant)
        if future is None:
            raise ServiceError(404, f"unknown request_id {request_id!r}")
        if not future.result.done():
            # asyncio.wait, unlike wait_for, leaves the underlying future alone on timeout.
            await asyncio.wait([asyncio.wrap_future(future.result)], timeout=self.long_poll_s)
            if not future.result.done():
                return None
        if future.delivered is None:
            future.delivered = time.time()
            self.store.mark_delivered(request_id)
        return future.result.result()

    def purge(self, keep_delivered_s: float = 600.0) -> None:
        """Forget results delivered long ago."""
        cutoff = time.time() - keep_delivered_s
        for rid in [r for r, f in self._live.items() if f.delivered and f.delivered < cutoff]:
            del self._live[rid]
        self.store.purge_delivered(keep_delivered_s)

    def fail_unfinished(self, message: str) -> None:
        """At startup: requests a previous process accepted but never ran."""
        self.store.fail_pending_futures(failure(message, user=False)[1])
