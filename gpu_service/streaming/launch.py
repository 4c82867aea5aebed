"""POST /launch: put an avatar into a LiveKit room as a voice agent's face (bitHuman's custom-URL contract).

Takes JSON or the multipart form bitHuman's LiveKit plugin sends to a custom `api_url`:
`livekit_url`, `livekit_token`, `room_name`, one of `avatar_image` (a file; base64 in JSON),
`avatar_image_url` or `avatar_id`, `async_mode` (also `?async=true`) and, ours, `size` ("WxH"), with
`Authorization: Bearer <key>` checked against LIVEKIT__LAUNCH_API_KEY when that is set.

Everything is checked before anything heavy runs; a bad field is a 422 naming it. Then the
avatar is registered (an image) or looked up (an id), the stream session is created (429 past
STREAM_MAX_SESSIONS or LIVEKIT__MAX_WORKERS), and the worker joins the room: with async_mode the
answer (202) comes at once and `GET /launch/{worker_id}` tells how the join went; without, the
answer (200) comes once the worker is in the room and publishing, or is a 502 saying why not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional
from urllib.parse import urlsplit, urlunsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from avatar_contracts.checks import text_problem
from avatar_contracts.media import check_image_header, decode_base64
from gpu_service.errors import BadMedia, NotFound, Overloaded, ServiceError, UnsupportedMediaType, ValidationFailed
from gpu_service.settings import LiveKitSettings, Settings
from gpu_service.streaming.livekit_worker import LiveKitRoom, LiveKitWorker, RoomPort

router = APIRouter(tags=["livekit"])

MAX_TOKEN_CHARS = 8192
MAX_ROOM_NAME_CHARS = 256


class Unauthorized(ServiceError):
    """LIVEKIT__LAUNCH_API_KEY is set and the request does not carry it as a Bearer token."""

    status_code = 401
    error_type = "unauthorized"


class JoinFailed(ServiceError):
    """The worker could not join the LiveKit room (server unreachable, token refused, timeout)."""

    status_code = 502
    error_type = "livekit_join_failed"


# --- checks -------------------------------------------------------------------------------------------

def _b64url_json(part: str, what: str) -> dict:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ValidationFailed(f"livekit_token is not a JWT: its {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise ValidationFailed(f"livekit_token is not a JWT: its {what} is not a JSON object")
    return value


def token_claims(token: str, now: Optional[float] = None) -> dict:
    """The claims of a LiveKit access token, checked for shape (the server checks its signature):
    three base64url parts, a video grant with roomJoin, an identity (`sub`), not expired."""
    if token is None or (isinstance(token, str) and not token.strip()):
        raise ValidationFailed("livekit_token is required")
    if not isinstance(token, str):
        raise ValidationFailed("livekit_token must be a string")
    token = token.strip()
    if len(token) > MAX_TOKEN_CHARS:
        raise ValidationFailed(f"livekit_token is longer than {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise ValidationFailed("livekit_token is not a JWT (header.payload.signature)")
    header = _b64url_json(parts[0], "header")
    claims = _b64url_json(parts[1], "payload")
    if not isinstance(header.get("alg"), str) or header["alg"].lower() == "none":
        raise ValidationFailed("livekit_token is not a signed JWT (its header names no algorithm)")
    video = claims.get("video")
    if not isinstance(video, dict) or video.get("roomJoin") is not True:
        raise ValidationFailed("livekit_token has no video grant with roomJoin: the worker could not join")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise ValidationFailed("livekit_token names no identity (sub)")
    exp = claims.get("exp")
    if exp is not None:
        if not isinstance(exp, (int, float)):
            raise ValidationFailed("livekit_token's exp is not a number")
        if exp <= (time.time() if now is None else now):
            raise ValidationFailed("livekit_token has expired")
    return claims


def check_livekit_url(value: Any) -> str:
    """A ws(s) or http(s) URL with a host, as the SDK connects to it (http -> ws, https -> wss)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValidationFailed("livekit_url is required")
    if not isinstance(value, str):
        raise ValidationFailed("livekit_url must be a string")
    value = value.strip()
    problem = text_problem(value, speakable=False)
    if problem:
        raise ValidationFailed(f"livekit_url {problem}")
    if len(value) > 2048:
        raise ValidationFailed("livekit_url is longer than 2048 characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValidationFailed(f"livekit_url is not a valid URL ({exc})") from None
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValidationFailed("livekit_url must be a ws://, wss://, http:// or https:// URL with a host")
    return urlunsplit(parts._replace(scheme=scheme))


def check_room_name(value: Any, claims: dict) -> str:
    """The room named, or the token's room grant when none is named; they must agree."""
    granted = (claims.get("video") or {}).get("room")
    if value is None or (isinstance(value, str) and not value.strip()):
        if isinstance(granted, str) and granted:
            return granted
        raise ValidationFailed("room_name is required (the token's video grant names no room)")
    if not isinstance(value, str):
        raise ValidationFailed("room_name must be a string")
    value = value.strip()
    if len(value) > MAX_ROOM_NAME_CHARS:
        raise ValidationFailed(f"room_name is longer than {MAX_ROOM_NAME_CHARS} characters")
    problem = text_problem(value, speakable=False)
    if problem:
        raise ValidationFailed(f"room_name {problem}")
    if isinstance(granted, str) and granted and granted != value:
        raise ValidationFailed(f"room_name {value!r} is not the room the livekit_token grants ({granted!r})")
    return value


def parse_bool(value: Any, field: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ValidationFailed(f"{field} must be true or false, got {value!r}")


def check_avatar_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed("avatar_id must be a non-empty string")
    value = value.strip()
    if len(value) > 128 or text_problem(value, speakable=False):
        raise ValidationFailed("avatar_id must be at most 128 printable characters")
    return value


def check_image_url(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed("avatar_image_url must be a non-empty string")
    value = value.strip()
    if len(value) > 2048 or text_problem(value, speakable=False):
        raise ValidationFailed("avatar_image_url must be at most 2048 printable characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018
    except ValueError as exc:
        raise ValidationFailed(f"avatar_image_url is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed("avatar_image_url must be an http(s) URL with a host")
    return value


async def _public_host(host: str, port: int) -> None:
    """Refuse a host that resolves to a loopback, private, link-local or otherwise non-public address."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ValidationFailed(f"avatar_image_url's host {host!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise ValidationFailed(f"avatar_image_url's host {host!r} is not a public address "
                                   "(LIVEKIT__IMAGE_URL_ALLOW_PRIVATE allows it)")


async def fetch_image(url: str, max_bytes: int, timeout_s: float, allow_private: bool) -> bytes:
    """GET an avatar image: http(s) only, no redirects, at most `max_bytes`, the whole fetch within `timeout_s`."""
    parts = urlsplit(url)
    if not allow_private:
        await _public_host(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))

    async def get() -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout_s, trust_env=False) as client:
            async with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
                if response.status_code != 200:
                    raise BadMedia(f"avatar_image_url answered HTTP {response.status_code}")
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > max_bytes:
                    raise BadMedia(f"avatar_image_url is {length} bytes; the limit is {max_bytes} bytes")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise BadMedia(f"avatar_image_url is larger than the {max_bytes} byte limit")
                return bytes(data)

    try:
        raw = await asyncio.wait_for(get(), timeout_s)
    except asyncio.TimeoutError:
        raise BadMedia(f"avatar_image_url was not fetched within {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise BadMedia(f"avatar_image_url could not be fetched ({type(exc).__name__})") from None
    if not raw:
        raise BadMedia("avatar_image_url is empty")
    return raw


@dataclass
class LaunchRequest:
    """A checked /launch request."""

    livekit_url: str
    livekit_token: str
    room_name: str
    identity: str
    agent_identity: Optional[str]
    avatar_id: Optional[str]
    avatar_image: Optional[bytes]
    avatar_image_url: Optional[str]
    async_mode: bool
    size: Optional[Any] = None
    """The session's `size` ([w, h] or "WxH"), checked by the session manager; the avatar's own when None."""


def check_launch(fields: dict, image: Optional[bytes], settings: Settings, async_default: bool) -> LaunchRequest:
    """Every field of a /launch request checked (no I/O); ValidationFailed names the first bad one."""
    url = check_livekit_url(fields.get("livekit_url"))
    claims = token_claims(fields.get("livekit_token"))
    room = check_room_name(fields.get("room_name"), claims)
    sources = [name for name, given in (("avatar_image", image is not None),
                                        ("avatar_image_url", fields.get("avatar_image_url") not in (None, "")),
                                        ("avatar_id", fields.get("avatar_id") not in (None, ""))) if given]
    if len(sources) != 1:
        raise ValidationFailed("send exactly one of avatar_image, avatar_image_url or avatar_id"
                               + (f" (got {', '.join(sources)})" if sources else ""))
    if image is not None:
        check_image_header(image, settings.max_image_pixels, "avatar_image")
    attributes = claims.get("attributes") if isinstance(claims.get("attributes"), dict) else {}
    agent = attributes.get("lk.publish_on_behalf")
    return LaunchRequest(
        livekit_url=url, livekit_token=fields["livekit_token"].strip(), room_name=room, identity=claims["sub"],
        agent_identity=agent if isinstance(agent, str) and agent else None,
        avatar_id=check_avatar_id(fields["avatar_id"]) if sources == ["avatar_id"] else None,
        avatar_image=image,
        avatar_image_url=check_image_url(fields["avatar_image_url"]) if sources == ["avatar_image_url"] else None,
        async_mode=parse_bool(fields.get("async_mode"), "async_mode") if "async_mode" in fields else async_default,
        size=fields.get("size") or None,
    )


def check_auth(request: Request, key: Optional[str]) -> None:
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    supplied = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not supplied or not hmac.compare_digest(supplied.encode(), key.encode()):
        raise Unauthorized("a valid key is required: Authorization: Bearer <LIVEKIT__LAUNCH_API_KEY>",
                           headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, max_image_bytes: int) -> tuple[dict, Optional[bytes]]:
    """The request's fields and its avatar image bytes (a multipart file, or base64 in JSON or a form field)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ValidationFailed("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValidationFailed("the body must be a JSON object")
        image = body.pop("avatar_image", None)
        if image is not None and not isinstance(image, str):
            raise ValidationFailed("avatar_image must be a base64 string in JSON (or a file in a multipart form)")
        raw = decode_base64(image, "avatar_image", max_image_bytes) if image else None
        return body, raw
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        async with request.form(max_files=2, max_fields=32) as form:
            fields: dict[str, Any] = {}
            raw = None
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != "avatar_image":
                        raise ValidationFailed(f"{name} must be a form field, not a file")
                    data = await value.read(max_image_bytes + 1)
                    if len(data) > max_image_bytes:
                        raise BadMedia(f"avatar_image is larger than {max_image_bytes} bytes (the limit)")
                    if not data:
                        raise BadMedia("avatar_image is empty")
                    raw = data
                elif name == "avatar_image":
                    if value:
                        raw = decode_base64(value, "avatar_image", max_image_bytes)
                else:
                    fields[name] = value
            return fields, raw
    raise UnsupportedMediaType("Content-Type must be application/json or multipart/form-data, "
                               f"got {ctype or 'none'!r}")


# --- the workers ----------------------------------------------------------------------------------------

class LiveKitWorkers:
    """The workers of this service: running ones counted against LIVEKIT__MAX_WORKERS, ended ones kept a while for
    their status."""

    KEEP_ENDED = 64

    def __init__(self, settings: LiveKitSettings) -> None:
        self.settings = settings
        self._workers: dict[str, LiveKitWorker] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._reserved = 0

    @property
    def running(self) -> int:
        return sum(1 for w in self._workers.values() if w.running) + self._reserved

    @contextlib.contextmanager
    def reserve(self):
        """A place for one more worker while its session is made, or 429."""
        if self.running >= self.settings.max_workers:
            raise Overloaded(f"{self.settings.max_workers} LiveKit workers are running (LIVEKIT__MAX_WORKERS)",
                             headers={"Retry-After": "5"})
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def add(self, worker: LiveKitWorker) -> None:
        self._workers[worker.worker_id] = worker
        ended = [wid for wid, w in self._workers.items() if not w.running]
        for wid in ended[:-self.KEEP_ENDED] if len(ended) > self.KEEP_ENDED else []:
            self._workers.pop(wid, None)

    def get(self, worker_id: str) -> LiveKitWorker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise NotFound(f"no LiveKit worker {worker_id!r}")
        return worker

    def all(self) -> list[LiveKitWorker]:
        return list(self._workers.values())

    def run(self, worker: LiveKitWorker, join_first: bool) -> asyncio.Task:
        """The worker's life as a task: (join, then) run until it leaves."""

        async def life() -> None:
            if join_first:
                try:
                    await worker.join()
                except Exception as exc:  # noqa: BLE001 - reported in the worker's status
                    await worker.close(failed=f"could not join the room: {join_error(exc)}")
                    return
            await worker.run()

        task = asyncio.create_task(life(), name=worker.worker_id)
        self._tasks[worker.worker_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(worker.worker_id, None))
        return task


def join_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]


def workers(request: Request) -> LiveKitWorkers:
    """The app's LiveKit workers (made on first use: app.py only includes the router)."""
    state = request.app.state
    if getattr(state, "livekit_workers", None) is None:
        state.livekit_workers = LiveKitWorkers(state.settings.livekit)
    return state.livekit_workers


RoomFactory = Callable[[], RoomPort]


def room_factory(request: Request) -> RoomFactory:
    """How a worker gets its room: the real SDK's, unless the app was given another (tests, at the SDK boundary)."""
    return getattr(request.app.state, "livekit_room_factory", None) or LiveKitRoom


async def create_session(request: Request, launch: LaunchRequest, settings: Settings):
    """A stream session for the named avatar, or for the image (sent, or fetched from its URL), registered first."""
    from gpu_service.http import artifacts, metrics, registry
    from gpu_service.streaming.manager import SessionSpec
    from gpu_service.talking_head.service import TalkingHeadService

    manager = request.app.state.streams
    raw, field = launch.avatar_image, "avatar_image"
    if launch.avatar_image_url is not None:
        manager.check_capacity()  # a 429 before the fetch
        field = "avatar_image_url"
        raw = await fetch_image(launch.avatar_image_url, settings.talking_head.max_image_bytes,
                                settings.livekit.image_url_timeout_s, settings.livekit.image_url_allow_private)
        check_image_header(raw, settings.max_image_pixels, field)
    heads = TalkingHeadService(registry(request), settings, artifacts(request), metrics(request))

    async def add_avatar(image: bytes) -> str:
        return (await heads.add_avatar(image, field=field)).avatar_id

    spec = SessionSpec(avatar_id=launch.avatar_id, avatar_image=raw, fps=25, size=launch.size)
    return await manager.create(spec, add_avatar=add_avatar)


def status_body(worker: LiveKitWorker) -> dict:
    info = asdict(worker.info())
    info["status_url"] = f"/launch/{worker.worker_id}"
    return info


@router.post("/launch")
async def launch(request: Request) -> JSONResponse:
    """Start a worker that joins `room_name` with `livekit_token` and plays the agent's speech as the avatar."""
    settings: Settings = request.app.state.settings
    check_auth(request, settings.livekit.launch_api_key)
    fleet = workers(request)
    if settings.livekit.max_workers == 0:
        raise ValidationFailed("/launch is disabled here (LIVEKIT__MAX_WORKERS=0)")
    fields, image = await read_body(request, settings.talking_head.max_image_bytes)
    async_default = parse_bool(request.query_params.get("async"), "async")
    launch_req = check_launch(fields, image, settings, async_default)

    with fleet.reserve():
        session = await create_session(request, launch_req, settings)

        async def release() -> None:
            await session.close()

        lk = settings.livekit
        worker = LiveKitWorker(
            room=room_factory(request)(), session=session, livekit_url=launch_req.livekit_url,
            token=launch_req.livekit_token, room_name=launch_req.room_name,
            agent_identity=launch_req.agent_identity, video_max_bitrate=lk.video_max_bitrate,
            audio_queue_ms=lk.audio_queue_ms, join_timeout_s=lk.join_timeout_s, agent_wait_s=lk.agent_wait_s,
            finished_fallback_s=lk.finished_fallback_s, release=release)
        fleet.add(worker)
    if launch_req.async_mode:
        fleet.run(worker, join_first=True)
        return JSONResponse(status_body(worker), status_code=202)
    try:
        await worker.join()
    except Exception as exc:  # noqa: BLE001 - the SDK's errors are many; each is the room's refusal
        await worker.close(failed=f"could not join the room: {join_error(exc)}")
        raise JoinFailed(f"the worker could not join room {launch_req.room_name!r} at livekit_url: "
                         f"{join_error(exc)}") from None
    fleet.run(worker, join_first=False)
    return JSONResponse(status_body(worker), status_code=200)


@router.get("/launch")
def list_workers(request: Request) -> dict:
    """Every worker this service knows (running ones and the last ended ones), and the limit."""
    check_auth(request, request.app.state.settings.livekit.launch_api_key)
    fleet = workers(request)
    return {"running": fleet.running, "max_workers": fleet.settings.max_workers,
            "workers": [status_body(w) for w in fleet.all()]}


@router.get("/launch/{worker_id}")
def worker_status(worker_id: str, request: Request) -> dict:
    """One worker: its state (starting, joining, running, ended, failed), why it ended, its figures."""
    check_auth(request, request.app.state.settings.livekit.launch_api_key)
    return status_body(workers(request).get(worker_id))


@router.delete("/launch/{worker_id}")
async def stop_worker(worker_id: str, request: Request) -> dict:
    """Make a worker leave its room now (it ends its session)."""
    check_auth(request, request.app.state.settings.livekit.launch_api_key)
    worker = workers(request).get(worker_id)
    worker.stop("stopped by DELETE /launch")
    return status_body(worker)
