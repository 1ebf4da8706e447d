"""The live training models: created, found per tenant, restored after a restart, removed.

Model ids are ``{session}:train:{n}`` (the SDK derives them client-side). Each model's commands
go through its ``CommandLog``. A graceful shutdown saves every live model with its optimizer
state and next ``seq_id`` under ``autosave/``; its next request restores it, so a client that
kept running continues where it was. After a crash, clients continue from a checkpoint.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinker import types

from trinity.engine.worker import EngineFuture
from trinity.server.command_log import CommandLog, Job
from trinity.server.futures import Futures, Result, ServiceError
from trinity.server.limits import Limits
from trinity.server.served import ServedModel, lora_spec, require_model, safe_name
from trinity.server.store import Store


@dataclass
class Model:
    model_id: str
    tenant: str
    session_id: str
    base: ServedModel
    lora: dict | None  # a LoraConfig dump; None = full fine-tuning
    commands: CommandLog


class TrainingModels:
    def __init__(
        self,
        store: Store,
        futures: Futures,
        models: list[ServedModel],
        autosave_dir: Path,
        live_session: Callable[[str, str], object],
        limits: Limits | None = None,
    ):
        """``live_session(tenant, session_id)`` raises unless that session may still work;
        ``limits`` bounds the commands held for a ``seq_id`` gap."""
        self.store, self.futures, self.models = store, futures, models
        self.autosave_dir, self.live_session = autosave_dir, live_session
        self.limits = limits or Limits()
        self._live: dict[str, Model] = {}
        self._held: Counter[str] = Counter()  # commands waiting for a gap, per tenant

    def open(
        self,
        tenant: str,
        session_id: str,
        model_seq_id: int,
        base: ServedModel,
        lora: dict | None,
        user_metadata: dict | None,
        action: str,
        then: Callable[[str], Result],
    ) -> types.UntypedAPIFuture:
        """Model ``<session>:train:<seq>``, registered once per request id (a retried request
        finds its future); the worker creates it in the engine, then ``then(model_id)`` answers."""
        model_id = f"{session_id}:train:{model_seq_id}"
        future, new = self.futures.open(f"{model_id}:{action}", tenant)
        if new:
            self._add(model_id, tenant, session_id, base, lora)
            self.store.add_run(model_id, tenant, session_id, base.name, lora, user_metadata)

            def create() -> Result:
                base.engine.create_model(model_id, lora_spec(lora))
                return then(model_id)

            self.futures.run(future, base.worker, create)
        return types.UntypedAPIFuture(request_id=future.request_id, model_id=model_id)

    def _add(
        self,
        model_id: str,
        tenant: str,
        session_id: str,
        base: ServedModel,
        lora: dict | None,
        next_seq: int = 1,
    ) -> Model:
        """A live model whose commands run on its base model's worker."""
        commands = CommandLog(
            model_id,
            tenant,
            self.futures,
            lambda future, job: self.futures.run(future, base.worker, job),
            next_seq,
            held_timeout_s=self.limits.held_timeout_s,
            max_held=self.limits.max_held_per_tenant,
            held=self._held,
        )
        model = self._live[model_id] = Model(model_id, tenant, session_id, base, lora, commands)
        return model

    def get(self, tenant: str, model_id: str) -> Model:
        """A live model of ``tenant``; one saved at the last graceful shutdown is restored."""
        model = self._live.get(model_id)
        if model is not None and model.tenant == tenant:
            self.live_session(tenant, model.session_id)
            return model
        run = self.store.run(model_id)
        if run is None or run["tenant"] != tenant:
            raise ServiceError(404, f"unknown model_id {model_id!r}")
        self.live_session(tenant, run["session_id"])  # a finished or expired session says so
        if not run["autosave"]:
            raise ServiceError(
                400,
                f"model {model_id!r} is no longer loaded (its session "
                "finished or the server restarted); continue from a "
                "checkpoint with create_training_client_from_state",
            )
        base = require_model(self.models, run["base_model"])
        model = self._add(
            model_id, tenant, run["session_id"], base, run["lora"], int(run["next_seq"] or 1)
        )
        self.store.set_autosave(model_id, None, None)
        directory, lora = run["autosave"], lora_spec(run["lora"])

        def restore() -> None:  # FIFO worker: runs before the command that triggered it
            base.engine.create_model(model_id, lora)
            base.engine.load_state(model_id, directory, optimizer=True)

        base.worker.call(restore)
        return model

    def submit(
        self,
        model: Model,
        seq_id: int | None,
        prepare: Callable[[], Job],
        on_dispatch: Callable[[], None] | None = None,
    ) -> types.UntypedAPIFuture:
        """Command ``seq_id`` of ``model`` (see ``CommandLog.submit``)."""
        future = model.commands.submit(seq_id, prepare, on_dispatch)
        self.store.touch_run(model.model_id)
        return types.UntypedAPIFuture(request_id=future.request_id, model_id=model.model_id)

    def refuse(self, tenant: str, data: object, error: ServiceError) -> None:
        """A training command whose body did not validate still uses up its ``seq_id`` when
        its ``model_id`` and ``seq_id`` can be read, so the client's next commands run."""
        if not isinstance(data, dict):
            return
        model_id, seq_id = data.get("model_id"), data.get("seq_id")
        if not isinstance(model_id, str) or type(seq_id) is not int or seq_id <= 0:
            return
        try:
            model = self.get(tenant, model_id)
        except ServiceError:
            return

        def prepare() -> Job:
            raise error

        try:
            self.submit(model, seq_id, prepare)
        except ServiceError:
            pass  # the caller raises ``error`` itself

    def expire_held(self) -> int:
        """Fail commands that waited too long for a gap (``CommandLog.expire``); how many."""
        return sum(m.commands.expire() for m in list(self._live.values()))

    def info(self, tenant: str, model_id: str) -> types.GetInfoResponse:
        """A live model's or a past run's base model and LoRA config."""
        model = self._live.get(model_id)
        if model is not None and model.tenant == tenant:
            base, lora = model.base, model.lora
        else:
            run = self.store.run(model_id)
            if run is None or run["tenant"] != tenant:
                raise ServiceError(404, f"unknown model_id {model_id!r}")
            base, lora = require_model(self.models, run["base_model"]), run["lora"]
        # tokenizer_id is the model directory: the SDK's get_tokenizer then needs no hub access.
        data = types.ModelData(
            arch=getattr(base.engine, "arch", None),
            model_name=base.name,
            tokenizer_id=str(base.path),
        )
        return types.GetInfoResponse(
            type="get_info",
            model_id=model_id,
            model_data=data,
            model_name=base.name,
            is_lora=lora is not None,
            lora_rank=lora["rank"] if lora else None,
        )

    def finish(self, session_id: str) -> None:
        """Remove the session's models from their engines, after the work queued before."""
        for model in [m for m in self._live.values() if m.session_id == session_id]:
            del self._live[model.model_id]
            model.base.worker.call(model.base.engine.remove_model, model.model_id)

    def autosave(self) -> list[EngineFuture[None]]:
        """Queue a save of every live model for the next start; the jobs to wait for."""
        return [m.base.worker.call(self._autosave, m) for m in self._live.values()]

    def _autosave(self, model: Model) -> None:
        directory = self.autosave_dir / safe_name(model.model_id)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        model.base.engine.save_state(model.model_id, str(directory), optimizer=True)
        self.store.set_autosave(model.model_id, str(directory), model.commands.next_seq)
