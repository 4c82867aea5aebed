"""A stand-in LiveKit room at the SDK's boundary, for the room worker's tests (no LiveKit server can run here).

It implements `RoomPort` as `LiveKitRoom` does over `livekit.rtc.Room`, and plays the other side
as the SDK and a livekit-agents agent would:

- `connect` reads the token like the server (identity from `sub`, the participant's attributes from
  the `attributes` claim) and can refuse it;
- `publish` builds the SDK's real VideoSource/AudioSource and local tracks (`rtc_media`) and records
  every frame the worker captures into them, with the publish options it asked for;
- `send_audio_stream` delivers the agent's speech as the SDK delivers a byte stream: a real
  `rtc.ByteStreamReader` made from the stream's protobuf header, handed to the registered handler,
  then fed protobuf chunks and the trailer as the SDK's room does (`_on_chunk_update`,
  `_on_stream_close`), in 15 000-byte chunks as `ByteStreamWriter` cuts them;
- `call_rpc` invokes a registered method with `rtc.RpcInvocationData` as
  `LocalParticipant._handle_rpc_method_invocation` does (awaited within the response timeout);
- `perform_rpc` is the agent answering: it records each call, and answers lk.playback_started
  with UNSUPPORTED_METHOD like a `DataStreamAudioOutput` made without `wait_playback_start`.

What it cannot show: the server's signalling, WebRTC transport, H.264 encoding by libwebrtc,
and the SDK's FFI dispatch of real network events (see tests/streaming/test_livekit_sdk.py for
what of the SDK runs here without a server).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from livekit import rtc
from livekit.rtc._proto.room_pb2 import DataStream as proto_DataStream

from gpu_service.streaming.livekit_worker import (PublishSpec, audio_publish_options, rtc_media,
                                                  video_publish_options)

STREAM_CHUNK_SIZE = 15_000
"""The SDK's ByteStreamWriter sends at most this many bytes per chunk."""


def mint_token(*, api_key: str = "APItest", api_secret: str = "secret-for-tests-only-0123456789",
               identity: str = "avatar-worker", room: Optional[str] = "room-1", attributes: Optional[dict] = None,
               ttl_s: int = 600, room_join: bool = True, kind: Optional[str] = "agent") -> str:
    """An HS256 token shaped like livekit-api's AccessToken.to_jwt()."""
    import jwt

    video: dict = {"roomJoin": room_join}
    if room is not None:
        video["room"] = room
    now = int(time.time())
    claims = {"iss": api_key, "sub": identity, "nbf": now, "exp": now + ttl_s, "video": video, "name": identity}
    if kind:
        claims["kind"] = kind
    if attributes:
        claims["attributes"] = attributes
    return jwt.encode(claims, api_secret, algorithm="HS256")


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@dataclass
class RecordingMedia:
    """The SDK's real sources, with every frame the worker captured into them kept for the test."""

    spec: PublishSpec
    video_options: rtc.TrackPublishOptions
    audio_options: rtc.TrackPublishOptions
    video: list[tuple[int, rtc.VideoFrame]] = field(default_factory=list)
    audio: list[rtc.AudioFrame] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        self.real, self.video_track, self.audio_track = rtc_media(self.spec)

    video_at: list[float] = field(default_factory=list)
    """When each frame went into the VideoSource (time.monotonic)."""
    audio_plays_at: list[float] = field(default_factory=list)
    """When each audio frame starts playing out of the AudioSource, by the SDK's own queue accounting."""

    def audio_delay_s(self) -> float:
        return self.real.audio_delay_s()

    def capture_video(self, frame: rtc.VideoFrame, timestamp_us: int) -> None:
        self.real.capture_video(frame, timestamp_us)
        self.video.append((timestamp_us, frame))
        self.video_at.append(time.monotonic())

    async def capture_audio(self, frame: rtc.AudioFrame) -> None:
        self.audio_plays_at.append(time.monotonic() + self.real.audio_delay_s())
        await self.real.capture_audio(frame)  # paced by the SDK's AudioSource queue, as in a room
        self.audio.append(frame)

    def av_offsets(self) -> np.ndarray:
        """Per tick, when its frame was captured less when its audio starts playing (seconds)."""
        n = min(len(self.video_at), len(self.audio_plays_at))
        return np.asarray(self.video_at[:n]) - np.asarray(self.audio_plays_at[:n])

    async def aclose(self) -> None:
        self.closed = True
        await self.real.aclose()

    def audio_samples(self) -> np.ndarray:
        return np.concatenate([np.frombuffer(bytes(f.data), np.int16) for f in self.audio]) if self.audio \
            else np.zeros(0, np.int16)


