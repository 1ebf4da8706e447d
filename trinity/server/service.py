"""The server's state machine: sessions, models, ordered commands, samplers, checkpoints.

HTTP-free (``app.py`` maps routes onto these methods), so ``trinity server export`` can use it
offline. Every method runs on the event loop thread, which keeps the bookkeeping single-threaded;
engine work is queued on the base model's ``EngineWorker`` and comes back through ``Futures``.

* Training: model ids are ``{session}:train:{n}`` (the SDK derives them client-side). Each model's
  commands (fwd/bwd, optim, save, load) run in ``seq_id`` order: an early arrival waits in
  ``Model.held`` for the gap to fill (the SDK sends a call's chunks in parallel, first chunk
  last), and a retried ``(model, seq_id)`` gets the same future.
* Sampling: a sampler names weights (an in-memory snapshot, a checkpoint, or the base model);
  ``served.ResidentSamplers`` keeps the recently used ones in engine memory. Requests from every
  client of one base model share the worker queue, so concurrent samples decode as one batch.
* Persistence: runs, checkpoints, samplers and results live in SQLite, weights as safetensors under
  ``data_dir/checkpoints``. A graceful shutdown (``close``) also saves every live model with its
  optimizer state under ``autosave/`` and restores it on its next request, so a client that kept
  running continues where it was; after a crash, continue from a checkpoint.

Simplifications, on purpose: ``kind="inflight"`` samplers are snapshots; AdamW only; text chunks
only; no top-k logprobs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tinker import types

from trinity.engine import LoraSpec, SampleRequest
from trinity.engine.worker import EngineFuture
from trinity.server import wire
from trinity.server.futures import JSON, Future, Futures, Result, ServiceError, describe
from trinity.server.served import ServedModel, safe_name
from trinity.server.store import Store

log = logging.getLogger("trinity.server")

KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


# ------------------------------------------------------------------------- configuration
def parse_api_keys(spec: str | None) -> dict[str, str]:
    """``tml-KEY=tenant`` entries, comma- or newline-separated, inline or in a file.

    A bare key gets a tenant derived from its hash. Keys must start with ``tml-`` because the
    official SDK refuses any other key before sending it.
    """
    if not spec:
        return {}
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    keys: dict[str, str] = {}
    for raw in re.split(r"[,\n]", text):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        key, _, tenant = (part.strip() for part in entry.partition("="))
        if not key.startswith("tml-"):
            raise ValueError(f"API key {key[:8]!r}... must start with 'tml-' (the SDK rejects "
                             "other keys)")
        keys[key] = tenant or "tenant-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return keys


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """``tinker://RUN/KIND/NAME`` -> (run, kind, name); 400 on anything else."""
    parts = path.removeprefix("tinker://").split("/")
    if not path.startswith("tinker://") or len(parts) != 3 or parts[1] not in KINDS \
            or not parts[0] or not parts[2]:
        raise ServiceError(400, f"checkpoint path {path!r} is not tinker://<run>/weights/<name>, "
                                "tinker://<run>/sampler_weights/<name> or "
                                "tinker://<run>/external_weights/<name>")
    return parts[0], parts[1], parts[2]


# ------------------------------------------------------------------------- state
@dataclass
class Session:
    tenant: str
    finished: str | None = None


@dataclass
class Model:
    model_id: str
    tenant: str
    session_id: str
    base: ServedModel
    lora: dict | None  # a LoraConfig dump; None = full fine-tuning
    next_seq: int = 1
    held: dict[int, tuple[Future, Callable[[], Result], Callable[[], None] | None]] = \
        field(default_factory=dict)


@dataclass
class Sampler:
    sampler_id: str
    tenant: str
    session_id: str
    base: ServedModel
    model_path: str | None  # the tinker:// path it samples, None for base or snapshot
    weights: str | None  # a ResidentSamplers name; None = the base model


