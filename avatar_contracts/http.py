"""What both services' apps share at the HTTP edge: one middleware and one set of error handlers.

The middleware, in plain ASGI: request ids, the body limit, an optional gate (the runtime's API
keys), the last-resort error answer. The handlers turn every error into the one
`{error, error_type, request_id}` body.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, for two reasons: the body limit must count
bytes as they arrive (a chunked body has no Content-Length to check), and an error in the middle
of a streamed body must reach the server, which then cuts the connection: BaseHTTPMiddleware
ended such a body cleanly, so a client could not tell truncated audio from the whole.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Callable, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from avatar_contracts.errors import PayloadTooLarge, ServiceError, error_response
from avatar_contracts.logs import REQUEST_ID

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _service_error(exc: BaseException) -> ServiceError | None:
    """The ServiceError behind `exc` (Starlette re-raises one that comes after the response started)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ServiceError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class RequestContext:
    """Give each request an id (the client's X-Request-ID when sane), enforce the body limit while the
    body streams in, and answer an unhandled error with a 500 naming the request id, never a trace."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], log: logging.Logger,
                 gate: Optional[Callable[[Request], Optional[ServiceError]]] = None) -> None:
        self.app = app
        self.limit_for = limit_for
        """The body limit in bytes for a request path."""
        self.log = log
        self.gate = gate
        """Called once the request has its id: an error to answer with instead of serving it (e.g. no API key)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.headers.get("x-request-id", "")
        rid = given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)  # every line logged while serving it carries the id (avatar_contracts.logs)
        try:
            await self._serve(scope, receive, send, request, rid)
        finally:
            REQUEST_ID.reset(token)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, request: Request, rid: str) -> None:
        limit = self.limit_for(scope["path"])

        async def answer(exc: ServiceError) -> None:
            headers = dict(exc.headers)
            if isinstance(exc, PayloadTooLarge):
                headers["Connection"] = "close"  # the server then stops reading, instead of draining the rest
            await error_response(request, exc.status_code, exc.error_type, exc.message, headers)(scope, receive, send)

        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:  # refused before a byte of the body is read
            await answer(PayloadTooLarge(f"request body is {int(length)} bytes; the limit is {limit}"))
            return
        refused = self.gate(request) if self.gate is not None else None
        if refused is not None:
            await answer(refused)
            return
        log = self.log

        received = 0
        too_large: PayloadTooLarge | None = None
        started = False
        replaced = False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = PayloadTooLarge(f"request body is over {limit} bytes; the limit is {limit}")
                    raise too_large
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                if too_large is not None:
                    # Whatever the app made of the cut-off body (FastAPI calls it a parse error), the answer is 413.
                    replaced = True
                    await answer(too_large)
                    return
                started = True
                message["headers"] = list(message.get("headers", []))
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, counted_receive, send_with_id)
        except Exception as exc:
            if started:
                # Too late for an error answer: re-raised, so the server cuts the connection and the client sees
                # an incomplete body instead of a clean end.
                cause = _service_error(exc)
                log.error("response aborted mid-body", extra={
                    "request_id": rid, "path": scope["path"],
                    "error_type": cause.error_type if cause else "internal_error",
                    "why": cause.message if cause else f"{type(exc).__name__}: {exc}"})
                raise
            if replaced:
                return
            if too_large is not None:
                await answer(too_large)
                return
            log.exception("unhandled error", extra={"request_id": rid, "path": scope["path"]})
            await answer(ServiceError(f"unexpected server error; quote request id {rid}"))


def describe_validation(errors: list[dict]) -> str:
    """One readable clause per problem of a pydantic/FastAPI validation error, naming the field."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        if err.get("type") == "json_invalid":
            parts.append(f"body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, log: logging.Logger, redact: Callable[[str], str] = lambda text: text) -> None:
    """Answer typed errors, validation errors and HTTP errors with the shared body; `redact` cleans messages.

    A ServiceError of 5xx, or one marked `logged` (a failed generation), is logged with the request id.
    """

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        if exc.status_code >= 500 or getattr(exc, "logged", False):
            log.error("request failed", extra={"error_type": exc.error_type, "why": exc.message,
                                               "status": exc.status_code,
                                               "request_id": getattr(request.state, "request_id", "")})
        return error_response(request, exc.status_code, exc.error_type, redact(exc.message), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(request, 422, "validation_error", describe_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, "http_error", str(exc.detail))
