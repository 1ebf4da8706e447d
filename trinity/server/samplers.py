"""Samplers: the weights each sampling session samples, and its sample requests.

A sampler names weights: an in-memory snapshot of a training model, a checkpoint, or the base
model; ``served.ResidentSamplers`` keeps the recently used ones in engine memory. Requests from
every client of one base model share the worker queue, so concurrent samples decode as one batch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from trinity.engine import SampleRequest
from trinity.server import wire
from trinity.server.checkpoints import Checkpoints, weights_name
from trinity.server.futures import Futures, ServiceError, describe
from trinity.server.served import ServedModel, find_model, require_model
from trinity.server.store import Store


@dataclass
class Sampler:
    sampler_id: str
    tenant: str
    session_id: str
    base: ServedModel
    model_path: str | None  # the tinker:// path it samples, None for base or snapshot
    weights: str | None  # a ResidentSamplers name; None = the base model
    freed: str | None = None  # why its in-memory snapshot is gone (its session finished)


class Samplers:
    def __init__(
        self, store: Store, futures: Futures, checkpoints: Checkpoints, models: list[ServedModel]
    ):
        self.store, self.futures, self.checkpoints, self.models = (
            store,
            futures,
            checkpoints,
            models,
        )
        self._samplers: dict[str, Sampler] = {}

    def restore(self) -> None:
        """The samplers a previous run of this data dir created."""
        for row in self.store.samplers():
            base = find_model(self.models, row["base_model"])
            if base is None:
                continue
            sampler_id, path = row["sampler_id"], row["model_path"]
            if path is None:  # the base model
                weights = None
            elif path.startswith("tinker://"):  # a checkpoint: loaded again on first use
                weights = weights_name(path)
            else:  # an in-memory snapshot, gone with the old process
                path, weights = None, sampler_id
            self._samplers[sampler_id] = Sampler(
                sampler_id, row["tenant"], sampler_id.split(":sample:")[0], base, path, weights
            )

    def finish(self, session_id: str, reason: str = "finished") -> None:
        """Free the snapshots of a finished session (after the work queued before)."""
        for sampler in self._samplers.values():
            if sampler.session_id == session_id and sampler.weights == sampler.sampler_id:
                sampler.base.samplers.forget(sampler.weights)
                sampler.freed = f"its session {session_id!r} is finished ({reason})"

    def add_snapshot(
        self, sampler_id: str, tenant: str, session_id: str, base: ServedModel, model_id: str
    ) -> None:
        """Sampler ``sampler_id`` of the session: a snapshot of ``model_id`` taken under its id."""
        if sampler_id not in self._samplers:
            self._samplers[sampler_id] = Sampler(
                sampler_id, tenant, session_id, base, None, sampler_id
            )
            self.store.add_sampler(sampler_id, tenant, base.name, f"snapshot:{model_id}")

    async def create(self, tenant: str, req: types.CreateSamplingSessionRequest) -> str:
        """Sampler ``req.sampling_session_seq_id`` of a live session of ``tenant``."""
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if sampler_id in self._samplers:  # a retry
            return sampler_id
        if req.model_path:
            ckpt, run = self.checkpoints.find(tenant, req.model_path)
            base = require_model(self.models, run["base_model"])
            weights = self.checkpoints.sampler_weights(base, ckpt, run)
            load = base.samplers.use(weights)
            if load is not None:
                try:  # surface a broken checkpoint here rather than in every sample
                    await load
                except Exception as exc:
                    base.samplers.forget(weights)
                    raise ServiceError(
                        400, f"cannot load {req.model_path!r}: {type(exc).__name__}: {exc}"
                    ) from None
        else:
            base, weights = require_model(self.models, req.base_model), None
        self._samplers[sampler_id] = Sampler(
            sampler_id, tenant, req.session_id, base, req.model_path, weights
        )
        self.store.add_sampler(sampler_id, tenant, base.name, req.model_path)
        return sampler_id

    def get(self, tenant: str, sampler_id: str) -> types.GetSamplerResponse:
        sampler = self._samplers.get(sampler_id)
        if sampler is None or sampler.tenant != tenant:
            raise ServiceError(404, f"unknown sampler {sampler_id!r}")
        return types.GetSamplerResponse(
            sampler_id=sampler_id, base_model=sampler.base.name, model_path=sampler.model_path
        )

    def _sampler_for(self, tenant: str, req: types.SampleRequest) -> Sampler:
        if req.sampling_session_id is not None:
            sampler = self._samplers.get(req.sampling_session_id)
            if sampler is None or sampler.tenant != tenant:
                raise ServiceError(404, f"unknown sampling_session_id {req.sampling_session_id!r}")
            if sampler.freed:
                raise ServiceError(
                    400,
                    f"sampler {sampler.sampler_id!r} sampled weights held in memory, freed because "
                    f"{sampler.freed}; sample from a saved checkpoint instead",
                )
            if sampler.model_path and not sampler.base.samplers.known(sampler.weights or ""):
                ckpt, run = self.checkpoints.find(tenant, sampler.model_path)  # 404 once deleted
                self.checkpoints.sampler_weights(sampler.base, ckpt, run)  # e.g. after a restart
            return sampler
        if req.model_path:  # older SDKs sample straight from a path
            ckpt, run = self.checkpoints.find(tenant, req.model_path)
            base = require_model(self.models, run["base_model"])
            return Sampler(
                "direct",
                tenant,
                "",
                base,
                req.model_path,
                self.checkpoints.sampler_weights(base, ckpt, run),
            )
        return Sampler("direct", tenant, "", require_model(self.models, req.base_model), None, None)

    def sample(self, tenant: str, req: types.SampleRequest) -> types.UntypedAPIFuture:
        """Queue ``req`` on its base model's worker; a retried ``seq_id`` finds its future."""
        sampler = self._sampler_for(tenant, req)
        base = sampler.base
        tokens, params = wire.check_sample_request(req, base.vocab_size, base.max_context)
        seq = req.seq_id if req.sampling_session_id and req.seq_id is not None else uuid.uuid4().hex
        request_id = f"{sampler.sampler_id}:{seq}"
        future, new = self.futures.open(request_id, tenant)
        if new:
            if sampler.weights is not None:
                base.samplers.use(sampler.weights)
            engine_request = SampleRequest(
                prompt_tokens=tokens,
                num_samples=req.num_samples,
                params=params,
                adapter=sampler.weights,
                prompt_logprobs=bool(req.prompt_logprobs),
                topk_prompt_logprobs=req.topk_prompt_logprobs,
                topk_sample_logprobs=req.topk_sample_logprobs,
                prompt_alt_tokens_k=req.prompt_alt_tokens_k,
            )
            last_n = req.prompt_logprobs_last_n

            def done(f: Any) -> None:
                try:
                    response = f.result()
                    if last_n is not None:
                        response = _last_n(response, last_n)
                    result = wire.PROTO_CONTENT_TYPE, wire.encode_sample_response(response)
                except BaseException as exc:  # noqa: BLE001 - becomes a failed future
                    result = describe(exc)
                self.futures.resolve(future, result)

            base.worker.sample(engine_request).future().add_done_callback(done)
        ids = [f"{request_id}:{i}" for i in range(req.num_samples)]
        return types.UntypedAPIFuture(request_id=request_id, sample_sequence_ids=ids)


def _last_n(response: types.SampleResponse, last_n: int) -> types.SampleResponse:
    """Only the last ``last_n`` prompt positions scored (``prompt_logprobs_last_n``)."""
    lp, topk = response.prompt_logprobs_np, response.topk_prompt_logprobs_np
    if lp is not None:
        lp = lp.copy()
        lp[: len(lp) - last_n] = np.nan
    if topk is not None:
        ids, lps = topk.token_ids.copy(), topk.logprobs.copy()
        ids[: len(ids) - last_n], lps[: len(lps) - last_n] = 0, MASK_LOGPROB
        topk = TopkLogprobs(token_ids=ids, logprobs=lps)
    return replace(response, prompt_logprobs_np=lp, topk_prompt_logprobs_np=topk)
