"""The app's streaming sessions: create (within STREAM_MAX_SESSIONS), find, delete, and reap the unwatched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from gpu_service.errors import NotFound, Overloaded, ValidationFailed
from gpu_service.metrics import GpuMetrics
from gpu_service.registry import EngineRegistry
from gpu_service.settings import Settings
from gpu_service.speech.protocol import SpeechRequest
from gpu_service.streaming.media import MAX_FPS, MIN_FPS, SAMPLE_RATE
from gpu_service.streaming.session import StreamSession
from gpu_service.talking_head.driving import resolve_emotion

log = logging.getLogger("gpu_service.streaming")

RETRY_AFTER_S = 5
"""Retry-After of the 429 past STREAM_MAX_SESSIONS: sessions last minutes, so a client should not hammer."""


@dataclass
class SessionSpec:
    """A session request, checked: what StreamSession needs besides the avatar's pixels."""

    avatar_id: Optional[str] = None
    avatar_image: Optional[bytes] = None
    engine: Optional[str] = None
    tts_engine: Optional[str] = None
    voice: Optional[str] = None
    language: str = "en"
    emotion: str = "neutral"
    fps: int = 25
    size: Optional[tuple[int, int]] = None
    head_motion: bool = True
    seed: Optional[int] = None


def check_fps(fps: int) -> int:
    """fps within [MIN_FPS, MAX_FPS] that divides SAMPLE_RATE (so every tick has a whole number of samples)."""
    if isinstance(fps, bool) or not isinstance(fps, int) or not MIN_FPS <= fps <= MAX_FPS or SAMPLE_RATE % fps:
        raise ValidationFailed(f"fps must be an integer within [{MIN_FPS}, {MAX_FPS}] dividing {SAMPLE_RATE} "
                               f"(e.g. 25 or 30), got {fps!r}")
    return fps


def check_size(size, max_size: int) -> Optional[tuple[int, int]]:
    """A [width, height] (or "WxH") of even numbers within [64, max_size], or None."""
    if size is None:
        return None
    if isinstance(size, str):
        parts = size.lower().split("x")
        try:
            size = [int(p) for p in parts]
        except ValueError:
            size = None
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise ValidationFailed(f"size must be [width, height] or \"WxH\", got {size!r}")
    w, h = size
    if not (64 <= w <= max_size and 64 <= h <= max_size) or w % 2 or h % 2:
        raise ValidationFailed(f"size must be even numbers within [64, {max_size}] (video needs even sides), got {w}x{h}")
    return int(w), int(h)