class Service:
    def __init__(self, models: list[ServedModel], data_dir: Path | str,
                 api_keys: dict[str, str] | None = None, *, long_poll_s: float = 30.0,
                 resident_samplers: int = 16, batch_window_s: float = 0.02,
                 recover: bool = True, client_config: dict | None = None):
        """``api_keys``: key -> tenant; empty = open mode (any ``tml-`` key, one tenant).

        ``batch_window_s``: a sample batch stays open while requests keep arriving less than this
        apart; the SDK's requests from concurrent workflows come a few ms apart over HTTP, and
        decoding them as one batch halves a GRPO explore step (4 workflows: 2 ms split them
        into 2-3 batches, 20 ms keeps them in one).
        ``recover=False`` (offline tools next to a live server) leaves pending futures alone.
        ``client_config``: flags for the SDK's ``/client/config`` (e.g. fwdbwd_max_chunk_len).
        """
        if not models:
            raise ValueError("the server needs at least one model")
        self.models = models
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.api_keys = api_keys or {}
        self.client_config = {"pjwt_auth_enabled": False, **(client_config or {})}
        self.store = Store(self.data_dir / "server.sqlite")
        self.futures = Futures(self.store, long_poll_s)
        for m in models:
            m.start(self.data_dir / "spill" / safe_name(m.name), resident_samplers, batch_window_s)
        self.sessions: dict[str, Session] = {}
        self.live_models: dict[str, Model] = {}
        self.samplers: dict[str, Sampler] = {}
        self._restore(recover)

    def _restore(self, recover: bool) -> None:
        """Reload what a previous run of this data dir acknowledged."""
        if recover:
            self.futures.fail_unfinished("the server restarted before this request ran; model "
                                         "state held only in memory is gone, continue from a "
                                         "checkpoint")
        for row in self.store.sessions():
            self.sessions[row["session_id"]] = Session(row["tenant"], row["finished"])
        for row in self.store.samplers():
            base = self._find_base(row["base_model"])
            if base is None:
                continue
            sampler_id, path = row["sampler_id"], row["model_path"]
            if path is None:  # the base model
                weights = None
            elif path.startswith("tinker://"):  # a checkpoint: loaded again on first use
                weights = f"ckpt:{path}"
            else:  # an in-memory snapshot, gone with the old process
                path, weights = None, sampler_id
            self.samplers[sampler_id] = Sampler(sampler_id, row["tenant"],
                                                sampler_id.split(":sample:")[0], base, path,
                                                weights)

    def close(self, autosave: bool = True) -> None:
        """Finish queued engine work, save live models for the next start, release the DB."""
        if autosave:
            jobs = [m.base.worker.call(self._autosave, m) for m in self.live_models.values()]
            for job in jobs:
                try:
                    job.result(timeout=600)
                except Exception:  # noqa: BLE001 - one failed save must not block the rest
                    log.exception("autosave failed")
        for m in self.models:
            m.worker.close()
        self.store.close()

    def _autosave(self, model: Model) -> None:
        directory = self.data_dir / "autosave" / safe_name(model.model_id)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        model.base.engine.save_state(model.model_id, str(directory), optimizer=True)
        self.store.set_autosave(model.model_id, str(directory), model.next_seq)

    # --------------------------------------------------------------------- auth, models, sessions
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
        return types.GetServerCapabilitiesResponse(supported_models=[
            types.SupportedModel(model_name=m.name, max_context_length=m.max_context,
                                 trainable=True, sampleable=True) for m in self.models])

    def _find_base(self, name: str | None) -> ServedModel | None:
        return next((m for m in self.models if name == m.name or name in m.aliases), None)

    def _base(self, name: str | None) -> ServedModel:
        base = self._find_base(name)
        if base is None:
            raise ServiceError(404, f"unknown base_model {name!r}; this server serves "
                                    f"{[m.name for m in self.models]}")
        return base

    def create_session(self, tenant: str, req: types.CreateSessionRequest) -> str:
        session_id = str(uuid.uuid4())
        self.sessions[session_id] = Session(tenant)
        self.store.add_session(session_id, tenant, req.model_dump(mode="json"))
        return session_id

    def _session(self, tenant: str, session_id: str, live: bool = True) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != tenant:
            raise ServiceError(404, f"unknown session_id {session_id!r}")
        if live and session.finished is not None:
            raise ServiceError(400, f"session {session_id!r} is finished ({session.finished}); "
                                    "create a new ServiceClient")
        return session

    def heartbeat(self, tenant: str, session_id: str) -> None:
        if self._session(tenant, session_id, live=False).finished is not None:
            raise ServiceError(410, f"session {session_id!r} is finished")

    def finish_session(self, tenant: str, session_id: str, reason: str) -> None:
        """First finish wins; frees the session's models and snapshots after their queued work."""
        session = self._session(tenant, session_id, live=False)
        if session.finished is not None:
            return
        session.finished = reason
        self.store.finish_session(session_id, reason)
        for model in [m for m in self.live_models.values() if m.session_id == session_id]:
            del self.live_models[model.model_id]
            model.base.worker.call(model.base.engine.remove_model, model.model_id)
        for sampler in [s for s in self.samplers.values() if s.session_id == session_id]:
            if sampler.weights == sampler.sampler_id:  # its own snapshot
                sampler.base.samplers.forget(sampler.weights)

    # --------------------------------------------------------------------- training
    def create_model(self, tenant: str, req: types.CreateModelRequest) -> types.UntypedAPIFuture:
        self._session(tenant, req.session_id)
        base = self._base(req.base_model)
        if req.optimizer_config.type != "adamw":
            raise ServiceError(400, f"CreateModelRequest.optimizer_config.type "
                                    f"{req.optimizer_config.type!r} is not supported (adamw only)")
        lora = req.lora_config.model_dump() if req.lora_config is not None else None
        if lora is not None and lora["rank"] <= 0:
            raise ServiceError(400, f"CreateModelRequest.lora_config.rank must be positive, got "
                                    f"{lora['rank']}")
        return self._open_model(tenant, req.session_id, req.model_seq_id, base, lora,
                                req.user_metadata, "create",
                                lambda model_id: _json(types.CreateModelResponse(model_id=model_id)))

    def _open_model(self, tenant: str, session_id: str, model_seq_id: int, base: ServedModel,
                    lora: dict | None, user_metadata: dict | None, action: str,
                    then: Callable[[str], Result]) -> types.UntypedAPIFuture:
        """Model ``<session>:train:<seq>``, registered once per request id (a retried request
        finds its future); the worker creates it in the engine, then ``then(model_id)`` answers."""
        model_id = f"{session_id}:train:{model_seq_id}"
        future, new = self.futures.open(f"{model_id}:{action}", tenant)
        if new:
            self._add_model(tenant, session_id, model_id, base, lora, user_metadata)

            def create() -> Result:
                base.engine.create_model(model_id, _lora_spec(lora))
                return then(model_id)

            self.futures.run(future, base.worker, create)
        return types.UntypedAPIFuture(request_id=future.request_id, model_id=model_id)

    def _add_model(self, tenant: str, session_id: str, model_id: str, base: ServedModel,
                   lora: dict | None, user_metadata: dict | None) -> Model:
        model = self.live_models[model_id] = Model(model_id, tenant, session_id, base, lora)
        self.store.add_run(model_id, tenant, session_id, base.name, lora, user_metadata)
        return model

    def _model(self, tenant: str, model_id: str) -> Model:
        """A live model of ``tenant``; one saved at the last graceful shutdown is restored."""
        model = self.live_models.get(model_id)
        if model is not None and model.tenant == tenant:
            self._session(tenant, model.session_id)
            return model
        run = self.store.run(model_id)
        if run is None or run["tenant"] != tenant:
            raise ServiceError(404, f"unknown model_id {model_id!r}")
        if not run["autosave"]:
            raise ServiceError(400, f"model {model_id!r} is no longer loaded (its session "
                                    "finished or the server restarted); continue from a "
                                    "checkpoint with create_training_client_from_state")
        self._session(tenant, run["session_id"])
        base = self._base(run["base_model"])
        model = Model(model_id, tenant, run["session_id"], base, run["lora"],
                      next_seq=int(run["next_seq"] or 1))
        self.live_models[model_id] = model
        self.store.set_autosave(model_id, None, None)
        directory, lora = run["autosave"], _lora_spec(run["lora"])

        def restore() -> None:  # FIFO worker: runs before the command that triggered it
            base.engine.create_model(model_id, lora)
            base.engine.load_state(model_id, directory, optimizer=True)

        base.worker.call(restore)
        return model

    def _ordered(self, model: Model, seq_id: int | None, job: Callable[[], Result],
                 on_dispatch: Callable[[], None] | None = None) -> types.UntypedAPIFuture:
        """Queue ``job`` as command ``seq_id`` of ``model``; later seq_ids wait for the gap.

        ``on_dispatch`` runs when the job is handed to the worker, for bookkeeping that must
        follow the worker's order rather than arrival order.
        """
        if seq_id is None or seq_id <= 0:  # unordered (older SDKs): after what is queued
            future, _ = self.futures.open(f"{model.model_id}:{uuid.uuid4().hex}", model.tenant)
            self._dispatch(model, future, job, on_dispatch)
            return types.UntypedAPIFuture(request_id=future.request_id, model_id=model.model_id)
        request_id = f"{model.model_id}:{seq_id}"
        if not self.futures.exists(request_id):
            if seq_id < model.next_seq:
                raise ServiceError(400, f"seq_id {seq_id} was already used for model "
                                        f"{model.model_id!r} (next expected {model.next_seq})")
            future, _ = self.futures.open(request_id, model.tenant)
            model.held[seq_id] = (future, job, on_dispatch)
            while model.next_seq in model.held:
                self._dispatch(model, *model.held.pop(model.next_seq))
                model.next_seq += 1
            self.store.touch_run(model.model_id)
        else:
            self.futures.open(request_id, model.tenant)  # a retry: same future (checks owner)
        return types.UntypedAPIFuture(request_id=request_id, model_id=model.model_id)

    def _dispatch(self, model: Model, future: Future, job: Callable[[], Result],
                  on_dispatch: Callable[[], None] | None) -> None:
        if on_dispatch is not None:
            on_dispatch()
        self.futures.run(future, model.base.worker, job)

    def get_info(self, tenant: str, model_id: str) -> types.GetInfoResponse:
        model = self.live_models.get(model_id)
        if model is not None and model.tenant == tenant:
            base, lora = model.base, model.lora
        else:
            run = self.store.run(model_id)
            if run is None or run["tenant"] != tenant:
                raise ServiceError(404, f"unknown model_id {model_id!r}")
            base, lora = self._base(run["base_model"]), run["lora"]
        # tokenizer_id is the model directory: the SDK's get_tokenizer then needs no hub access.
        data = types.ModelData(arch=getattr(base.engine, "arch", None), model_name=base.name,
                               tokenizer_id=str(base.path))
        return types.GetInfoResponse(type="get_info", model_id=model_id, model_data=data,
                                     model_name=base.name, is_lora=lora is not None,
                                     lora_rank=lora["rank"] if lora else None)

    def forward_backward(self, tenant: str, req: wire.FwdBwdRequest) -> types.UntypedAPIFuture:
        model = self._model(tenant, req.model_id)
        wire.validate_request(req, model.base.vocab_size, model.base.max_context)
        engine = model.base.engine

        def run() -> Result:
            out = engine.forward_backward(model.model_id, req.data, req.loss_fn,
                                          req.loss_fn_config or None,
                                          forward_only=req.forward_only,
                                          return_entropy=req.return_entropy)
            return wire.PROTO_CONTENT_TYPE, wire.encode_forward_backward_output(out)

        return self._ordered(model, req.seq_id, run)

    def optim_step(self, tenant: str, req: types.OptimStepRequest) -> types.UntypedAPIFuture:
        model = self._model(tenant, req.model_id)
        params = req.optim_params
        if not isinstance(params, types.AdamParams):
            raise ServiceError(400, f"OptimStepRequest: optimizer {params.type!r} is not "
                                    "supported (adam_params only)")
        if params.learning_rate < 0:
            raise ServiceError(400, f"OptimStepRequest.adam_params.learning_rate must be >= 0, "
                                    f"got {params.learning_rate}")
        engine = model.base.engine

        def run() -> Result:
            metrics = engine.optim_step(model.model_id, params) or {}
            return _json(types.OptimStepResponse(metrics={k: float(v)
                                                          for k, v in metrics.items()}))

        return self._ordered(model, req.seq_id, run)

    def load_weights(self, tenant: str, req: types.LoadWeightsRequest) -> types.UntypedAPIFuture:
        """Into an existing model (``load_state``), or create-via-load (``..._from_state``)."""
        ckpt, run = self._checkpoint(tenant, req.path)
        if req.optimizer and ckpt["kind"] != "training":
            raise ServiceError(400, f"LoadWeightsRequest.path {req.path!r} holds sampler weights, "
                                    "which carry no optimizer state; load a "
                                    "tinker://.../weights/... checkpoint")
        directory, optimizer, lora = ckpt["directory"], bool(req.optimizer), run["lora"]
        if req.session_id is None:
            if req.model_id is None:
                raise ServiceError(400, "LoadWeightsRequest needs model_id+seq_id or "
                                        "session_id+model_seq_id")
            model = self._model(tenant, req.model_id)
            if (model.lora or {}).get("rank") != (lora or {}).get("rank"):
                raise ServiceError(400, f"LoadWeightsRequest.path {req.path!r} has LoRA "
                                        f"{lora}, the model has {model.lora}")
            engine = model.base.engine

            def load() -> Result:
                engine.load_state(model.model_id, directory, optimizer=optimizer)
                return _json(types.LoadWeightsResponse(path=req.path, type="load_weights"))

            return self._ordered(model, req.seq_id, load)

        self._session(tenant, req.session_id)
        if req.model_seq_id is None:
            raise ServiceError(400, "LoadWeightsRequest with session_id needs model_seq_id")
        base = self._base(req.base_model or run["base_model"])
        if base is not self._find_base(run["base_model"]):
            raise ServiceError(400, f"checkpoint {req.path!r} was trained on "
                                    f"{run['base_model']!r}, not {req.base_model!r}")

        def loaded(model_id: str) -> Result:
            base.engine.load_state(model_id, directory, optimizer=optimizer)
            return _json(types.LoadWeightsResponse(path=req.path, model_id=model_id,
                                                   type="load_weights"))

        return self._open_model(tenant, req.session_id, req.model_seq_id, base, lora,
                                req.user_metadata, "load", loaded)

    # --------------------------------------------------------------------- checkpoints
    def save_weights(self, tenant: str, req: types.SaveWeightsRequest) -> types.UntypedAPIFuture:
        """``save_state``: LoRA weights and optimizer state, loadable to continue training."""
        model = self._model(tenant, req.model_id)
        engine = model.base.engine
        job = self._save(model, "weights", req.path, req.ttl_seconds, req.overwrite,
                         req.user_metadata,
                         lambda d: engine.save_state(model.model_id, str(d), optimizer=True))
        return self._ordered(model, req.seq_id, job)

    def save_weights_external(self, tenant: str,
                              req: types.SaveWeightsExternalRequest) -> types.UntypedAPIFuture:
        """The weights for use outside Tinker (``external_weights/NAME``): a peft adapter
        directory for a LoRA model (what Tinker hands out), a Hugging Face model directory for a
        full fine-tune. ``RestClient.get_external_weights_urls`` downloads the files."""
        model = self._model(tenant, req.model_id)
        if req.age_encryption_recipients:
            raise ServiceError(400, "SaveWeightsExternalRequest.age_encryption_recipients is not "
                                    "supported by this server")
        engine = model.base.engine
        export = engine.export_peft if model.lora else engine.export_merged
        job = self._save(model, "external_weights", req.path, req.ttl_seconds, True, None,
                         lambda d: export(model.model_id, str(d)))
        return self._ordered(model, req.seq_id, job)

    def save_weights_for_sampler(self, tenant: str, req: types.SaveWeightsForSamplerRequest
                                 ) -> types.UntypedAPIFuture:
        """Named: a ``sampler_weights/`` checkpoint. Unnamed: an in-memory snapshot sampler."""
        model = self._model(tenant, req.model_id)
        engine = model.base.engine
        if req.path is not None:
            key = f"save:{model.model_id}"

            def write(directory: Path) -> None:
                engine.snapshot_sampler(model.model_id, key)
                try:
                    engine.save_sampler(key, str(directory))
                finally:
                    engine.drop_sampler(key)

            job = self._save(model, "sampler_weights", req.path, req.ttl_seconds, True,
                             req.user_metadata, write)
            return self._ordered(model, req.seq_id, job)

        if req.sampling_session_seq_id is None:
            raise ServiceError(400, "SaveWeightsForSamplerRequest needs a path (name) or a "
                                    "sampling_session_seq_id")
        sampler_id = f"{model.session_id}:sample:{req.sampling_session_seq_id}"
        if sampler_id not in self.samplers:
            self.samplers[sampler_id] = Sampler(sampler_id, tenant, model.session_id, model.base,
                                                None, sampler_id)
            self.store.add_sampler(sampler_id, tenant, model.base.name,
                                   f"snapshot:{model.model_id}")

        def snapshot() -> Result:
            engine.snapshot_sampler(model.model_id, sampler_id)
            return _json(types.SaveWeightsForSamplerResponseInternal(
                sampling_session_id=sampler_id, type="save_weights_for_sampler"))

        return self._ordered(model, req.seq_id, snapshot,
                             on_dispatch=lambda: model.base.samplers.added(sampler_id))

    def _save(self, model: Model, kind: str, name: str | None, ttl: int | None, overwrite: bool,
              user_metadata: dict | None, write: Callable[[Path], None]) -> Callable[[], Result]:
        """The job writing checkpoint ``kind/name`` of ``model`` (atomically, then recorded)."""
        if not name or not _NAME_RE.match(name) or name in (".", ".."):
            raise ServiceError(400, f"checkpoint name {name!r} must be non-empty and use only "
                                    "letters, digits, '_', '-' and '.'")
        checkpoint_id = f"{kind}/{name}"
        if not overwrite and self.store.checkpoint(model.model_id, checkpoint_id):
            raise ServiceError(400, f"checkpoint {checkpoint_id!r} already exists for run "
                                    f"{model.model_id!r}; pass overwrite=True or another name")
        directory = self.data_dir / "checkpoints" / safe_name(model.tenant) \
            / safe_name(model.model_id) / kind / name
        path = f"tinker://{model.model_id}/{checkpoint_id}"
        base = model.base
        base.samplers.forget(f"ckpt:{path}")  # an overwritten sampler checkpoint loads afresh

        def job() -> Result:
            tmp = directory.with_name(directory.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write(tmp)
            shutil.rmtree(directory, ignore_errors=True)
            tmp.rename(directory)
            self.store.add_checkpoint(model.model_id, checkpoint_id, model.tenant, KINDS[kind],
                                      path, str(directory), _dir_size(directory), user_metadata,
                                      time.time() + ttl if ttl else None)
            response = {"weights": types.SaveWeightsResponse,
                        "sampler_weights": types.SaveWeightsForSamplerResponse,
                        "external_weights": types.SaveWeightsExternalResponse}[kind]
            return _json(response(path=path, type=_RESPONSE_TYPES[kind]))

        return job

    def _checkpoint(self, tenant: str, path: str, loadable: bool = True) -> tuple[dict, dict]:
        """The checkpoint row and its run's row; 404 unless ``tenant`` owns it."""
        run_id, kind, name = parse_tinker_path(path)
        ckpt = self.store.checkpoint(run_id, f"{kind}/{name}")
        if ckpt is None or ckpt["tenant"] != tenant:
            raise ServiceError(404, f"checkpoint {path!r} not found")
        if loadable and kind == "external_weights":
            raise ServiceError(400, f"{path!r} is an export for use elsewhere; load a weights/ or "
                                    "sampler_weights/ checkpoint instead")
        run = self.store.run(run_id)
        assert run is not None
        return ckpt, run

    def _checkpoint_weights(self, base: ServedModel, ckpt: dict, run: dict) -> str:
        """Register checkpoint ``ckpt`` as sampler weights of ``base``; returns their name."""
        name, directory, engine = f"ckpt:{ckpt['tinker_path']}", ckpt["directory"], base.engine

        def load() -> None:
            if ckpt["kind"] == "sampler":
                engine.load_sampler(name, directory)
                return
            tmp = f"tmp:{uuid.uuid4().hex}"  # a training state: load it, then snapshot it
            engine.create_model(tmp, _lora_spec(run["lora"]))
            try:
                engine.load_state(tmp, directory, optimizer=False)
                engine.snapshot_sampler(tmp, name)
            finally:
                engine.remove_model(tmp)

        base.samplers.register(name, load)
        return name

    def delete_checkpoint(self, tenant: str, run_id: str, checkpoint_id: str) -> None:
        ckpt = self.store.checkpoint(run_id, checkpoint_id)
        if ckpt is None or ckpt["tenant"] != tenant:
            raise ServiceError(404, f"checkpoint {checkpoint_id!r} of run {run_id!r} not found")
        self.store.delete_checkpoint(run_id, checkpoint_id)
        run = self.store.run(run_id)
        base = self._find_base(run["base_model"]) if run else None
        if base is not None:
            base.samplers.forget(f"ckpt:{ckpt['tinker_path']}")
        shutil.rmtree(ckpt["directory"], ignore_errors=True)

    def checkpoint_files(self, tenant: str, path: str) -> tuple[Path, list[str]]:
        """The directory of checkpoint ``path`` and its files (for signed download URLs)."""
        ckpt, _ = self._checkpoint(tenant, path, loadable=False)
        root = Path(ckpt["directory"])
        return root, sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())

    def export_peft(self, tenant: str, path: str, out_dir: str) -> EngineFuture[str]:
        """Write checkpoint ``path`` as a peft adapter directory on this machine."""
        ckpt, run = self._checkpoint(tenant, path)
        base = self._base(run["base_model"])
        name = self._checkpoint_weights(base, ckpt, run)
        base.samplers.use(name)
        return base.worker.call(lambda: base.engine.export_peft(name, out_dir) or out_dir)

    # --------------------------------------------------------------------- sampling
    async def create_sampling_session(self, tenant: str,
                                      req: types.CreateSamplingSessionRequest) -> str:
        self._session(tenant, req.session_id)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if sampler_id in self.samplers:  # a retry
            return sampler_id
        if req.model_path:
            ckpt, run = self._checkpoint(tenant, req.model_path)
            base = self._base(run["base_model"])
            weights = self._checkpoint_weights(base, ckpt, run)
            load = base.samplers.use(weights)
            if load is not None:
                try:  # surface a broken checkpoint here rather than in every sample
                    await load
                except Exception as exc:
                    base.samplers.forget(weights)
                    raise ServiceError(400, f"cannot load {req.model_path!r}: "
                                            f"{type(exc).__name__}: {exc}") from None
        else:
            base, weights = self._base(req.base_model), None
        self.samplers[sampler_id] = Sampler(sampler_id, tenant, req.session_id, base,
                                            req.model_path, weights)
        self.store.add_sampler(sampler_id, tenant, base.name, req.model_path)
        return sampler_id

    def get_sampler(self, tenant: str, sampler_id: str) -> types.GetSamplerResponse:
        sampler = self.samplers.get(sampler_id)
        if sampler is None or sampler.tenant != tenant:
            raise ServiceError(404, f"unknown sampler {sampler_id!r}")
        return types.GetSamplerResponse(sampler_id=sampler_id, base_model=sampler.base.name,
                                        model_path=sampler.model_path)

    def _sampler_for(self, tenant: str, req: types.SampleRequest) -> Sampler:
        if req.sampling_session_id is not None:
            sampler = self.samplers.get(req.sampling_session_id)
            if sampler is None or sampler.tenant != tenant:
                raise ServiceError(404, f"unknown sampling_session_id "
                                        f"{req.sampling_session_id!r}")
            if sampler.model_path and not sampler.base.samplers.known(sampler.weights or ""):
                ckpt, run = self._checkpoint(tenant, sampler.model_path)  # 404 once deleted
                self._checkpoint_weights(sampler.base, ckpt, run)  # e.g. after a restart
            return sampler
        if req.model_path:  # older SDKs sample straight from a path
            ckpt, run = self._checkpoint(tenant, req.model_path)
            base = self._base(run["base_model"])
            return Sampler("direct", tenant, "", base, req.model_path,
                           self._checkpoint_weights(base, ckpt, run))
        return Sampler("direct", tenant, "", self._base(req.base_model), None, None)

    def asample(self, tenant: str, req: types.SampleRequest) -> types.UntypedAPIFuture:
        sampler = self._sampler_for(tenant, req)
        base = sampler.base
        tokens, params = _check_sample_request(req, base)
        seq = req.seq_id if req.sampling_session_id and req.seq_id is not None \
            else uuid.uuid4().hex
        request_id = f"{sampler.sampler_id}:{seq}"
        future, new = self.futures.open(request_id, tenant)
        if new:
            if sampler.weights is not None:
                base.samplers.use(sampler.weights)
            engine_request = SampleRequest(prompt_tokens=tokens, num_samples=req.num_samples,
                                           params=params, adapter=sampler.weights,
                                           prompt_logprobs=bool(req.prompt_logprobs))
            last_n = req.prompt_logprobs_last_n

            def done(f: Any) -> None:
                try:
                    response = f.result()
                    if last_n is not None and response.prompt_logprobs is not None:
                        lp = list(response.prompt_logprobs)
                        lp[: len(lp) - last_n] = [None] * (len(lp) - last_n)
                        response = types.SampleResponse(sequences=response.sequences,
                                                        _prompt_logprobs_list=lp)
                    result = wire.PROTO_CONTENT_TYPE, wire.encode_sample_response(response)
                except BaseException as exc:  # noqa: BLE001 - becomes a failed future
                    result = describe(exc)
                self.futures.resolve(future, result)

            base.worker.sample(engine_request).future().add_done_callback(done)
        ids = [f"{request_id}:{i}" for i in range(req.num_samples)]
        return types.UntypedAPIFuture(request_id=request_id, sample_sequence_ids=ids)

    # --------------------------------------------------------------------- REST listings
    def list_runs(self, tenant: str, limit: int, offset: int) -> types.TrainingRunsResponse:
        runs = self.store.runs(tenant)
        return types.TrainingRunsResponse(
            training_runs=[self._run(r) for r in runs[offset: offset + limit]],
            cursor=types.Cursor(offset=offset, limit=limit, total_count=len(runs)))

    def get_run(self, tenant: str, run_id: str) -> types.TrainingRun:
        run = self.store.run(run_id)
        if run is None or run["tenant"] != tenant:
            raise ServiceError(404, f"unknown training run {run_id!r}")
        return self._run(run)

    def list_checkpoints(self, tenant: str, run_id: str | None, limit: int = 10**9,
                         offset: int = 0) -> types.CheckpointsListResponse:
        if run_id is not None:
            self.get_run(tenant, run_id)
        ckpts = self.store.checkpoints(tenant, run_id)
        return types.CheckpointsListResponse(
            checkpoints=[_checkpoint(c) for c in ckpts[offset: offset + limit]],
            cursor=types.Cursor(offset=offset, limit=min(limit, len(ckpts)),
                                total_count=len(ckpts)))

    def weights_info(self, tenant: str, path: str) -> types.WeightsInfoResponse:
        _, run = self._checkpoint(tenant, path, loadable=False)
        lora = run["lora"] or {}
        return types.WeightsInfoResponse(
            base_model=run["base_model"], is_lora=bool(lora), lora_rank=lora.get("rank"),
            train_unembed=lora.get("train_unembed"), train_mlp=lora.get("train_mlp"),
            train_attn=lora.get("train_attn"))

    def _run(self, run: dict) -> types.TrainingRun:
        last = {c["kind"]: _checkpoint(c)
                for c in self.store.checkpoints(run["tenant"], run["run_id"])}
        lora = run["lora"]
        return types.TrainingRun(
            training_run_id=run["run_id"], base_model=run["base_model"],
            model_owner=run["tenant"], is_lora=lora is not None,
            lora_rank=lora["rank"] if lora else None,
            last_request_time=_time(run["last_request"]),
            last_checkpoint=last.get("training"), last_sampler_checkpoint=last.get("sampler"),
            user_metadata=_str_dict(run["user_metadata"]))


