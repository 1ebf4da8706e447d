"""The studio's HTTP app: a JSON API over the runs under one root, and the page that uses it.

The page (``static/``) polls the API, so a running run's curves move without websockets; the
charting library (uPlot, MIT) is vendored in ``static/vendor`` so the studio works offline. Every
problem is a JSON ``{"error": one line}`` with a 4xx status that the page shows; nothing a request
sends (a bad run id, a broken config, a corrupt file) stops the server.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from trinity.config import ConfigError, load_config_text, to_yaml
from trinity.monitor.rollouts import RolloutStoreError
from trinity.studio import runs as run_files
from trinity.studio.runs import StudioError

STATIC = Path(__file__).parent / "static"
PASTED = "pasted config"
log = logging.getLogger(__name__)


class ConfigText(BaseModel):
    text: str
    name: str = PASTED


def create_app(root: str | Path, *, poll_seconds: float = 3.0) -> FastAPI:
    """The studio over the runs under ``root`` (which may not exist yet: runs appear as made)."""
    root = Path(root).expanduser().resolve()
    app = FastAPI(title="Trinity studio", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    validating = threading.Lock()  # config warnings are captured from a shared logger

    @app.exception_handler(StudioError)
    async def studio_error(request: Request, error: StudioError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(RolloutStoreError)
    async def store_error(request: Request, error: RolloutStoreError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:])
        return JSONResponse({"error": f"{where}: {first['msg']}"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("studio: %s failed", request.url.path)
        return JSONResponse(
            {"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"root": str(root), "exists": root.is_dir(), "poll_seconds": poll_seconds}

    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        return run_files.find_runs(root) if root.is_dir() else []

    @app.get("/api/metrics")
    def metrics(run: str, key: Annotated[list[str] | None, Query()] = None) -> dict[str, Any]:
        return run_files.metrics(run_files.resolve(root, run), key or [])

    @app.get("/api/config")
    def config(run: str) -> dict[str, str]:
        return {"yaml": run_files.config_text(run_files.resolve(root, run))}

    @app.get("/api/steps")
    def steps(run: str) -> list[dict[str, Any]]:
        return run_files.rollouts(run_files.resolve(root, run)).steps()

    @app.get("/api/rollouts")
    def rollouts(
        run: str,
        step: int | None = None,
        search: str | None = None,
        min_reward: float | None = None,
        max_reward: float | None = None,
        sort: str = "step",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        store = run_files.rollouts(run_files.resolve(root, run))
        try:
            total, rows = store.query(
                step=step,
                search=search,
                min_reward=min_reward,
                max_reward=max_reward,
                sort=sort,
                limit=limit,
                offset=offset,
            )
        except ValueError as error:
            raise StudioError(str(error), status=422) from None
        return {"total": total, "rollouts": rows}

    @app.get("/api/tasks")
    def tasks(run: str) -> list[dict[str, Any]]:
        return run_files.rollouts(run_files.resolve(root, run)).tasks()

    @app.get("/api/task")
    def task(run: str, prompt: str) -> dict[str, Any]:
        return run_files.task_history(run_files.rollouts(run_files.resolve(root, run)), prompt)

    @app.post("/api/validate")
    def validate(body: ConfigText) -> dict[str, Any]:
        """What ``trinity config check`` says of the text: the resolved config and the warnings,
        or its one-line error."""
        with validating, _captured("trinity.config") as warnings:
            try:
                resolved = load_config_text(body.text, body.name or PASTED)
            except ConfigError as error:
                return {"ok": False, "error": str(error), "warnings": warnings}
        return {"ok": True, "yaml": to_yaml(resolved), "warnings": warnings}

    return app


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured(logger: str) -> Iterator[list[str]]:
    """The messages of warnings logged to ``logger`` while inside."""
    handler, target = _Warnings(), logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield handler.messages
    finally:
        target.removeHandler(handler)
