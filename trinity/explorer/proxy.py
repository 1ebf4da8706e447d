"""``mode: serve``: the current policy as an OpenAI-compatible service for external agents.

An agent framework points its ``base_url`` at ``http://HOST:explorer.proxy_port/v1`` and chats
(``/v1/chat/completions``, ``/v1/models``), then rates what it got: ``POST /feedback``
(``{"reward": float, "msg_ids": [completion ids], "task_id": str?, "run_id": int?}``) turns
those completions into experiences with that reward, and ``POST /commit`` computes their group
advantages (a group = one ``task_id`` within a commit, as the original) and puts them in the
experience buffer that a ``mode: train`` process of the same run reads (SQLite under the job
dir). The trainer's published weights (``JobDir.latest_sampler``) are picked up every
``explorer.service_status_check_interval`` seconds: new requests wait while the in-flight
ones finish, then the sampler switches (the original drains an engine the same way).

Each completion is answered as the explorer's loopback endpoint answers a workflow
(``trinity.explorer.openai_api``), token-exact: its ``id`` is the ``msg_id``, and the sampled
ids and logprobs it records are what trains. Completions not rated are kept in memory only, the
newest ``max_unrated`` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from openai.types.chat import ChatCompletion

from trinity.explorer.conversation import Conversations
from trinity.explorer.explorer import rollout_metrics
from trinity.explorer.history import experiences_from_history
from trinity.explorer.openai_api import answer, chat_completion
from trinity.explorer.sampler import PolicySampler, RolloutSettings
from trinity.workflows.types import Experience, Response

log = logging.getLogger(__name__)
DEFAULT_TASK = "serve"
REQUEST_COUNTS = ("chat_completions", "feedback", "commit")


class FeedbackError(ValueError):
    """A ``/feedback`` body this proxy refuses; its message is the 400 answer."""


@dataclass
class _Completion:
    responses: list[Response]
    model_version: int


@dataclass
class Proxy:
    """The service's state; ``app()`` is its HTTP face.

    ``backend``: a ``SamplerBackend``; ``buffer``: the experience buffer the trainer reads;
    ``synchronizer``: where published weights are found; ``advantage_fn``: the algorithm's
    group advantages (``trinity.algorithms.explorer_hook``); ``monitor``: per-commit metrics.
    """

    backend: Any
    settings: RolloutSettings
    buffer: Any
    synchronizer: Any
    advantage_fn: Any
    monitor: Any = None
    check_interval: float = 60.0
    max_unrated: int = 10000  # completions kept for /feedback; the oldest go first
    model_version: int = 0
    commits: int = 0
    completions: dict[str, _Completion] = field(default_factory=dict)
    queued: list[Experience] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REQUEST_COUNTS, 0))

    def __post_init__(self):
        self.conversations = Conversations(
            self.backend.tokenizer, self.settings.chat_template, self.settings.enable_thinking
        )
        self._idle = asyncio.Condition()
        self._in_flight = 0
        self._switching = False
        self.dropped = 0

    # ---- chat ---------------------------------------------------------------------------------
    async def chat(self, body: dict[str, Any]) -> ChatCompletion:
        async with self._idle:
            await self._idle.wait_for(lambda: not self._switching)
            self._in_flight += 1
            version = self.model_version
        try:
            model = PolicySampler(self.backend, self.settings, seed=None)
            model.conversations = self.conversations  # later turns continue the sampled ids
            completion = await chat_completion(model, body)
        finally:
            async with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
        self.completions[completion.id] = _Completion(model.history, version)
        if len(self.completions) > self.max_unrated:
            self.completions.pop(next(iter(self.completions)))
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # at 1, 2, 4, ...: counted, not per call
                log.warning("%d completion(s) never rated were dropped", self.dropped)
        if len(self.conversations) > self.max_unrated:
            self.conversations.clear()  # later turns of older chats are rendered as text
        return completion

    # ---- feedback and commit ------------------------------------------------------------------
    def feedback(self, body: Any) -> int:
        """The rated completions' choices as experiences, queued for the next commit."""
        if not isinstance(body, dict):
            raise FeedbackError("feedback: the body must be a JSON object")
        reward, msg_ids = body.get("reward"), body.get("msg_ids")
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise FeedbackError(f"feedback: 'reward' must be a number, got {reward!r}")
        if not math.isfinite(reward):
            raise FeedbackError(f"feedback: 'reward' must be finite, got {reward!r}")
        if not isinstance(msg_ids, list) or not msg_ids:
            raise FeedbackError("feedback: 'msg_ids' must be a non-empty list of completion ids")
        unknown = [m for m in msg_ids if m not in self.completions]
        if unknown:
            raise FeedbackError(
                f"feedback: unknown or already rated msg_ids {unknown[:5]} "
                f"(the 'id' of a completion this proxy answered)"
            )
        task_id = str(body.get("task_id") or DEFAULT_TASK)
        run_id = int(body.get("run_id") or 0)
        tokenizer = self.backend.tokenizer
        added = 0
        for msg_id in dict.fromkeys(msg_ids):
            done = self.completions.pop(msg_id)
            for exp in experiences_from_history(
                done.responses, concatenated=False, tokenizer=tokenizer
            ):
                exp.reward, exp.task_id = float(reward), task_id
                exp.model_version = done.model_version
                exp.info = {"run": run_id, "msg_id": msg_id}
                self.queued.append(exp)
                added += 1
        return added

    async def commit(self) -> int:
        """The queued experiences, with group advantages, into the trainer's buffer."""
        experiences, self.queued = self.queued, []
        if not experiences:
            return 0
        self.commits += 1
        for exp in experiences:
            exp.group_id = f"serve-{self.commits}/{exp.task_id}"
        metrics = rollout_metrics(experiences, prefix="rollout")
        advantage_metrics = self.advantage_fn(experiences)
        metrics.update({f"experience_pipeline/{k}": v for k, v in advantage_metrics.items()})
        metrics["rollout/model_version"] = float(self.model_version)
        await self.buffer.put(experiences)
        if self.monitor is not None:
            self.monitor.log(metrics, self.commits)
        log.info("commit %d: %d experience(s) to the trainer", self.commits, len(experiences))
        return len(experiences)

    # ---- weights ------------------------------------------------------------------------------
    async def follow_weights(self) -> None:
        """Switch to newly published weights every ``check_interval`` seconds; return when the
        run's trainer finishes (a marker seen absent, then present: not an earlier run's)."""
        trainer_running = False
        while True:
            await asyncio.sleep(self.check_interval)
            await self.sync()
            finished = self.synchronizer.is_trainer_finished()
            if trainer_running and finished:
                log.info("the trainer finished: no more feedback can be trained on; stopping")
                return
            trainer_running = trainer_running or not finished

    async def sync(self) -> bool:
        latest = self.synchronizer.latest()
        if latest.version <= self.model_version:
            return False
        async with self._idle:
            self._switching = True
            await self._idle.wait_for(lambda: self._in_flight == 0)
        try:
            await self.backend.switch(latest.ref)
            self.model_version = latest.version
            log.info("serving model version %d", latest.version)
        finally:
            async with self._idle:
                self._switching = False
                self._idle.notify_all()
        return True

    # ---- HTTP ---------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title="trinity serve (OpenAI-compatible)")
        started = time.time()

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            self.counts["chat_completions"] += 1
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                return answer(await self.chat(body), body, self.backend.tokenizer)
            except ValueError as exc:  # a bad request: RequestError, bad JSON
                return _error(400, str(exc), "invalid_request_error")
            except Exception as exc:  # noqa: BLE001 - the agent gets one line, the log the trace
                log.exception("chat completion failed")
                return _error(500, f"{type(exc).__name__}: {exc}", "internal_error")

        @app.get("/v1/models")
        async def models() -> Any:
            name = str(getattr(self.backend.tokenizer, "name_or_path", "") or "policy")
            card = {"id": name, "object": "model", "created": int(started), "owned_by": "trinity"}
            return {"object": "list", "data": [card]}

        @app.post("/feedback")
        async def feedback(request: Request) -> Any:
            self.counts["feedback"] += 1
            try:
                added = self.feedback(await request.json())
            except ValueError as exc:  # FeedbackError, bad JSON
                return _error(400, str(exc), "invalid_request_error")
            return {"status": "success", "experience_count": added}

        @app.post("/commit")
        async def commit() -> Any:
            self.counts["commit"] += 1
            return {"status": "success", "experience_count": await self.commit()}

        @app.get("/health")
        async def health() -> Any:
            return {"status": "ok", "model_version": self.model_version}

        @app.get("/metrics")
        async def metrics() -> Any:
            return {
                "requests": dict(self.counts),
                "model_version": self.model_version,
                "explore_step_num": self.commits,
                "pending_completions": len(self.completions),
                "queued_experiences": len(self.queued),
            }

        return app


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status)


async def serve(proxy: Proxy, host: str, port: int, on_ready: Any = None) -> None:
    """Serve ``proxy`` until Ctrl-C or the run's trainer finishes; ``on_ready(url)`` once it
    listens."""
    import uvicorn

    config = uvicorn.Config(proxy.app(), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    follower = asyncio.ensure_future(proxy.follow_weights())
    try:
        while not server.started:
            if serving.done():
                serving.result()  # raises the reason it could not start (port taken, ...)
                raise RuntimeError(f"the serve proxy did not start on {host}:{port}")
            await asyncio.sleep(0.05)
        if on_ready is not None:
            bound = server.servers[0].sockets[0].getsockname()[1]  # port 0: the one it got
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            on_ready(f"http://{shown}:{bound}/v1")
        await asyncio.wait([serving, follower], return_when=asyncio.FIRST_COMPLETED)
    finally:
        follower.cancel()
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        with contextlib.suppress(asyncio.CancelledError):
            await follower