# ------------------------------------------------------------------------- helpers
_RESPONSE_TYPES = {"weights": "save_weights", "sampler_weights": "save_weights_for_sampler",
                   "external_weights": "save_weights_external"}


def _check_sample_request(req: types.SampleRequest, base: ServedModel
                          ) -> tuple[list[int], types.SamplingParams]:
    """The prompt tokens and sampling params, or a 400 naming what is wrong."""
    tokens: list[int] = []
    for chunk in req.prompt.chunks:
        if chunk.type != "encoded_text":
            raise ServiceError(400, f"SampleRequest.prompt: chunk type {chunk.type!r} is not "
                                    "supported (encoded_text only)")
        tokens.extend(chunk.tokens)
    if not tokens:
        raise ServiceError(400, "SampleRequest.prompt is empty")
    bad = next((t for t in tokens if not 0 <= t < base.vocab_size), None)
    if bad is not None:
        raise ServiceError(400, f"SampleRequest.prompt has token id {bad}, outside the "
                                f"vocabulary [0, {base.vocab_size})")
    if not 1 <= req.num_samples <= 256:
        raise ServiceError(400, f"SampleRequest.num_samples must be in [1, 256], got "
                                f"{req.num_samples}")
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k",
                 "target_prompt_logprobs"):
        if getattr(req, name):
            raise ServiceError(400, f"SampleRequest.{name} is not supported by this server")
    params, ctx = req.sampling_params, base.max_context
    if params.max_tokens is None:
        params = params.model_copy(update={"max_tokens": min(256, (ctx or 10**9) - len(tokens))})
    if params.max_tokens < 1:
        raise ServiceError(400, f"SampleRequest.sampling_params.max_tokens must be >= 1, got "
                                f"{params.max_tokens}")
    if ctx and len(tokens) + params.max_tokens > ctx:
        raise ServiceError(400, f"SampleRequest: prompt ({len(tokens)} tokens) + max_tokens "
                                f"({params.max_tokens}) exceeds the context length {ctx}")
    last_n = req.prompt_logprobs_last_n
    if last_n is not None and not 1 <= last_n <= len(tokens) - 1:
        raise ServiceError(400, f"SampleRequest.prompt_logprobs_last_n must be in "
                                f"[1, {len(tokens) - 1}], got {last_n}")
    return tokens, params


def _lora_spec(lora: dict | None) -> LoraSpec | None:
    if lora is None:
        return None
    return LoraSpec(**{k: lora[k] for k in ("rank", "seed", "train_mlp", "train_attn",
                                            "train_unembed") if lora.get(k) is not None})


def _json(response: Any) -> Result:
    return JSON, response.model_dump_json().encode()


def _checkpoint(c: dict) -> types.Checkpoint:
    return types.Checkpoint(
        checkpoint_id=c["checkpoint_id"], checkpoint_type=c["kind"], time=_time(c["created"]),
        tinker_path=c["tinker_path"], size_bytes=c["size_bytes"],
        user_metadata=_str_dict(c["user_metadata"]),
        expires_at=_time(c["expires_at"]) if c["expires_at"] else None)


def _str_dict(d: dict | None) -> dict[str, str] | None:
    return {str(k): str(v) for k, v in d.items()} if d else None


def _time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
