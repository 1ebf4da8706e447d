"""What one client may make the server hold: body sizes, decoded sizes, ranks, held commands.

Every limit is a ``Limits`` field (``Service(limits=...)``, ``trinity server --max-...``), so an
operator with big models can raise it. Bodies are read here, before any parsing: the bytes on
the wire are capped (413), a ``Content-Encoding`` of gzip, deflate or zstd is undone in a
streaming decoder that stops one byte past the decoded cap (413: a small compressed body never
expands into gigabytes), and JSON is parsed refusing what Python's parser would let through
(``NaN``/``Infinity``, floats that overflow to inf, integers beyond int64, deep nesting).
"""

from __future__ import annotations

import io
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

from trinity.server.futures import ServiceError

MiB = 1 << 20
INT64_MAX = (1 << 63) - 1
MAX_JSON_DEPTH = 32  # the SDK's deepest request (a sample prompt's chunks) is about 5


@dataclass(frozen=True)
class Limits:
    """``max_body_bytes``: a request as sent (compressed or not). ``max_decoded_bytes``: a body
    after decompression, and the dense tensors of one ``/forward_backward`` together.
    ``max_lora_rank``: the largest LoRA rank a client may create. ``held_timeout_s``: how long a
    training command that arrived ahead of its turn (a ``seq_id`` gap) waits for the gap to fill
    before it fails. ``max_held_per_tenant``: commands held waiting for their turn per tenant, all
    models together (each at most ``max_decoded_bytes``, so this caps the memory a tenant pins)."""

    max_body_bytes: int = 64 * MiB
    max_decoded_bytes: int = 256 * MiB
    max_lora_rank: int = 256
    held_timeout_s: float = 300.0
    max_held_per_tenant: int = 64

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_decoded_bytes", "max_lora_rank", "max_held_per_tenant"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"server limit {name} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.held_timeout_s) and self.held_timeout_s > 0):
            raise ValueError(
                f"server limit held_timeout_s must be a positive number, got {self.held_timeout_s}"
            )


async def read_body(request: Any, limits: Limits) -> bytes:
    """The request body, decompressed per ``Content-Encoding``, within ``limits`` (else 413)."""
    path = request.url.path
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(path, f"declares {declared} bytes", limits.max_body_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise _too_large(path, "is larger", limits.max_body_bytes)
        chunks.append(chunk)
    return decompress(b"".join(chunks), request.headers.get("content-encoding"), limits, path)


def decompress(body: bytes, encoding: str | None, limits: Limits, where: str) -> bytes:
    """``body`` decoded per ``encoding``, stopping as soon as it passes ``max_decoded_bytes``."""
    encoding = (encoding or "identity").strip().lower()
    cap = limits.max_decoded_bytes
    if encoding in ("identity", ""):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(wbits=47 if encoding != "deflate" else 15)
        try:
            out = decoder.decompress(body, cap + 1)
        except zlib.error as exc:
            raise ServiceError(400, f"{where}: body is not valid {encoding}: {exc}") from None
        if len(out) > cap:
            raise _too_large(where, f"expands ({encoding}) to more", cap)
        if not decoder.eof:
            raise ServiceError(400, f"{where}: body is a truncated {encoding} stream")
        return out
    if encoding == "zstd":
        import zstandard

        out = io.BytesIO()
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
                while chunk := reader.read(MiB):
                    if out.tell() + len(chunk) > cap:
                        raise _too_large(where, "expands (zstd) to more", cap)
                    out.write(chunk)
        except zstandard.ZstdError as exc:
            raise ServiceError(400, f"{where}: body is not valid zstd: {exc}") from None
        return out.getvalue()
    raise ServiceError(
        415, f"{where}: Content-Encoding {encoding!r} is not supported (gzip, deflate or zstd)"
    )


def _too_large(where: str, what: str, cap: int) -> ServiceError:
    return ServiceError(413, f"{where}: the request body {what} than the limit of {cap} bytes")


def parse_json(raw: bytes, where: str) -> Any:
    """Strict JSON: no NaN/Infinity, no float overflowing to inf, ints within int64, depth
    bounded; anything else is a 400 naming ``where``."""
    try:
        data = json.loads(
            raw or b"{}",
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_int64,
        )
    except RecursionError:
        raise ServiceError(400, f"{where}: body nests deeper than {MAX_JSON_DEPTH}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(400, f"{where}: body is not valid JSON: {exc}") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise ServiceError(400, f"{where}: body nests deeper than {MAX_JSON_DEPTH}")
    return data


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} overflows a 64-bit float")
    return value


def _int64(text: str) -> int:
    if len(text) > 20 or abs(value := int(text)) > INT64_MAX:
        raise ValueError(f"integer {text[:40]} is outside the 64-bit range")
    return value


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion limit to hit)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest
