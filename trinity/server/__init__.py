"""``trinity server``: a Tinker-compatible training service over the engine.

The official ``tinker`` SDK (0.38), unmodified, talks to it: point ``TINKER_BASE_URL`` at it and
use a ``tml-`` key. Layout, bottom up: ``store`` (SQLite), ``futures`` (request ids and
results), ``limits`` (what one client may make the server hold; body reading), ``wire``
(protobuf and every request check), ``served`` (a base model, its engine
worker, resident sampler weights), ``command_log`` (a training model's commands in ``seq_id``
order), ``training`` (live training models), ``checkpoints`` (``tinker://`` paths, their
directories and rows), ``samplers`` (sampling sessions), ``service`` (API keys, sessions, and
each request orchestrated over the rest), ``app`` (routes), ``runner`` (uvicorn). The engine's
single-thread worker is ``trinity.engine.worker``. What the server promises a client (ordering,
durability, isolation, limits) and how that is tested: ``docs/server.md``.
"""

from trinity.server.futures import ServiceError
from trinity.server.runner import (
    ServerThread,
    build_service,
    parse_api_keys,
    serve,
    served_model,
)
from trinity.server.served import ServedModel
from trinity.server.service import Service
from trinity.server.wire import parse_tinker_path

__all__ = [
    "ServedModel",
    "ServerThread",
    "Service",
    "ServiceError",
    "build_service",
    "parse_api_keys",
    "parse_tinker_path",
    "serve",
    "served_model",
]
