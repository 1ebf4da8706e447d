"""FastAPI routes of the Tinker wire protocol (SDK 0.38), mapped onto ``Service``.

Request bodies are parsed with the SDK's own pydantic request types and answers are built from its
response types, so a field the SDK would not send is a 400 naming it. Every error body is JSON
with a one-line ``detail`` (an empty 400 is read by the SDK as a proxy hiccup and retried).
``/forward_backward`` is protobuf in; ``ForwardBackwardOutput`` and ``SampleResponse`` results
are protobuf out (``wire.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from tinker import types
from tinker.types.try_again_response import TryAgainResponse

from trinity.server import control_plane, wire
from trinity.server.futures import ServiceError
from trinity.server.limits import parse_json, read_body
from trinity.server.served import safe_name
from trinity.server.service import Service

log = logging.getLogger("trinity.server")
API = "/api/v1"
URL_TTL_S = 3600


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def janitor() -> None:  # drop results delivered long ago
            while True:
                await asyncio.sleep(60)
                service.futures.purge()

        async def expire_held() -> None:  # commands whose seq_id gap never filled
            while True:
                await asyncio.sleep(min(5.0, service.limits.held_timeout_s / 4))
                service.training.expire_held()

        async def reaper() -> None:  # idle sessions, expired checkpoints
            while True:
                await asyncio.sleep(service.idle.check_every_s)
                try:
                    service.reap()
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.exception("reaper failed")

        tasks = [janitor(), expire_held(), reaper()]
        tasks = [asyncio.create_task(task) for task in tasks]
        yield
        for task in tasks:
            task.cancel()

    app = FastAPI(title="trinity server (Tinker-compatible)", lifespan=lifespan)
    url_key = secrets.token_bytes(32)  # signs checkpoint download URLs; valid for this process

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": f"{request.url.path}: {_problems(exc.errors())}"}, status_code=400
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            {"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500
        )

    def auth(request: Request) -> str:
        return service.authenticate(request.headers.get("x-api-key"))

    async def body(request: Request, model: type[pydantic.BaseModel] | None = None) -> Any:
        data = parse_json(await read_body(request, service.limits), request.url.path)
        if model is None:
            return data if isinstance(data, dict) else {}
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            raise ServiceError(
                400, f"invalid {model.__name__}: {_problems(exc.errors())}"
            ) from None

    def out(response: pydantic.BaseModel) -> JSONResponse:
        return JSONResponse(response.model_dump(mode="json"))

    def one_call(path: str, request_type: type[pydantic.BaseModel], call: Callable) -> None:
        """POST ``path``: one typed JSON request -> one service call for the caller's tenant."""

        async def endpoint(request: Request) -> Response:
            tenant = auth(request)
            data = parse_json(await read_body(request, service.limits), request.url.path)
            try:
                req = request_type.model_validate(data)
            except pydantic.ValidationError as exc:
                error = ServiceError(
                    400, f"invalid {request_type.__name__}: {_problems(exc.errors())}"
                )
                service.training.refuse(tenant, data, error)  # a training command's seq_id
                raise error from None
            return out(call(tenant, req))

        endpoint.__name__ = path  # FastAPI's operation id
        app.post(f"{API}/{path}")(endpoint)

    control_plane.add_routes(app, service, auth)
    for path, request_type, call in (
        ("create_model", types.CreateModelRequest, service.create_model),
        ("optim_step", types.OptimStepRequest, service.optim_step),
        ("load_weights", types.LoadWeightsRequest, service.load_weights),
        ("save_weights", types.SaveWeightsRequest, service.save_weights),
        (
            "save_weights_for_sampler",
            types.SaveWeightsForSamplerRequest,
            service.save_weights_for_sampler,
        ),
        ("save_weights_external", types.SaveWeightsExternalRequest, service.save_weights_external),
        ("asample", types.SampleRequest, service.samplers.sample),
    ):
        one_call(path, request_type, call)

    # --------------------------------------------------------------------- sessions
    @app.get(f"{API}/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get(f"{API}/trinity/extensions")
    async def extensions() -> dict:
        """What this server adds to the Tinker API, for clients to find out (no secrets)."""
        return {"return_entropy": True}

    @app.post(f"{API}/client/config")
    async def client_config(request: Request) -> dict:
        auth(request)
        return service.client_config

    @app.post(f"{API}/client/dynamic_config")
    async def dynamic_config(request: Request) -> dict:
        auth(request)
        return {}

    @app.post(f"{API}/telemetry")
    async def telemetry(request: Request) -> dict:
        auth(request)
        return {"status": "accepted"}

    @app.post(f"{API}/create_session")
    async def create_session(request: Request) -> Response:
        t = auth(request)
        session_id = service.create_session(t, await body(request, types.CreateSessionRequest))
        return out(types.CreateSessionResponse(session_id=session_id))

    @app.post(f"{API}/session_heartbeat")
    async def session_heartbeat(request: Request) -> Response:
        t = auth(request)
        req = await body(request, types.SessionHeartbeatRequest)
        service.heartbeat(t, req.session_id)
        return out(types.SessionHeartbeatResponse())

    @app.post(f"{API}/sessions/{{session_id}}/finish")
    async def finish_session(session_id: str, request: Request) -> dict:
        t = auth(request)
        reason = (await body(request)).get("reason")
        status = reason.get("type") if isinstance(reason, dict) else None
        service.finish_session(t, session_id, str(status or "success"))
        return {}

    @app.get(f"{API}/get_server_capabilities")
    async def capabilities(request: Request) -> Response:
        auth(request)
        return out(service.capabilities())

    # --------------------------------------------------------------------- training
    @app.post(f"{API}/get_info")
    async def get_info(request: Request) -> Response:
        t = auth(request)
        return out(service.training.info(t, (await body(request, types.GetInfoRequest)).model_id))

    @app.post(f"{API}/forward_backward")
    async def forward_backward(request: Request) -> Response:
        t = auth(request)
        ctype = request.headers.get("content-type", "")
        if "protobuf" not in ctype:
            raise ServiceError(
                415,
                f"/forward_backward takes {wire.PROTO_CONTENT_TYPE} (what SDK "
                f">= 0.25 sends), got content-type {ctype!r}",
            )
        raw = await read_body(request, service.limits)
        req = wire.decode_forward_backward(raw, service.limits.max_decoded_bytes)
        return out(service.forward_backward(t, req))

    @app.post(f"{API}/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        t = auth(request)
        req = await body(request, types.FutureRetrieveRequest)
        result = await service.futures.retrieve(t, req.request_id)
        if result is None:  # 408: the SDK polls again without logging a warning (200 would)
            pending = TryAgainResponse(request_id=req.request_id, queue_state="active")
            return JSONResponse(pending.model_dump(mode="json"), status_code=408)
        content_type, payload = result
        return Response(content=payload, media_type=content_type)

    # --------------------------------------------------------------------- sampling
    @app.post(f"{API}/create_sampling_session")
    async def create_sampling_session(request: Request) -> Response:
        t = auth(request)
        req = await body(request, types.CreateSamplingSessionRequest)
        sampler_id = await service.create_sampling_session(t, req)
        return out(types.CreateSamplingSessionResponse(sampling_session_id=sampler_id))

    @app.get(f"{API}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str, request: Request) -> Response:
        return out(service.samplers.get(auth(request), sampler_id))

    # --------------------------------------------------------------------- runs, checkpoints
    @app.get(f"{API}/training_runs")
    async def list_training_runs(request: Request, limit: int = 20, offset: int = 0) -> Response:
        return out(service.checkpoints.list_runs(auth(request), limit, offset))

    @app.get(f"{API}/training_runs/{{run_id}}")
    async def get_training_run(run_id: str, request: Request) -> Response:
        return out(service.checkpoints.get_run(auth(request), run_id))

    @app.get(f"{API}/training_runs/{{run_id}}/checkpoints")
    async def list_checkpoints(run_id: str, request: Request) -> Response:
        return out(service.checkpoints.list_checkpoints(auth(request), run_id))

    @app.delete(f"{API}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}")
    async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request) -> dict:
        service.checkpoints.delete(auth(request), run_id, checkpoint_id)
        return {}

    @app.get(f"{API}/checkpoints")
    async def list_user_checkpoints(
        request: Request, limit: int = 100, offset: int = 0
    ) -> Response:
        return out(service.checkpoints.list_checkpoints(auth(request), None, limit, offset))

    @app.post(f"{API}/weights_info")
    async def weights_info(request: Request) -> Response:
        t = auth(request)
        path = (await body(request)).get("tinker_path")
        if not isinstance(path, str):
            raise ServiceError(400, "/weights_info needs a string tinker_path")
        return out(service.checkpoints.weights_info(t, path))

    @app.get(
        f"{API}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}/external_weights_urls"
    )
    async def external_weights_urls(run_id: str, checkpoint_id: str, request: Request) -> Response:
        """Download URLs for every file of a checkpoint, signed so a plain GET fetches them.

        The SDK asks this for ``external_weights/`` exports; any checkpoint kind works.
        """
        t = auth(request)
        path = f"tinker://{run_id}/{checkpoint_id}"
        _, files = service.checkpoints.files(t, path)
        expires = int(time.time()) + URL_TTL_S
        base = str(request.base_url).rstrip("/")
        urls = {}
        for name in files:
            query = {"tenant": t, "path": path, "file": name, "expires": expires}
            query["sig"] = _sign(url_key, query)
            urls[name] = f"{base}{API}/trinity/checkpoint_file?{urllib.parse.urlencode(query)}"
        return out(
            types.ExternalWeightsUrlsResponse(
                urls=urls, expires=datetime.fromtimestamp(expires, tz=UTC)
            )
        )

    @app.get(f"{API}/trinity/checkpoint_file")
    async def checkpoint_file(
        tenant: str, path: str, file: str, expires: int, sig: str
    ) -> Response:
        query = {"tenant": tenant, "path": path, "file": file, "expires": expires}
        valid = hmac.compare_digest(sig.encode(), _sign(url_key, query).encode())
        if not valid or expires < time.time():
            raise ServiceError(403, "download URL is invalid or expired; ask for a new one")
        root, files = service.checkpoints.files(tenant, path)
        if file not in files:
            raise ServiceError(404, f"{path!r} has no file {file!r}")
        return FileResponse(root / file)

    # --------------------------------------------------------------------- trinity extensions
    @app.post(f"{API}/trinity/export_peft")
    async def export_peft(request: Request) -> dict:
        """Write a checkpoint as a peft adapter directory on the server's disk, at ``directory``
        relative to the caller's own space ``<data_dir>/exports/<user>/`` (the answer says
        where); the signed download URLs are the way to get the files elsewhere."""
        t = auth(request)
        data = await body(request)
        path, directory = data.get("tinker_path"), data.get("directory")
        if not isinstance(path, str) or not isinstance(directory, str):
            raise ServiceError(400, "/trinity/export_peft needs string tinker_path and directory")
        root = service.data_dir / "exports" / safe_name(t)
        out_dir = wire.confined_dir(root, directory)
        try:
            return {"directory": await service.export_peft(t, path, str(out_dir))}
        except OSError as exc:
            raise ServiceError(400, f"cannot write {directory!r}: {exc.strerror or exc}") from None

    return app


def _problems(errors: Any) -> str:
    """Pydantic's error list as one line: ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)


def _sign(key: bytes, query: dict) -> str:
    message = "\n".join(f"{k}={query[k]}" for k in ("tenant", "path", "file", "expires"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
