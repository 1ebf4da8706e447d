"""The server's front desk: API keys and sessions, and each request orchestrated over the parts.

HTTP-free (``app.py`` maps routes onto these methods), so ``trinity server export`` can use it
offline. Every method runs on the event loop thread, which keeps the bookkeeping single-threaded;
engine work is queued on the base model's ``EngineWorker`` and comes back through ``Futures``.
The parts: ``wire.py`` checks requests, ``training.py`` keeps the live training models (each
with a ``command_log.CommandLog`` that runs its commands in ``seq_id`` order),
``checkpoints.py`` the checkpoints and ``samplers.py`` the sampling sessions. Runs, checkpoints,
samplers and results live in SQLite (``store.py``), weights as safetensors under ``data_dir``.

Simplifications, on purpose: ``kind="inflight"`` samplers are snapshots; AdamW only; text chunks
only; top-k logprobs of prompts, not of samples. docs/tinker-compat.md lists every route and loss.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinker import types

from trinity.engine.worker import EngineFuture
from trinity.server import age, wire
from trinity.server.checkpoints import Checkpoints
from trinity.server.command_log import Job
from trinity.server.futures import Futures, Result, ServiceError, json_result
from trinity.server.limits import Limits
from trinity.server.samplers import Samplers
from trinity.server.served import ServedModel, find_model, require_model, safe_name
from trinity.server.sessions import DEFAULT_IDLE_S, IdleClock
from trinity.server.store import Store
from trinity.server.training import Model, TrainingModels
from trinity.server.ttl import CheckpointTTL

log = logging.getLogger("trinity.server")
SaveRequest = (
    types.SaveWeightsRequest | types.SaveWeightsForSamplerRequest | types.SaveWeightsExternalRequest
)


@dataclass
class Session:
    tenant: str
    finished: str | None = None


class Service:
    def __init__(
        self,
        models: list[ServedModel],
        data_dir: Path | str,
        api_keys: dict[str, str] | None = None,
        *,
        long_poll_s: float = 30.0,
        resident_samplers: int = 16,
        batch_window_s: float = 0.02,
        recover: bool = True,
        client_config: dict | None = None,
        limits: Limits | None = None,
        session_idle_s: float | None = DEFAULT_IDLE_S,
    ):
        """``api_keys``: key -> tenant; empty = open mode (any ``tml-`` key, one tenant).

        ``batch_window_s``: a sample batch stays open while requests keep arriving less than this
        apart; the SDK's requests from concurrent workflows come a few ms apart over HTTP, and
        decoding them as one batch halves a GRPO explore step (4 workflows: 2 ms split them
        into 2-3 batches, 20 ms keeps them in one).
        ``recover=False`` (offline tools next to a live server) leaves pending futures alone.
        ``client_config``: flags for the SDK's ``/client/config`` (e.g. fwdbwd_max_chunk_len).
        ``limits``: what one client may make the server hold (``limits.Limits``).
        ``session_idle_s``: a session without heartbeat or call for this long is finished
        (``sessions.py``); None never expires one.
        """
        if not models:
            raise ValueError("the server needs at least one model")
        self.models = models
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.api_keys = api_keys or {}
        self.limits = limits or Limits()
        self.client_config = {"pjwt_auth_enabled": False, **(client_config or {})}
        self.store = Store(self.data_dir / "server.sqlite")
        self.futures = Futures(self.store, long_poll_s)
        self.checkpoints = Checkpoints(self.store, self.data_dir / "checkpoints", models)
        self.ttl = CheckpointTTL(self.store, self.checkpoints)
        self.samplers = Samplers(self.store, self.futures, self.checkpoints, models)
        self.training = TrainingModels(
            self.store,
            self.futures,
            models,
            self.data_dir / "autosave",
            self._session,
            self.limits,
        )
        for m in models:
            m.start(self.data_dir / "spill" / safe_name(m.name), resident_samplers, batch_window_s)
        self.sessions: dict[str, Session] = {}
        self.idle = IdleClock(session_idle_s)
        self._restore(recover)

    def _restore(self, recover: bool) -> None:
        """Reload what a previous run of this data dir acknowledged."""
        if recover:
            self.checkpoints.remove_orphans()
            self.futures.fail_unfinished(
                "the server restarted before this request ran; model "
                "state held only in memory is gone, continue from a "
                "checkpoint"
            )
        for row in self.store.sessions():
            self.sessions[row["session_id"]] = Session(row["tenant"], row["finished"])
            if row["finished"] is None:
                self.idle.touch(row["session_id"])
        self.samplers.restore()

    def close(self, autosave: bool = True) -> None:
        """Finish queued engine work, save live models for the next start, release the DB."""
        if autosave:
            for job in self.training.autosave():
                try:
                    job.result(timeout=600)
                except Exception:  # noqa: BLE001 - one failed save must not block the rest
                    log.exception("autosave failed")
        for m in self.models:
            m.worker.close()
        self.store.close()

    # --------------------------------------------------------------------- auth, sessions
    def authenticate(self, key: str | None) -> str:
        if not key:
            raise ServiceError(401, "missing X-API-Key header (the SDK sends TINKER_API_KEY)")
        if not self.api_keys:
            return "default"
        tenant = self.api_keys.get(key)
        if tenant is None:
            raise ServiceError(401, "invalid API key")
        return tenant

    def capabilities(self) -> types.GetServerCapabilitiesResponse:
        return types.GetServerCapabilitiesResponse(
            supported_models=[
                types.SupportedModel(
                    model_name=m.name,
                    max_context_length=m.max_context,
                    trainable=True,
                    sampleable=True,
                )
                for m in self.models
            ]
        )

    def _base(self, name: str | None) -> ServedModel:
        return require_model(self.models, name)

    def create_session(self, tenant: str, req: types.CreateSessionRequest) -> str:
        session_id = str(uuid.uuid4())
        self.sessions[session_id] = Session(tenant)
        self.idle.touch(session_id)
        self.store.add_session(session_id, tenant, req.model_dump(mode="json"))
        return session_id

    def _session(self, tenant: str, session_id: str, live: bool = True) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != tenant:
            raise ServiceError(404, f"unknown session_id {session_id!r}")
        if live and session.finished is not None:
            raise ServiceError(
                400,
                f"session {session_id!r} is finished ({session.finished}); "
                "create a new ServiceClient",
            )
        if live:
            self.idle.touch(session_id)
        return session

    def heartbeat(self, tenant: str, session_id: str) -> None:
        session = self._session(tenant, session_id, live=False)
        if session.finished is not None:
            raise ServiceError(410, f"session {session_id!r} is finished ({session.finished})")
        self.idle.touch(session_id)

    def finish_session(self, tenant: str, session_id: str, reason: str) -> None:
        """First finish wins; frees the session's models and snapshots after their queued work."""
        session = self._session(tenant, session_id, live=False)
        if session.finished is not None:
            return
        session.finished = reason
        self.idle.forget(session_id)
        self.store.finish_session(session_id, reason)
        self.training.finish(session_id)
        self.samplers.finish(session_id, reason)

    def reap(self) -> None:
        """Finish idle sessions (``sessions.py``), delete expired checkpoints (their TTL)."""
        for session_id in self.idle.idle():
            self.finish_session(self.sessions[session_id].tenant, session_id, self.idle.reason)
        self.ttl.reap()

    # --------------------------------------------------------------------- training
    def create_model(self, tenant: str, req: types.CreateModelRequest) -> types.UntypedAPIFuture:
        self._session(tenant, req.session_id)
        base = self._base(req.base_model)
        lora = wire.check_create_model(req, self.limits.max_lora_rank)
        return self.training.open(
            tenant,
            req.session_id,
            req.model_seq_id,
            base,
            lora,
            req.user_metadata,
            "create",
            lambda model_id: json_result(types.CreateModelResponse(model_id=model_id)),
        )

    # Each training command checks its request in a ``prepare`` function that the command log
    # calls once the command has its place: a rejected command then still uses up its seq_id.
    def forward_backward(self, tenant: str, req: wire.FwdBwdRequest) -> types.UntypedAPIFuture:
        model = self.training.get(tenant, req.model_id)
        engine = model.base.engine

        def run() -> Result:
            out = engine.forward_backward(
                model.model_id,
                req.data,
                req.loss_fn,
                req.loss_fn_config or None,
                forward_only=req.forward_only,
                return_entropy=req.return_entropy,
            )
            return wire.PROTO_CONTENT_TYPE, wire.encode_forward_backward_output(out)

        def prepare() -> Job:
            wire.validate_request(req, model.base.vocab_size, model.base.max_context)
            return run

        return self.training.submit(model, req.seq_id, prepare)

    def optim_step(self, tenant: str, req: types.OptimStepRequest) -> types.UntypedAPIFuture:
        model = self.training.get(tenant, req.model_id)
        engine = model.base.engine

        def prepare() -> Job:
            params = wire.check_optim_step(req)

            def run() -> Result:
                metrics = wire.check_optim_metrics(engine.optim_step(model.model_id, params) or {})
                return json_result(types.OptimStepResponse(metrics=metrics))

            return run

        return self.training.submit(model, req.seq_id, prepare)

    def load_weights(self, tenant: str, req: types.LoadWeightsRequest) -> types.UntypedAPIFuture:
        """Into an existing model (``load_state``), or create-via-load (``..._from_state``)."""
        wire.check_load_target(req)

        def source() -> tuple[str, dict]:
            """The checkpoint's directory and its run's row, if it may be loaded."""
            ckpt, run = self.checkpoints.find(tenant, req.path)
            wire.check_load_optimizer(req, ckpt["kind"])
            return ckpt["directory"], run

        def response(model_id: str | None = None) -> Result:
            return json_result(
                types.LoadWeightsResponse(path=req.path, model_id=model_id, type="load_weights")
            )

        optimizer = bool(req.optimizer)
        if req.session_id is None:
            model = self.training.get(tenant, req.model_id)
            engine = model.base.engine

            def prepare() -> Job:
                directory, run = source()
                wire.check_same_lora(req.path, run["lora"], model.lora)

                def load() -> Result:
                    engine.load_state(model.model_id, directory, optimizer=optimizer)
                    return response()

                return load

            return self.training.submit(model, req.seq_id, prepare)

        self._session(tenant, req.session_id)
        directory, run = source()
        base = self._base(req.base_model or run["base_model"])
        wire.check_same_base(
            req.path,
            run["base_model"],
            req.base_model,
            base is find_model(self.models, run["base_model"]),
        )

        def loaded(model_id: str) -> Result:
            base.engine.load_state(model_id, directory, optimizer=optimizer)
            return response(model_id)

        return self.training.open(
            tenant,
            req.session_id,
            req.model_seq_id,
            base,
            run["lora"],
            req.user_metadata,
            "load",
            loaded,
        )

    # --------------------------------------------------------------------- saving
    def save_weights(self, tenant: str, req: types.SaveWeightsRequest) -> types.UntypedAPIFuture:
        """``save_state``: LoRA weights and optimizer state, loadable to continue training."""
        model = self.training.get(tenant, req.model_id)
        engine = model.base.engine
        return self._save(
            model,
            req,
            "weights",
            lambda d: engine.save_state(model.model_id, str(d), optimizer=True),
            overwrite=req.overwrite,
            user_metadata=req.user_metadata,
        )

    def save_weights_external(
        self, tenant: str, req: types.SaveWeightsExternalRequest
    ) -> types.UntypedAPIFuture:
        """The weights for use outside Tinker (``external_weights/NAME``): an adapter directory
        named as Tinker's are for a LoRA model, a Hugging Face model directory for a full
        fine-tune; with ``age_encryption_recipients`` every file is ``NAME.age`` (``age.py``).
        ``RestClient.get_external_weights_urls`` downloads the files."""
        model = self.training.get(tenant, req.model_id)
        engine = model.base.engine
        recipients: list = []

        def check() -> None:
            if req.age_encryption_recipients:
                recipients.extend(age.parse_recipients(req.age_encryption_recipients))

        def write(directory: Path) -> None:
            if model.lora:  # Tinker's adapter names, which tinker-cookbook's merge expects
                engine.export_peft(model.model_id, str(directory), tinker_names=True)
            else:
                engine.export_merged(model.model_id, str(directory))
            if recipients:
                age.encrypt_directory(directory, recipients)

        return self._save(model, req, "external_weights", write, check=check)

    def save_weights_for_sampler(
        self, tenant: str, req: types.SaveWeightsForSamplerRequest
    ) -> types.UntypedAPIFuture:
        """Named: a ``sampler_weights/`` checkpoint. Unnamed: an in-memory snapshot sampler."""
        model = self.training.get(tenant, req.model_id)
        engine = model.base.engine
        if req.path is not None:
            key = f"save:{model.model_id}"

            def write(directory: Path) -> None:
                engine.snapshot_sampler(model.model_id, key)
                try:
                    engine.save_sampler(key, str(directory))
                finally:
                    engine.drop_sampler(key)

            return self._save(model, req, "sampler_weights", write, user_metadata=req.user_metadata)

        sampler_id = f"{model.session_id}:sample:{req.sampling_session_seq_id}"

        def snapshot() -> Result:
            engine.snapshot_sampler(model.model_id, sampler_id)
            return json_result(
                types.SaveWeightsForSamplerResponseInternal(
                    sampling_session_id=sampler_id, type="save_weights_for_sampler"
                )
            )

        def prepare() -> Job:
            wire.check_save_for_sampler(req)
            self.samplers.add_snapshot(
                sampler_id, tenant, model.session_id, model.base, model.model_id
            )
            return snapshot

        return self.training.submit(
            model, req.seq_id, prepare, on_dispatch=lambda: model.base.samplers.added(sampler_id)
        )

    def _save(
        self,
        model: Model,
        req: SaveRequest,
        kind: str,
        write: Callable[[Path], None],
        *,
        overwrite: bool = True,
        user_metadata: dict | None = None,
        check: Callable[[], None] = lambda: None,
    ) -> types.UntypedAPIFuture:
        """Command ``req.seq_id`` of ``model``: ``check()`` the request, then write checkpoint
        ``kind/req.path`` with ``write(directory)``."""

        def prepare() -> Job:
            check()
            return self.checkpoints.writer(
                model, kind, req.path, req.ttl_seconds, overwrite, user_metadata, write
            )

        return self.training.submit(model, req.seq_id, prepare)

    def export_peft(self, tenant: str, path: str, out_dir: str) -> EngineFuture[str]:
        """Write checkpoint ``path`` as a peft adapter directory on this machine."""
        ckpt, run = self.checkpoints.find(tenant, path)
        base = self._base(run["base_model"])
        name = self.checkpoints.sampler_weights(base, ckpt, run)
        base.samplers.use(name)
        return base.worker.call(lambda: base.engine.export_peft(name, out_dir) or out_dir)

    # --------------------------------------------------------------------- sampling
    async def create_sampling_session(
        self, tenant: str, req: types.CreateSamplingSessionRequest
    ) -> str:
        self._session(tenant, req.session_id)
        return await self.samplers.create(tenant, req)
