"""/stream/sessions: create, say, pushed audio (WebSocket), interrupt, events (SSE), delete.

The WebRTC offer (`POST /stream/sessions/{id}/offer`) is gpu_service/streaming/webrtc.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Optional, Union

from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from avatar_contracts.media import decode_base64
from gpu_service.errors import ServiceError, ValidationFailed
from gpu_service.http import ClosingStreamingResponse, metrics, registry, require_json, settings
from gpu_service.streaming.manager import SessionManager, SessionSpec
from gpu_service.streaming.media import SessionClosed
from gpu_service.streaming.session import StreamSession, check_audio_format
from gpu_service.talking_head.service import TalkingHeadService

log = logging.getLogger("gpu_service.streaming")

router = APIRouter(tags=["streaming"])

SSE_KEEPALIVE_S = 15.0


class StreamSessionRequest(BaseModel):
    """Body of POST /stream/sessions."""

    model_config = ConfigDict(extra="forbid")

    avatar_id: Optional[str] = Field(default=None, max_length=200)
    avatar_image: Optional[str] = Field(default=None, description="A portrait, base64 (JPEG/PNG/WebP).")
    engine: Optional[str] = Field(default=None, description="Talking-head engine (default: the first configured).")
    tts_engine: Optional[str] = Field(default=None, description="Speech engine of `say` (default: DEFAULT_TTS_ENGINE).")
    voice: Optional[str] = None
    language: str = Field(default="en", min_length=2, max_length=16)
    emotion: str = "neutral"
    fps: int = Field(default=25, ge=10, le=60)
    size: Optional[Union[list[int], str]] = Field(default=None, description="[width, height] or \"WxH\", even.")
    head_motion: bool = True
    seed: Optional[int] = Field(default=None, ge=0)


class StreamSessionResponse(BaseModel):
    """Answer of POST /stream/sessions: the session and where to reach it (paths relative to the service)."""

    session_id: str
    avatar_id: str
    fps: int
    width: int
    height: int
    sample_rate: int
    offer_url: str
    say_url: str
    audio_url: str
    interrupt_url: str
    events_url: str
    expires_after_idle_s: float


class SayRequest(BaseModel):
    """Body of POST /stream/sessions/{id}/say."""

    model_config = ConfigDict(extra="forbid")

    text: str
    interrupt: bool = False
    voice: Optional[str] = None
    emotion: Optional[str] = None


def streams(request: Request) -> SessionManager:
    """The app's session manager."""
    return request.app.state.streams


def session_urls(session: StreamSession, expires: float) -> StreamSessionResponse:
    base = f"/stream/sessions/{session.session_id}"
    return StreamSessionResponse(
        session_id=session.session_id, avatar_id=session.avatar_id, fps=session.fps, width=session.size[0],
        height=session.size[1], sample_rate=session.sample_rate, offer_url=f"{base}/offer", say_url=f"{base}/say",
        audio_url=f"{base}/audio", interrupt_url=f"{base}/interrupt", events_url=f"{base}/events",
        expires_after_idle_s=expires,
    )


@router.post("/stream/sessions", status_code=201, response_model=StreamSessionResponse,
             dependencies=[Depends(require_json)])
async def create_session(body: StreamSessionRequest, request: Request) -> StreamSessionResponse:
    """Open a streaming session of an avatar (by id, or a base64 portrait registered now); 429 past the cap."""
    manager = streams(request)
    spec = SessionSpec(avatar_id=body.avatar_id, avatar_image=b"" if body.avatar_image is not None else None,
                       engine=body.engine, tts_engine=body.tts_engine, voice=body.voice, language=body.language,
                       emotion=body.emotion, fps=body.fps, size=body.size, head_motion=body.head_motion, seed=body.seed)
    manager.check(spec)  # everything cheap first: fps, size, emotion, engines, voice, the avatar id, the cap
    heads = TalkingHeadService(registry(request), settings(request), request.app.state.artifacts, metrics(request))

    async def add_avatar(_: bytes) -> str:
        raw = await asyncio.to_thread(decode_base64, body.avatar_image, "avatar_image",
                                      settings(request).talking_head.max_image_bytes)
        return (await heads.add_avatar(raw, field="avatar_image")).avatar_id

    session = await manager.create(spec, add_avatar)
    return session_urls(session, manager.config.idle_timeout_s)


@router.get("/stream/sessions")
def list_sessions(request: Request) -> dict:
    """The open sessions and the cap."""
    manager = streams(request)
    return {"active_sessions": manager.active, "max_sessions": manager.max_sessions,
            "sessions": [s.info() for s in manager.sessions()]}


@router.get("/stream/sessions/{session_id}")
def get_session(session_id: str, request: Request) -> dict:
    """One session's state and figures (viewers, ticks, render times)."""
    return streams(request).get(session_id).info()


@router.delete("/stream/sessions/{session_id}", status_code=204)
async def delete_session(session_id: str, request: Request) -> Response:
    """End a session now: viewers' streams end, listeners get session_closed."""
    await streams(request).delete(session_id)
    return Response(status_code=204)