class StandInRoom:
    """RoomPort for tests; see the module docstring."""

    def __init__(self, *, agent_identity: str = "agent-1", agent_present: bool = True,
                 refuse: Optional[str] = None, started_supported: bool = False) -> None:
        self.agent_identity = agent_identity
        self.participants: dict[str, bool] = {agent_identity: True} if agent_present else {}
        self.refuse = refuse
        self.started_supported = started_supported
        self.connected_with: Optional[tuple[str, str]] = None
        self.identity = ""
        self.attributes: dict[str, str] = {}
        self.media: Optional[RecordingMedia] = None
        self.byte_handlers: dict[str, Callable] = {}
        self.rpc_handlers: dict[str, Callable] = {}
        self.rpc_calls: list[tuple[str, str, str, float]] = []  # (destination, method, payload, time)
        self.callbacks: dict[str, list[Callable]] = {}
        self.disconnected = False
        self.connected = asyncio.Event()

    # -- RoomPort -----------------------------------------------------------------------------
    async def connect(self, url: str, token: str) -> None:
        if self.refuse:
            raise rtc.ConnectError(self.refuse)
        claims = _claims(token)
        self.connected_with = (url, token)
        self.identity = claims["sub"]
        self.attributes = dict(claims.get("attributes") or {})
        self.connected.set()

    @property
    def local_identity(self) -> str:
        return self.identity

    @property
    def local_attributes(self) -> dict[str, str]:
        return dict(self.attributes)

    def remote_participants(self) -> dict[str, bool]:
        return dict(self.participants)

    async def publish(self, spec: PublishSpec) -> RecordingMedia:
        self.media = RecordingMedia(spec, video_publish_options(spec), audio_publish_options())
        return self.media

    def register_byte_stream_handler(self, topic: str, handler: Callable) -> None:
        if topic in self.byte_handlers:  # as rtc.Room does
            raise ValueError(f"byte stream handler for topic '{topic}' already set")
        self.byte_handlers[topic] = handler

    def register_rpc_method(self, method: str, handler: Callable) -> None:
        self.rpc_handlers[method] = handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float) -> str:
        self.rpc_calls.append((destination_identity, method, payload, time.monotonic()))
        if destination_identity not in self.participants:
            raise rtc.RpcError._built_in(rtc.RpcError.ErrorCode.RECIPIENT_NOT_FOUND)
        if method == "lk.playback_started" and not self.started_supported:
            raise rtc.RpcError._built_in(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD)
        return "ok"

    def on(self, event: str, callback: Callable) -> None:
        self.callbacks.setdefault(event, []).append(callback)

    async def disconnect(self) -> None:
        self.disconnected = True

    # -- the other side -----------------------------------------------------------------------
    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks.get(event, []):
            cb(*args)

    def join(self, identity: str, is_agent: bool = True) -> None:
        self.participants[identity] = is_agent
        self._emit("participant_connected", identity, is_agent)

    def leave(self, identity: str) -> None:
        self.participants.pop(identity, None)
        self._emit("participant_disconnected", identity)

    def server_disconnects(self, reason: str = "SERVER_SHUTDOWN") -> None:
        self._emit("disconnected", reason)

    def finished_calls(self) -> list[dict]:
        return [json.loads(p) for _, m, p, _ in self.rpc_calls if m == "lk.playback_finished"]

    async def send_audio_stream(self, pcm: bytes, sample_rate: int, channels: int = 1, *,
                                sender: Optional[str] = None, realtime: float = 0.0, trailer: bool = True,
                                attributes: Optional[dict] = None, stop: Optional[asyncio.Event] = None) -> str:
        """The agent's speech as one byte stream on lk.audio_stream. `realtime` > 0 paces the chunks at that
        multiple of real time (livekit-agents pushes TTS audio as it comes, faster than it plays)."""
        sender = sender or self.agent_identity
        stream_id = uuid.uuid4().hex
        attrs = attributes if attributes is not None else {"sample_rate": str(sample_rate),
                                                           "num_channels": str(channels)}
        header = proto_DataStream.Header(stream_id=stream_id, topic="lk.audio_stream", mime_type="application/octet-stream",
                                         timestamp=int(time.time() * 1000), attributes=attrs,
                                         byte_header=proto_DataStream.ByteHeader(name="AUDIO_" + stream_id[:8]))
        reader = rtc.ByteStreamReader(header)
        handler = self.byte_handlers.get("lk.audio_stream")
        if handler is None:
            return stream_id  # the SDK ignores a stream on a topic nobody handles
        handler(reader, sender)
        bytes_per_s = sample_rate * channels * 2
        for index, start in enumerate(range(0, len(pcm), STREAM_CHUNK_SIZE)):
            if stop is not None and stop.is_set():
                break
            chunk = pcm[start:start + STREAM_CHUNK_SIZE]
            await reader._on_chunk_update(proto_DataStream.Chunk(stream_id=stream_id, chunk_index=index, content=chunk))
            if realtime > 0:
                await asyncio.sleep(len(chunk) / bytes_per_s / realtime)
            else:
                await asyncio.sleep(0)
        if trailer:
            await reader._on_stream_close(proto_DataStream.Trailer(stream_id=stream_id, reason=""))
        return stream_id

    async def call_rpc(self, method: str, payload: str = "", *, caller: Optional[str] = None,
                       response_timeout: float = 5.0) -> str:
        """An RPC from `caller` (the agent) to the worker, as the SDK invokes a registered method."""
        handler = self.rpc_handlers.get(method)
        if handler is None:
            raise rtc.RpcError._built_in(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD)
        data = rtc.RpcInvocationData(uuid.uuid4().hex, caller or self.agent_identity, payload, response_timeout)
        if asyncio.iscoroutinefunction(handler):
            return await asyncio.wait_for(handler(data), response_timeout)
        return handler(data)


def tone(seconds: float, sample_rate: int, channels: int = 1, freq: float = 220.0, level: float = 0.4) -> bytes:
    """s16 interleaved speech-like test audio: a tone with a 4 Hz syllable envelope."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = level * np.sin(2 * np.pi * freq * t) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    pcm = (x * 32767).astype("<i2")
    if channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1).reshape(-1)
    return pcm.tobytes()
