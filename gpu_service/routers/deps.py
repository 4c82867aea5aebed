"""Shared request dependencies of the routers."""

from __future__ import annotations

from fastapi import Request

from gpu_service.errors import UnsupportedMediaType


def require_json(request: Request) -> None:
    """Refuse bodies that are not declared as JSON, naming what was sent."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype or 'none'!r}")