@router.post("/stream/sessions/{session_id}/say", status_code=202, dependencies=[Depends(require_json)])
async def say(session_id: str, body: SayRequest, request: Request) -> dict:
    """Speak text (TTS streamed clause then sentence by sentence); with interrupt=true, now instead of after the queue."""
    session = streams(request).get(session_id)
    if len(body.text) > settings(request).max_text_chars:
        raise ValidationFailed(f"text is {len(body.text)} characters; the maximum is {settings(request).max_text_chars}")
    try:
        utterance_id = await session.say(body.text, interrupt=body.interrupt, voice=body.voice, emotion=body.emotion)
    except SessionClosed:
        raise _gone(session_id) from None
    return {"utterance_id": utterance_id}


@router.post("/stream/sessions/{session_id}/interrupt")
def interrupt(session_id: str, request: Request) -> dict:
    """Stop speaking: the mouth closes within 100 ms, queued speech is dropped, idle motion goes on."""
    return {"interrupted": streams(request).get(session_id).interrupt()}


def _gone(session_id: str) -> ServiceError:
    from gpu_service.errors import NotFound

    return NotFound(f"streaming session {session_id!r} ended")


def _sse(event: dict) -> bytes:
    return f"event: {event.get('event', 'message')}\ndata: {json.dumps(event)}\n\n".encode()


@router.get("/stream/sessions/{session_id}/events")
async def events(session_id: str, request: Request):
    """Server-sent events: speech_started, speech_finished (exactly once per utterance), session_closed."""
    session = streams(request).get(session_id)
    feed = session.listen()

    async def body():
        try:
            yield b": connected\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(feed.get(), SSE_KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                except SessionClosed:
                    return
                yield _sse(event)
                if event.get("event") == "session_closed":
                    return
        finally:
            feed.close()

    return ClosingStreamingResponse(body(), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# -- pushed PCM -------------------------------------------------------------------------------
WS_BAD_REQUEST = 4422
WS_NOT_FOUND = 4404


@router.websocket("/stream/sessions/{session_id}/audio")
async def audio_socket(websocket: WebSocket, session_id: str) -> None:
    """Pushed PCM: a JSON header {sample_rate, channels?}, then binary s16 frames; {"type": "end"} ends the
    utterance (the next binary frame starts a new one), {"type": "interrupt"} interrupts. Events come back as JSON."""
    manager: SessionManager = websocket.app.state.streams
    await websocket.accept()
    try:
        session = manager.get(session_id)
    except ServiceError as exc:
        await websocket.send_json({"event": "error", "error": exc.message, "error_type": exc.error_type})
        await websocket.close(code=WS_NOT_FOUND, reason=exc.message[:120])
        return
    try:
        header = await asyncio.wait_for(websocket.receive(), 30.0)
    except (asyncio.TimeoutError, WebSocketDisconnect):
        with contextlib.suppress(Exception):
            await websocket.close(code=WS_BAD_REQUEST, reason="no header: send {\"sample_rate\": ...} first")
        return
    try:
        rate, channels = check_audio_format(*_audio_header(header))
    except ServiceError as exc:
        await websocket.send_json({"event": "error", "error": exc.message, "error_type": exc.error_type})
        await websocket.close(code=WS_BAD_REQUEST, reason=exc.message[:120])
        return
    except SessionClosed:
        await websocket.close(code=WS_NOT_FOUND, reason="the session ended")
        return
    feed = session.listen()

    async def forward_events() -> None:
        with contextlib.suppress(SessionClosed, WebSocketDisconnect, RuntimeError):
            async for event in feed:
                await websocket.send_json(event)

    forwarder = asyncio.create_task(forward_events())
    current = None
    try:
        await websocket.send_json({"event": "ready", "session_id": session.session_id, "sample_rate": rate,
                                   "channels": channels})
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                if current is None or current.cancelled:
                    current = session.open_audio(rate, channels)
                    await websocket.send_json({"event": "utterance", "utterance_id": current.utterance_id})
                current.push(message["bytes"])
                continue
            try:
                command = json.loads(message.get("text") or "")
            except ValueError:
                command = None
            kind = command.get("type") if isinstance(command, dict) else None
            if kind == "end":
                if current is not None:
                    current.end()
                current = None
            elif kind == "interrupt":
                session.interrupt()
                current = None
            else:
                await websocket.send_json({"event": "error", "error_type": "validation_error",
                                           "error": "text messages are {\"type\": \"end\"} or {\"type\": \"interrupt\"}"})
    except (WebSocketDisconnect, SessionClosed):
        pass
    finally:
        if current is not None:
            current.end()  # a client that leaves mid-utterance: what it sent plays out
        feed.close()
        forwarder.cancel()
        with contextlib.suppress(BaseException):
            await forwarder
        with contextlib.suppress(Exception):
            await websocket.close()


def _audio_header(message: dict) -> tuple[int, int]:
    """(sample_rate, channels) of the socket's first message, or ValidationFailed naming the field."""
    text = message.get("text")
    if text is None:
        raise ValidationFailed("the first message must be a JSON text header {\"sample_rate\": 24000, \"channels\": 1}")
    try:
        header = json.loads(text)
    except ValueError:
        raise ValidationFailed("the header is not JSON; send {\"sample_rate\": 24000, \"channels\": 1}") from None
    if not isinstance(header, dict) or "sample_rate" not in header:
        raise ValidationFailed("sample_rate is missing from the header (e.g. {\"sample_rate\": 24000, \"channels\": 1})")
    return header["sample_rate"], header.get("channels", 1)
