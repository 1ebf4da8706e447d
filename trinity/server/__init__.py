"""``trinity server``: a Tinker-compatible training service over the engine.

The official ``tinker`` SDK (0.38), unmodified, talks to it: point ``TINKER_BASE_URL`` at it and
use a ``tml-`` key. Layout, bottom up: ``wire`` (protobuf), ``store`` (SQLite), ``futures``
(request ids and results), ``served`` (a base model, its engine worker, resident sampler
weights), ``service`` (sessions, ordering, samplers, checkpoints), ``app`` (routes), ``runner``
(uvicorn). The engine's single-thread worker is ``trinity.engine.worker``.
"""

from trinity.server.runner import ServerThread, build_service, serve, served_model
from trinity.server.service import (
    ServedModel,
    Service,
    ServiceError,
    parse_api_keys,
    parse_tinker_path,
)

__all__ = ["ServedModel", "ServerThread", "Service", "ServiceError", "build_service",
           "parse_api_keys", "parse_tinker_path", "serve", "served_model"]
