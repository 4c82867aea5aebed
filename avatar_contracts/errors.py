"""The error taxonomy shared by the GPU service and the runtime, and the one body both answer with.

Each service adds its own subclasses (gpu_service/errors.py, runtime/errors.py); the mapping to
HTTP lives on the classes, so a handler needs only `status_code`, `error_type` and `message`.
"""

from __future__ import annotations

import re
import uuid
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse


class ServiceError(Exception):
    """Base of every error a service answers with a clean status and message."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ValidationFailed(ServiceError):
    """The request is well-formed JSON but a value is not acceptable."""

    status_code = 422
    error_type = "validation_error"


class BadMedia(ValidationFailed):
    """An uploaded audio, image or video cannot be decoded or is out of bounds."""

    error_type = "bad_media"


class NotFound(ServiceError):
    """Something asked for by id that does not exist (or no longer)."""

    status_code = 404
    error_type = "not_found"


class PayloadTooLarge(ServiceError):
    """The request body is over the configured limit."""

    status_code = 413
    error_type = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """The request's content type is not one the endpoint accepts."""

    status_code = 415
    error_type = "unsupported_media_type"


# An absolute path of two or more folders (POSIX or Windows), as exception texts carry them; URLs do not
# match, as their paths follow a host, not a space or a quote.
_SERVER_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"():,;]+/){2,}([^\s/'\"():,;]*)|\b[A-Za-z]:\\(?:[^\s\\'\"]+\\)+([^\s\\'\"]*)")


def redact_paths(text: str) -> str:
    """`text` with server file paths cut to their last part (…/name): a message for clients must not map the disk."""
    return _SERVER_PATH.sub(lambda m: "…/" + (m.group(1) if m.group(1) is not None else m.group(2) or ""), text)


def error_response(
    request: Request, status: int, error_type: str, message: str, headers: Optional[dict] = None
) -> JSONResponse:
    """The `{error, error_type, request_id}` body every error answer carries, with X-Request-ID."""
    rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    return JSONResponse(
        {"error": message, "error_type": error_type, "request_id": rid},
        status_code=status,
        headers={**(headers or {}), "X-Request-ID": rid},
    )