class SessionManager:
    """Sessions by id, capped at STREAM_MAX_SESSIONS; a reaper ends those nobody watched for STREAM_IDLE_TIMEOUT_S.

    Sessions render on threads of their own and take no engine slot (they have this cap instead).
    """

    def __init__(self, settings: Settings, registry: EngineRegistry, metrics: Optional[GpuMetrics] = None) -> None:
        self.settings = settings
        self.config = settings.stream
        self.registry = registry
        self.metrics = metrics if metrics is not None else GpuMetrics()
        self._sessions: dict[str, StreamSession] = {}
        self._gauges: dict[str, contextlib.ExitStack] = {}
        self._reserved = 0
        self._reaper: Optional[asyncio.Task] = None
        self.reaped = 0

    # -- figures -----------------------------------------------------------------------------
    @property
    def max_sessions(self) -> int:
        return self.config.max_sessions

    @property
    def active(self) -> int:
        """Open sessions (those being created included)."""
        return len(self._sessions) + self._reserved

    def sessions(self) -> list[StreamSession]:
        return list(self._sessions.values())

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the reaper (the app's lifespan)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="stream-reaper")

    async def stop(self) -> None:
        """Close every session and stop the reaper."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
            self._reaper = None
        for session in list(self._sessions.values()):
            with contextlib.suppress(Exception):
                await session.close()

    async def _reap_forever(self) -> None:
        every = min(1.0, max(0.05, self.config.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            await self.reap()

    async def reap(self) -> list[str]:
        """Close the sessions nobody has watched for STREAM_IDLE_TIMEOUT_S; their ids."""
        now = time.monotonic()
        gone = [s for s in self._sessions.values() if s.unwatched_for(now) >= self.config.idle_timeout_s]
        for session in gone:
            log.info("stream session reaped", extra={"session_id": session.session_id,
                                                     "idle_s": round(session.unwatched_for(now), 1)})
            await session.close()
            self.reaped += 1
        return [s.session_id for s in gone]

    # -- sessions ----------------------------------------------------------------------------
    def check(self, spec: SessionSpec) -> None:
        """Everything about a request that needs no work: fps, size, emotion, engines, voice, the cap."""
        if self.config.max_sessions == 0:
            raise ValidationFailed("streaming is turned off here (STREAM_MAX_SESSIONS=0)")
        check_fps(spec.fps)
        spec.size = check_size(spec.size, self.config.max_size)
        spec.emotion = resolve_emotion(spec.emotion)
        if (spec.avatar_id is None) == (spec.avatar_image is None):
            raise ValidationFailed("send exactly one of avatar_id or avatar_image")
        entry = self.registry.talking_head_engine(spec.engine)
        if spec.avatar_id is not None:
            entry.engine.get_avatar(spec.avatar_id)  # NotFound (404) names it
        speech = self.registry.speech_engine(spec.tts_engine)
        speech.engine.validate(SpeechRequest(text="x", voice=spec.voice, language=spec.language))
        self.check_capacity()

    def check_capacity(self) -> None:
        if self.active >= self.config.max_sessions:
            raise Overloaded(f"{self.active} streaming sessions are open, the most this service holds "
                             f"(STREAM_MAX_SESSIONS={self.config.max_sessions}); retry later",
                             headers={"Retry-After": str(RETRY_AFTER_S)})

    async def create(self, spec: SessionSpec, add_avatar=None) -> StreamSession:
        """Check the spec, hold a place under the cap, register the avatar if one was sent, and start the session.

        `add_avatar(raw) -> avatar_id` registers an inline portrait (the talking-head service's, on a slot).
        """
        self.check(spec)
        self._reserved += 1
        try:
            if spec.avatar_image is not None:
                if add_avatar is None:
                    raise ValidationFailed("avatar_image cannot be registered here; upload it to POST /avatars")
                spec.avatar_id = await add_avatar(spec.avatar_image)
            entry = self.registry.talking_head_engine(spec.engine)
            replica = entry.place(prefer=lambda engine: engine.is_warm(spec.avatar_id))
            session_id = f"sess_{uuid.uuid4().hex[:16]}"
            seed = spec.seed if spec.seed is not None else uuid.uuid4().int % (1 << 31)
            stream = await asyncio.to_thread(replica.engine.open_stream, spec.avatar_id, spec.fps, spec.head_motion, seed)
            w, h = stream.size
            size = spec.size or (w - w % 2, h - h % 2)
            speech = self.registry.speech_engine(spec.tts_engine)
            session = StreamSession(
                session_id=session_id, avatar_id=spec.avatar_id, stream=stream, fps=spec.fps, size=size,
                speech=speech.engine, voice=spec.voice, language=spec.language, emotion=spec.emotion,
                ahead_frames=self.config.render_ahead_frames, viewer_buffer=self.config.viewer_buffer_ticks,
                audio_lookahead_ms=self.config.audio_lookahead_ms, idle_seed=seed, on_closed=self._closed,
            )
            gauge = contextlib.ExitStack()
            gauge.enter_context(self.metrics.stream_session())
            self._sessions[session_id] = session
            self._gauges[session_id] = gauge
            session.start()
        finally:
            self._reserved -= 1
        log.info("stream session created", extra={"session_id": session_id, "avatar_id": spec.avatar_id,
                                                   "fps": spec.fps, "size": f"{size[0]}x{size[1]}"})
        return session

    def _closed(self, session: StreamSession) -> None:
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
            gauge = self._gauges.pop(session.session_id, None)
            if gauge is not None:
                gauge.close()

    def get(self, session_id: str) -> StreamSession:
        """The open session, or NotFound naming it."""
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise NotFound(f"no streaming session {session_id!r} (it ended, or never was)")
        return session

    async def delete(self, session_id: str) -> None:
        """End a session now."""
        await self.get(session_id).close()
