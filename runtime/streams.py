"""Live sessions through the runtime: `POST /api/v1/stream` makes one on a GPU service, and the runtime relays
the session's signalling so that a browser needs neither the GPU service's address nor the API key.

- **Placement**: the runtime's pool (`runtime/gpu_client.py`) picks the service by the avatar's affinity, as
  for a job's chunks; one that is down (unreachable, timed out, 5xx) is marked so and the next ready one is
  asked, a 429 moves the session too (without marking it down). What stands at the end is answered: 429 with
  the service's Retry-After, 503 naming the unreachable service, a 4xx passed on with the service's message.
- **Names**: the runtime's `stream_id` is `<service tag>.<the service's session id>`, the tag 8 hex digits of
  a hash of the service's base URL. Nothing is kept per session: any runtime with the same GPU_SERVICE_URLS
  and STREAM_TOKEN_SECRET routes any session, and a restarted one still does when the secret is set.
- **Tokens**: a session's token is HMAC-SHA256(STREAM_TOKEN_SECRET, stream_id), base64url: unguessable without
  the secret, checked in constant time. A missing token is a 401; a wrong one is answered exactly like a
  session that does not exist (404), as another key's job is.
- **Relayed**: offer, say, interrupt (JSON, with this service's status), events (server-sent events passed on
  as their bytes arrive, with a comment line after STREAM_KEEPALIVE_S while the session is quiet so that
  proxies keep the connection), DELETE. The media flows browser <-> GPU service over ICE, not through here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

import anyio
import httpx

from avatar_contracts.logs import current_request_id
from runtime.errors import GPUServiceError, NotFound, ServiceError, Unauthorized
from runtime.gpu_client import GPUClient, ServiceClient, affinity_key, answer_failure, transport_failure
from runtime.metrics import RuntimeMetrics, call_outcome
from runtime.settings import Settings

log = logging.getLogger("runtime.streams")

TOKEN_HEADER = "X-Stream-Token"

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_STREAM_ID = re.compile(r"^([0-9a-f]{8})\.([A-Za-z0-9_-]{1,128})$")


def service_tag(base_url: str) -> str:
    """The 8 hex digits that name a GPU service inside a stream_id (the same on every runtime)."""
    return hashlib.blake2b(base_url.rstrip("/").encode(), digest_size=4).hexdigest()


class StreamTokens:
    """Signs and checks per-session tokens."""

    def __init__(self, secret: Optional[str]) -> None:
        self._key = secret.encode() if secret else secrets.token_bytes(32)

    def token(self, stream_id: str) -> str:
        mac = hmac.new(self._key, b"avatar-stream-token\n" + stream_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def valid(self, stream_id: str, token: str) -> bool:
        return hmac.compare_digest(self.token(stream_id).encode(), token.encode("utf-8", "replace"))


class Relayed(ServiceError):
    """An answer of the GPU service passed on to the caller with its status, type and message."""

    def __init__(self, status: int, error_type: str, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message, headers=headers)
        self.status_code = status
        self.error_type = error_type


def relayed_error(exc: GPUServiceError, what: str) -> ServiceError:
    """The runtime's answer to a failed relayed call: 429 + Retry-After, 503 naming an unreachable or failing
    service, 404 for a session it does not know, any other 4xx with the service's own words."""
    if exc.status is None or exc.status >= 500:
        return Relayed(503, "gpu_service_unavailable", exc.message, {"Retry-After": "1"})
    text = getattr(exc, "text", exc.message)
    if exc.status == 429:
        wait = exc.retry_after_s if exc.retry_after_s is not None else 1.0
        return Relayed(429, "overloaded", f"{what}: {text}", {"Retry-After": str(max(1, round(wait)))})
    return Relayed(exc.status, exc.error_type, text)


@dataclass(frozen=True)
class StreamTarget:
    """Where a stream_id leads: one session of one GPU service."""

    stream_id: str
    service: ServiceClient
    session_id: str

    def path(self, suffix: str = "") -> str:
        return f"/stream/sessions/{self.session_id}{suffix}"


