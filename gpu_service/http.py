"""Shared request dependencies of the routers."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from gpu_service.errors import UnsupportedMediaType


def require_json(request: Request) -> None:
    """Refuse bodies that are not declared as JSON, naming what was sent."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype or 'none'!r}")


def wants_json(request: Request, response: str | None) -> bool:
    """A JSON answer (with a media URL) when the body's `response` field or the Accept header asks for it."""
    return response == "json" or "application/json" in request.headers.get("accept", "")


def mp4_response(mp4: bytes, timings_ms: dict, headers: dict[str, str]) -> Response:
    """The MP4 itself, its facts in X- headers and the stage timings in X-Timings-Ms."""
    timing = ",".join(f"{k}={v}" for k, v in timings_ms.items())
    return Response(mp4, media_type="video/mp4", headers={**headers, "X-Timings-Ms": timing})
