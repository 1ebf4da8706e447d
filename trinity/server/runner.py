"""Building and running a server: API keys, model specs, uvicorn in the foreground or a thread.

``ServerThread`` is for ``trinity run``'s embedded server (``base_url: local``), tests and the
overhead benchmark: the real app on a real loopback port, so the official SDK talks to it over
HTTP exactly as it would to a remote service.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from trinity.server.app import create_app
from trinity.server.served import ServedModel
from trinity.server.service import Service


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
            raise ValueError(
                f"API key {key[:8]!r}... must start with 'tml-' (the SDK rejects other keys)"
            )
        keys[key] = tenant or "tenant-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return keys


def served_model(spec: str, engine: Any | None = None) -> ServedModel:
    """``PATH``, ``demo`` or ``NAME=PATH``.

    Without a name the model is served under its absolute path: the SDK's ``get_tokenizer``
    calls ``AutoTokenizer.from_pretrained(base_model)``, which then reads the local directory and
    needs no hub access. The directory name and the engine's model name work as aliases.
    """
    from trinity.engine.demo_model import ALIASES, resolve_model_path

    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    resolved = Path(resolve_model_path(path)).expanduser().resolve()
    if engine is None:
        from trinity.engine import Engine

        engine = Engine(str(resolved))
    aliases = {str(resolved), path, resolved.name, *(ALIASES if path in ALIASES else ())}
    if isinstance(getattr(engine, "model_name", None), str):
        aliases.add(engine.model_name)
    return ServedModel(name or str(resolved), resolved, engine, aliases)


def build_service(
    models: list[str] | list[ServedModel],
    data_dir: str | Path,
    api_keys: str | dict[str, str] | None = None,
    **kwargs: Any,
) -> Service:
    """``api_keys``: a dict, or a spec for ``parse_api_keys``; None reads the environment."""
    if api_keys is None:
        api_keys = os.environ.get("TRINITY_SERVER_API_KEYS")
    keys = api_keys if isinstance(api_keys, dict) else parse_api_keys(api_keys)
    served = [m if isinstance(m, ServedModel) else served_model(m) for m in models]
    return Service(served, data_dir, keys, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InjectedLatency:
    """ASGI wrapper: every HTTP request waits ``seconds`` before the app sees it, as a call to a
    far service would (``trinity server --inject-latency-ms``: measuring how well a client hides
    latency). The wait is asynchronous: concurrent requests wait side by side, not in turn."""

    def __init__(self, app: Any, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(self.seconds)
        await self.app(scope, receive, send)


def _config(
    service: Service, host: str, port: int, log_level: str, latency_ms: float = 0.0
) -> uvicorn.Config:
    app = create_app(service)
    # A pending long-poll must not hold shutdown for its full window.
    return uvicorn.Config(
        InjectedLatency(app, latency_ms / 1000) if latency_ms else app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


class ServerThread:
    """The app under uvicorn in a daemon thread; ``stop()`` shuts it down cleanly."""

    def __init__(
        self,
        service: Service,
        host: str = "127.0.0.1",
        port: int | None = None,
        latency_ms: float = 0.0,
    ):
        self.service = service
        self.host, self.port = host, port or free_port()
        self.server = uvicorn.Server(_config(service, self.host, self.port, "warning", latency_ms))
        self.thread = threading.Thread(target=self.server.run, name="trinity-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"trinity server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving, then close the service (which saves live models for a restart)."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    service: Service, host: str = "127.0.0.1", port: int = 8000, latency_ms: float = 0.0
) -> None:
    """Run in the foreground until interrupted."""
    try:
        uvicorn.Server(_config(service, host, port, "info", latency_ms)).run()
    finally:
        service.close()