class StreamRelay:
    """Creates sessions on the GPU services and relays their calls (one pooled async client per service)."""

    def __init__(self, settings: Settings, gpu: GPUClient, metrics: Optional[RuntimeMetrics] = None) -> None:
        self.settings = settings
        self.gpu = gpu
        self.metrics = metrics if metrics is not None else gpu.metrics
        self.tokens = StreamTokens(settings.stream_token_secret)
        self.keepalive_s = settings.stream_keepalive_s
        self._services = {service_tag(s.base): s for s in gpu.services}
        self._http: dict[str, httpx.AsyncClient] = {}

    def _client(self, service: ServiceClient) -> httpx.AsyncClient:
        client = self._http.get(service.label)
        if client is None:
            timeout = httpx.Timeout(self.settings.stream_timeout_s, connect=self.settings.gpu_connect_timeout_s)
            # each open event stream holds a connection: room for many, the GPU service's own limits apply
            limits = httpx.Limits(max_connections=1024, max_keepalive_connections=32)
            client = self._http[service.label] = httpx.AsyncClient(base_url=service.base, timeout=timeout, limits=limits)
        return client

    async def aclose(self) -> None:
        for client in self._http.values():
            await client.aclose()
        self._http.clear()

    # -- names and tokens -----------------------------------------------------------------

    def target(self, stream_id: str, token: Optional[str]) -> StreamTarget:
        """The session a caller may use, or 401 (no token) / 404 (unknown id, or not this id's token)."""
        match = _STREAM_ID.match(stream_id)
        service = self._services.get(match.group(1)) if match else None
        if not token:
            raise Unauthorized(f"this session's token is required ({TOKEN_HEADER} header, or ?token=)",
                               headers={"WWW-Authenticate": f'{TOKEN_HEADER} realm="stream"'})
        if service is None or not self.tokens.valid(stream_id, token):
            raise NotFound(f"no stream session {stream_id[:200]!r}")
        return StreamTarget(stream_id, service, match.group(2))

    # -- calls ----------------------------------------------------------------------------

    async def call(self, service: ServiceClient, method: str, path: str, template: str, what: str,
                   **kwargs: Any) -> httpx.Response:
        """One relayed request; for anything but 2xx a GPUServiceError, classified as for every GPU call
        (gpu_client.transport_failure, answer_failure)."""
        headers = kwargs.pop("headers", {})
        rid = current_request_id()
        if rid:
            headers["X-Request-ID"] = rid
        try:
            response = await self._client(service).request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            outcome, error = transport_failure(exc, service.label, what)
            self.metrics.gpu_call(template, outcome)
            raise error from exc
        self.metrics.gpu_call(template, call_outcome(response.status_code))
        if response.is_success:
            return response
        raise answer_failure(response, service.label, what)

    async def create(self, body: dict[str, Any], avatar_id: Optional[str], avatar_image: Optional[str]
                     ) -> tuple[StreamTarget, dict[str, Any]]:
        """A session on the GPU service the pool picks (failing over as the module says): its target and the
        service's own 201 body."""
        key = affinity_key(avatar_id, avatar_image)
        job = f"stream-{uuid.uuid4().hex}"
        placement = self.gpu.place(key, job, avatar_id)
        tried: list[ServiceClient] = []
        while True:
            service = placement.service
            tried.append(service)
            try:
                response = await self.call(service, "POST", "/stream/sessions", "/stream/sessions",
                                           "stream session", json=body)
            except GPUServiceError as exc:
                moved = self.gpu.failover(placement, exc, key, tried, avatar_id)
                if moved is None:
                    raise relayed_error(exc, "stream session") from None
                placement = moved
                continue
            placement.release()
            break
        answer = response.json()
        session_id = str(answer.get("session_id", "")) if isinstance(answer, dict) else ""
        if not _SESSION_ID.match(session_id):
            raise Relayed(502, "gpu_service_error",
                          f"GPU service {service.label} answered a session id the runtime cannot route: {session_id[:80]!r}")
        stream_id = f"{service_tag(service.base)}.{session_id}"
        log.info("stream session created", extra={"stream_id": stream_id, "gpu_service": service.label,
                                                  "avatar_id": answer.get("avatar_id")})
        return StreamTarget(stream_id, service, session_id), answer

    async def relay(self, target: StreamTarget, method: str, suffix: str, what: str,
                    json: Any = None) -> httpx.Response:
        """One call on a session (offer, say, interrupt, DELETE); errors as `relayed_error` says."""
        kwargs = {"json": json} if json is not None else {}
        try:
            return await self.call(target.service, method, target.path(suffix),
                                   f"/stream/sessions/{{session_id}}{suffix}", what, **kwargs)
        except GPUServiceError as exc:
            if exc.down:
                self.gpu.mark_down(target.service, exc.message)
            if exc.status == 404:
                raise NotFound(f"no stream session {target.stream_id!r} (it ended, or expired)") from None
            raise relayed_error(exc, what) from None

    async def events(self, target: StreamTarget, stopping: Callable[[], bool] = lambda: False) -> AsyncIterator[bytes]:
        """The session's server-sent events, opened now (errors before the first byte are raised here), then
        passed on chunk by chunk; the upstream request is closed when the caller stops reading, and the stream
        ends (cleanly, between events) once `stopping()` says the server is shutting down, which waits for it."""
        client = self._client(target.service)
        headers = {"Accept": "text/event-stream"}
        rid = current_request_id()
        if rid:
            headers["X-Request-ID"] = rid
        template = "/stream/sessions/{session_id}/events"
        timeout = httpx.Timeout(None, connect=self.settings.gpu_connect_timeout_s)
        request = client.build_request("GET", target.path("/events"), headers=headers, timeout=timeout)
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            self.metrics.gpu_call(template, "unreachable")
            err = GPUServiceError(f"events: GPU service {target.service.label} is unreachable ({type(exc).__name__})",
                                  transient=True, down=True)
            self.gpu.mark_down(target.service, err.message)
            raise relayed_error(err, "events") from None
        self.metrics.gpu_call(template, call_outcome(response.status_code))
        if not response.is_success:
            await response.aread()
            await response.aclose()
            exc = answer_failure(response, target.service.label, "events")
            if exc.status == 404:
                raise NotFound(f"no stream session {target.stream_id!r} (it ended, or expired)")
            raise relayed_error(exc, "events")
        return self._pump(response, stopping)

    async def _pump(self, response: httpx.Response, stopping: Callable[[], bool]) -> AsyncIterator[bytes]:
        """Upstream bytes as they come, with a keep-alive comment between events while it is quiet."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        done = object()

        async def read() -> None:
            try:
                async for piece in response.aiter_raw():
                    await queue.put(piece)
            except Exception as exc:  # noqa: BLE001 - the service went away mid-stream: the stream just ends
                log.info("stream events cut", extra={"why": type(exc).__name__})
            await queue.put(done)  # not reached when cancelled: then nobody is reading

        reader = asyncio.create_task(read())
        at_boundary = True  # a comment may only go between events, never inside one
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        try:
            while True:
                if at_boundary and stopping():
                    return
                try:
                    piece = await asyncio.wait_for(queue.get(), timeout=min(1.0, self.keepalive_s))
                except asyncio.TimeoutError:
                    if at_boundary and loop.time() - quiet_since >= self.keepalive_s:
                        quiet_since = loop.time()
                        yield b": keep-alive\n\n"
                    continue
                if piece is done:
                    return
                if piece:
                    quiet_since = loop.time()
                    at_boundary = piece.endswith(b"\n\n") or piece.endswith(b"\r\n\r\n")
                    yield piece
        finally:
            reader.cancel()
            # shielded: when the viewer left, the server's cancel scope would cancel every await made here
            # (anyio's cancellation is level-triggered), and the upstream request would stay open
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
                await response.aclose()

    async def face_box(self, target: StreamTarget, avatar_id: Optional[str], size: tuple[int, int]
                       ) -> Optional[list[float]]:
        """The avatar's face box as fractions of the session's frames, from the service's avatar list; None when
        it cannot say (never an error: the box only helps a viewer). A frame is the portrait cropped around its
        centre to the frame's aspect, then scaled (gpu_service/streaming/session.py), so the box is too."""
        if not avatar_id:
            return None
        try:
            response = await self.call(target.service, "GET", "/avatars", "/avatars", "list avatars", timeout=5.0)
            items = response.json()
            items = items.get("avatars", []) if isinstance(items, dict) else items
            info = next(i for i in items if isinstance(i, dict) and i.get("avatar_id") == avatar_id)
            (x, y, w, h), (width, height) = info["face_box"], info["image_size"]
            return crop_box((x, y, w, h), (width, height), size)
        except (GPUServiceError, ValueError, KeyError, TypeError, StopIteration, ZeroDivisionError):
            return None

    def ice_servers(self, answer: dict[str, Any]) -> list[dict[str, Any]]:
        """The session's own ICE servers (when the GPU service names any), then STREAM_ICE_SERVERS."""
        own = answer.get("ice_servers") if isinstance(answer.get("ice_servers"), list) else []
        return [s for s in own if isinstance(s, dict)] + list(self.settings.stream_ice_servers)


def crop_box(box: tuple[float, float, float, float], image: tuple[int, int], frame: tuple[int, int]) -> list[float]:
    """A box in portrait pixels as fractions of a frame made by cropping the portrait around its centre to the
    frame's aspect and scaling it (the GPU service's streamed frames), clipped to the frame."""
    (x, y, w, h), (iw, ih), (tw, th) = box, image, frame
    cw, ch = (iw, min(ih, round(iw * th / tw))) if iw * th <= ih * tw else (min(iw, round(ih * tw / th)), ih)
    x0, y0 = (iw - cw) // 2, (ih - ch) // 2
    left, top = max(0.0, (x - x0) / cw), max(0.0, (y - y0) / ch)
    right, bottom = min(1.0, (x + w - x0) / cw), min(1.0, (y + h - y0) / ch)
    return [round(left, 4), round(top, 4), round(max(0.0, right - left), 4), round(max(0.0, bottom - top), 4)]


