"""The SDK 0.38 / ``tinker`` CLI routes beyond training and sampling: sessions, TTLs, storage,
and a clear 400 for the hosted service's features that this server does not offer.

Each route the SDK can call gets an answer it can act on: Tinker's response type where the
feature exists here (session listing, checkpoint TTLs, checkpoint storage), otherwise a 400 whose
message names the feature (the SDK retries 408/409/429/5xx, so those would hang; a bare 404 or
405 reads like a broken server). ``NOT_OFFERED`` is the list; docs/tinker-compat.md the table.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from tinker import types

from trinity.server.futures import ServiceError
from trinity.server.service import Service

API = "/api/v1"
_CKPT = "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}"

# (method, path, the hosted service's feature there, what to do instead)
NOT_OFFERED: list[tuple[str, str, str, str]] = [
    ("POST", f"{_CKPT}/publish", "publishing checkpoints", "they stay private to their API key"),
    ("DELETE", f"{_CKPT}/publish", "publishing checkpoints", "they stay private to their API key"),
    ("PUT", "/sessions/{session_id}/project", "projects", ""),
    ("POST", "/sessions/search", "session search", "list_sessions and get_session work"),
    ("GET", "/sessions/{session_id}/trace_export", "trace export", ""),
    ("POST", "/copy_weights", "copying checkpoints between projects", ""),
    ("GET", "/audit", "the audit log", ""),
    ("GET", "/billing/usage/events", "usage billing", "nothing is billed"),
    ("POST", "/auth/token", "JWT exchange", "client config sets pjwt_auth_enabled=false"),
    ("GET", "/auth/apikey/me", "API key management", "keys come from --api-key"),
    ("DELETE", "/auth/apikey/me", "API key management", "keys come from --api-key"),
    ("POST", "/join_sampling_session", "joining sampling sessions", "its client flag is off"),
    ("POST", "/retrieve_futures", "batched future retrieval", "its client flag is off"),
    ("POST", "/cancel_future", "cancelling requests", "its client flag is off"),
    ("POST", "/create_custom_loss", "server-side custom losses", "forward_backward_custom works"),
]


def add_routes(app: FastAPI, service: Service, auth: Callable[[Request], str]) -> None:
    """Register before the app's own ``checkpoints/{id:path}`` routes, which would otherwise
    take ``.../publish`` and ``.../ttl`` as part of a checkpoint id."""

    @app.put(f"{API}{_CKPT}/ttl")
    async def set_checkpoint_ttl(run_id: str, checkpoint_id: str, request: Request) -> dict:
        tenant = auth(request)
        try:
            data = await request.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or "ttl_seconds" not in data:
            raise ServiceError(400, "set checkpoint TTL: body must be {'ttl_seconds': int | null}")
        service.ttl.set(tenant, run_id, checkpoint_id, data["ttl_seconds"])
        return {}

    @app.get(f"{API}/sessions")
    async def list_sessions(request: Request, limit: int = 20, offset: int = 0) -> JSONResponse:
        tenant = auth(request)
        ids = [row["session_id"] for row in _sessions(service, tenant)]
        page = types.ListSessionsResponse(sessions=ids[offset : offset + limit])
        return JSONResponse(page.model_dump(mode="json"))

    @app.get(f"{API}/sessions/{{session_id}}")
    async def get_session(session_id: str, request: Request) -> JSONResponse:
        tenant = auth(request)
        row = next((r for r in _sessions(service, tenant) if r["session_id"] == session_id), None)
        if row is None:
            raise ServiceError(404, f"unknown session {session_id!r}")
        meta = row["meta"] or {}
        samplers = [
            s["sampler_id"]
            for s in service.store.samplers()
            if s["tenant"] == tenant and s["sampler_id"].startswith(f"{session_id}:sample:")
        ]
        response = types.GetSessionResponse(
            training_run_ids=[
                r["run_id"] for r in service.store.runs(tenant) if r["session_id"] == session_id
            ],
            sampler_ids=samplers,
            user_metadata={str(k): str(v) for k, v in (meta.get("user_metadata") or {}).items()}
            or None,
            display_name=meta.get("display_name"),
        )
        return JSONResponse(response.model_dump(mode="json"))

    @app.get(f"{API}/billing/usage/checkpoints/current")
    async def checkpoint_storage(request: Request) -> JSONResponse:
        """The caller's checkpoints, counted and sized (no cost: nothing is billed here)."""
        tenant = auth(request)
        ckpts = service.store.checkpoints(tenant)
        size = sum(c["size_bytes"] or 0 for c in ckpts)
        item = types.CurrentCheckpointStorageUsageItem(
            org_user_urn=tenant,
            checkpoint_count=len(ckpts),
            size_bytes=size,
            size_gigabytes=size / 1e9,
        )
        response = types.CurrentCheckpointStorageUsageResponse(data=[item])
        return JSONResponse(response.model_dump(mode="json"))

    for method, path, feature, hint in NOT_OFFERED:
        _refuse(app, method, path, feature, hint, auth)


def _refuse(
    app: FastAPI, method: str, path: str, feature: str, hint: str, auth: Callable[[Request], str]
) -> None:
    async def endpoint(request: Request) -> JSONResponse:
        auth(request)
        raise ServiceError(
            400,
            f"{request.method} {request.url.path}: {feature} is not offered by trinity server"
            + (f" ({hint})" if hint else ""),
        )

    endpoint.__name__ = f"not_offered_{method}_{path}"
    app.add_api_route(f"{API}{path}", endpoint, methods=[method])


def _sessions(service: Service, tenant: str) -> list[dict]:
    """The tenant's sessions, newest first."""
    rows = [r for r in service.store.sessions() if r["tenant"] == tenant]
    return sorted(rows, key=lambda r: (-r["created"], r["session_id"]))
