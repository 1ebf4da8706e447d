"""Checkpoints: the directory and the SQLite row behind each ``tinker://RUN/KIND/NAME`` path.

A checkpoint is written into a temporary directory renamed into place, and recorded (size, TTL)
only then, so a listed checkpoint is always complete; an overwrite writes its new copy beside the
old one and switches the row before removing the old copy (``write_beside``). Lookups answer 404 unless the tenant owns
it. For sampling (and export) a checkpoint becomes sampler weights named ``ckpt:PATH`` in
``served.ResidentSamplers``: loaded on first use, evicted like any other. The REST listings of
runs and checkpoints read the same rows.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tinker import types

from trinity.server import wire
from trinity.server.command_log import Job
from trinity.server.futures import Result, ServiceError, json_result
from trinity.server.served import ServedModel, lora_spec, safe_name
from trinity.server.store import Store
from trinity.server.training import Model

_RESPONSES = {
    "weights": (types.SaveWeightsResponse, "save_weights"),
    "sampler_weights": (types.SaveWeightsForSamplerResponse, "save_weights_for_sampler"),
    "external_weights": (types.SaveWeightsExternalResponse, "save_weights_external"),
}


def stored_directory(state_dir: Path, ref: str) -> Path | None:
    """The directory of checkpoint ``ref`` (``tinker://...``) in the store of a server whose state
    directory is ``state_dir`` (read-only, no server running); None when it is not there."""
    database = Path(state_dir) / "server.sqlite"
    if not database.is_file():
        return None
    run_id, kind, name = wire.parse_tinker_path(ref)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT directory FROM checkpoints WHERE run_id = ? AND checkpoint_id = ?",
            (run_id, f"{kind}/{name}"),
        ).fetchone()
    return Path(row[0]) if row is not None and Path(row[0]).is_dir() else None


def weights_name(path: str) -> str:
    """The ``ResidentSamplers`` name of checkpoint ``path``'s weights."""
    return f"ckpt:{path}"


class Checkpoints:
    def __init__(self, store: Store, root: Path, models: list[ServedModel]):
        self.store, self.root, self.models = store, root, models

    def writer(
        self,
        model: Model,
        kind: str,
        name: str | None,
        ttl: int | None,
        overwrite: bool,
        user_metadata: dict | None,
        write: Callable[[Path], None],
    ) -> Job:
        """The job writing checkpoint ``kind/name`` of ``model`` with ``write(directory)``."""
        run_id, tenant, base = model.model_id, model.tenant, model.base
        name = wire.check_checkpoint_name(name)
        ttl = wire.check_ttl(ttl)
        checkpoint_id = f"{kind}/{name}"
        exists = self.store.checkpoint(run_id, checkpoint_id) is not None
        wire.check_new_checkpoint(checkpoint_id, run_id, overwrite, exists)
        directory = self.root / safe_name(tenant) / safe_name(run_id) / kind / name
        path = f"tinker://{run_id}/{checkpoint_id}"
        base.samplers.forget(weights_name(path))  # an overwritten checkpoint loads afresh

        def job() -> Result:
            written = write_beside(directory, write)
            old = self.store.checkpoint(run_id, checkpoint_id)
            self.store.add_checkpoint(  # the switch: one SQLite write, old or new, never neither
                run_id,
                checkpoint_id,
                tenant,
                wire.KINDS[kind],
                path,
                str(written),
                _dir_size(written),
                user_metadata,
                time.time() + ttl if ttl else None,
            )
            if old is not None and Path(old["directory"]) != written:
                shutil.rmtree(old["directory"], ignore_errors=True)
            response, response_type = _RESPONSES[kind]
            return json_result(response(path=path, type=response_type))

        return job

    def remove_orphans(self) -> list[Path]:
        """At startup: the copies a kill left mid-overwrite (``NAME@<hex>[.partial]`` that no row
        points at); never run next to a live server, which may be writing one."""
        rows = {Path(d).resolve() for d in self.store.checkpoint_dirs()}
        found = self.root.glob("*/*/*/*@*")
        orphans = [d for d in found if d.is_dir() and d.resolve() not in rows]
        for directory in orphans:
            shutil.rmtree(directory, ignore_errors=True)
        return orphans

    def find(self, tenant: str, path: str, loadable: bool = True) -> tuple[dict, dict]:
        """The checkpoint row and its run's row; 404 unless ``tenant`` owns it."""
        run_id, kind, name = wire.parse_tinker_path(path)
        ckpt = self.store.checkpoint(run_id, f"{kind}/{name}")
        if ckpt is None or ckpt["tenant"] != tenant:
            raise ServiceError(404, f"checkpoint {path!r} not found")
        if loadable:
            wire.check_loadable(path, kind)
        run = self.store.run(run_id)
        assert run is not None
        return ckpt, run

    def sampler_weights(self, base: ServedModel, ckpt: dict, run: dict) -> str:
        """Register checkpoint ``ckpt`` as sampler weights of ``base``; returns their name."""
        name, directory, engine = weights_name(ckpt["tinker_path"]), ckpt["directory"], base.engine

        def load() -> None:
            if ckpt["kind"] == "sampler":
                engine.load_sampler(name, directory)
                return
            tmp = f"tmp:{uuid.uuid4().hex}"  # a training state: load it, then snapshot it
            engine.create_model(tmp, lora_spec(run["lora"]))
            try:
                engine.load_state(tmp, directory, optimizer=False)
                engine.snapshot_sampler(tmp, name)
            finally:
                engine.remove_model(tmp)

        base.samplers.register(name, load)
        return name

    def delete(self, tenant: str, run_id: str, checkpoint_id: str) -> None:
        ckpt = self.store.checkpoint(run_id, checkpoint_id)
        if ckpt is None or ckpt["tenant"] != tenant:
            raise ServiceError(404, f"checkpoint {checkpoint_id!r} of run {run_id!r} not found")
        self.remove(ckpt)

    def remove(self, ckpt: dict) -> None:
        """Forget checkpoint row ``ckpt`` and delete its files."""
        self.store.delete_checkpoint(ckpt["run_id"], ckpt["checkpoint_id"])
        for model in self.models:  # only the run's base model can hold the weights
            model.samplers.forget(weights_name(ckpt["tinker_path"]))
        shutil.rmtree(ckpt["directory"], ignore_errors=True)

    def files(self, tenant: str, path: str) -> tuple[Path, list[str]]:
        """The directory of checkpoint ``path`` and its files (for signed download URLs)."""
        ckpt, _ = self.find(tenant, path, loadable=False)
        root = Path(ckpt["directory"])
        return root, sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())

    # --------------------------------------------------------------------- REST listings
    def list_runs(self, tenant: str, limit: int, offset: int) -> types.TrainingRunsResponse:
        runs = self.store.runs(tenant)
        return types.TrainingRunsResponse(
            training_runs=[self._run(r) for r in runs[offset : offset + limit]],
            cursor=types.Cursor(offset=offset, limit=limit, total_count=len(runs)),
        )

    def get_run(self, tenant: str, run_id: str) -> types.TrainingRun:
        run = self.store.run(run_id)
        if run is None or run["tenant"] != tenant:
            raise ServiceError(404, f"unknown training run {run_id!r}")
        return self._run(run)

    def list_checkpoints(
        self, tenant: str, run_id: str | None, limit: int = 10**9, offset: int = 0
    ) -> types.CheckpointsListResponse:
        if run_id is not None:
            self.get_run(tenant, run_id)
        ckpts = self.store.checkpoints(tenant, run_id)
        return types.CheckpointsListResponse(
            checkpoints=[_checkpoint(c) for c in ckpts[offset : offset + limit]],
            cursor=types.Cursor(
                offset=offset, limit=min(limit, len(ckpts)), total_count=len(ckpts)
            ),
        )

    def weights_info(self, tenant: str, path: str) -> types.WeightsInfoResponse:
        _, run = self.find(tenant, path, loadable=False)
        lora = run["lora"] or {}
        return types.WeightsInfoResponse(
            base_model=run["base_model"],
            is_lora=bool(lora),
            lora_rank=lora.get("rank"),
            train_unembed=lora.get("train_unembed"),
            train_mlp=lora.get("train_mlp"),
            train_attn=lora.get("train_attn"),
        )

    def _run(self, run: dict) -> types.TrainingRun:
        last = {
            c["kind"]: _checkpoint(c) for c in self.store.checkpoints(run["tenant"], run["run_id"])
        }
        lora = run["lora"]
        return types.TrainingRun(
            training_run_id=run["run_id"],
            base_model=run["base_model"],
            model_owner=run["tenant"],
            is_lora=lora is not None,
            lora_rank=lora["rank"] if lora else None,
            last_request_time=_time(run["last_request"]),
            last_checkpoint=last.get("training"),
            last_sampler_checkpoint=last.get("sampler"),
            user_metadata=_str_dict(run["user_metadata"]),
        )


def _checkpoint(c: dict) -> types.Checkpoint:
    return types.Checkpoint(
        checkpoint_id=c["checkpoint_id"],
        checkpoint_type=c["kind"],
        time=_time(c["created"]),
        tinker_path=c["tinker_path"],
        size_bytes=c["size_bytes"],
        user_metadata=_str_dict(c["user_metadata"]),
        expires_at=_time(c["expires_at"]) if c["expires_at"] else None,
    )


def _str_dict(d: dict | None) -> dict[str, str] | None:
    return {str(k): str(v) for k, v in d.items()} if d else None


def _time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def write_beside(directory: Path, write: Callable[[Path], None]) -> Path:
    """A complete new copy written next to ``directory``, never over the one a row points to:
    ``directory`` itself the first time, ``NAME@<hex>`` when that exists (an overwrite). The
    caller switches the row to it and only then removes the old copy, so a kill at any point
    leaves the row on a complete directory ('@' is not allowed in names: no collision)."""
    token = uuid.uuid4().hex[:12]
    partial = directory.with_name(f"{directory.name}@{token}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir()
    try:
        write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    final = (
        directory if not directory.exists() else directory.with_name(f"{directory.name}@{token}")
    )
    partial.rename(final)
    return final


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
