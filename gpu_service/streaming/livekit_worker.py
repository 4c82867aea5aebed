"""A LiveKit room worker: one stream session published into a room as a voice agent's face.

The worker joins the room with the LiveKit Python SDK, publishes one video track (H.264, one
layer, 25 fps, about 2 Mbps) and one audio track, both fed from the same `MediaTick`s of its
session, and speaks LiveKit Agents' avatar protocol with the agent it stands for:

- the agent's speech arrives as byte streams on topic `lk.audio_stream` (attributes
  `sample_rate`, `num_channels`; s16 interleaved PCM; one stream per utterance): each stream is
  one `session.open_audio(...)` utterance, its chunks pushed as they come, its end `end()`;
- RPC `lk.clear_buffer` interrupts the session; the utterances it cut short are answered with
  `lk.playback_finished {playback_position, interrupted: true}`;
- each utterance that plays out is answered with `lk.playback_finished {..., interrupted: false}`,
  and `lk.playback_started` is sent when its first audio plays (agents that do not listen for it
  answer "unsupported method" once, and are not asked again).

`lk.playback_finished` goes out exactly once per stream the agent sent, from the session's
`speech_finished` events (a fallback timer covers an interrupted utterance whose event does
not come). The worker leaves when the room disconnects, the agent leaves (or never comes) or the
session ends, and ends its session when it leaves.

`rtc.AVSynchronizer` (in 1.0.25) is not used: it paces video with an FPS controller of its own, while the
session's clock already paces the ticks and pairs each frame with its audio; a second clock could only
let the two drift. Instead each frame is captured when its audio leaves the AudioSource's queue.

The room is reached through `RoomPort`, a small interface at the SDK's boundary: `LiveKitRoom`
adapts `livekit.rtc.Room` (1.0.25) to it, and the tests drive the worker through a stand-in that
hands it the SDK's own `ByteStreamReader`s and `RpcInvocationData`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Mapping, Optional, Protocol, Union

import numpy as np
from livekit import rtc

log = logging.getLogger("gpu_service.livekit")

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"
RPC_PLAYBACK_STARTED = "lk.playback_started"
ATTRIBUTE_PUBLISH_ON_BEHALF = "lk.publish_on_behalf"
"""The avatar's token attribute naming the agent participant it publishes for (livekit-agents sets it)."""

STREAM_IDLE_TIMEOUT_S = 10.0
"""An audio stream with no chunk nor trailer for this long is taken as ended (its trailer was lost)."""

RPC_TIMEOUT_S = 5.0
RPC_TRIES = 3


# --- the SDK boundary -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PublishSpec:
    """What the worker publishes: one video and one audio track of the session's size and rate."""

    width: int
    height: int
    fps: int
    sample_rate: int
    video_max_bitrate: int
    audio_queue_ms: int


def video_publish_options(spec: PublishSpec) -> rtc.TrackPublishOptions:
    """H.264, simulcast off (one layer at the session's own size), `fps` and the bitrate ceiling, camera source."""
    return rtc.TrackPublishOptions(
        source=rtc.TrackSource.SOURCE_CAMERA,
        video_codec=rtc.VideoCodec.H264,
        simulcast=False,
        video_encoding=rtc.VideoEncoding(max_framerate=float(spec.fps), max_bitrate=spec.video_max_bitrate),
    )


def audio_publish_options() -> rtc.TrackPublishOptions:
    """The avatar's voice, published as its microphone (dtx off: silence between utterances is still sent)."""
    return rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE, dtx=False)


def video_frame(rgb: np.ndarray) -> rtc.VideoFrame:
    """A tick's (H, W, 3) uint8 RGB frame as the SDK's RGB24 VideoFrame (one copy)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 frame, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    return rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, np.ascontiguousarray(rgb).data)


def audio_frame(samples: np.ndarray, sample_rate: int) -> rtc.AudioFrame:
    """A tick's int16 mono audio as the SDK's AudioFrame."""
    pcm = np.ascontiguousarray(samples, dtype=np.int16)
    return rtc.AudioFrame(pcm.data, sample_rate, 1, int(pcm.shape[0]))


class MediaOut(Protocol):
    """The published tracks' sources."""

    def audio_delay_s(self) -> float:
        """How long until audio captured now starts playing out (what the audio source holds queued)."""
        ...

    def capture_video(self, frame: rtc.VideoFrame, timestamp_us: int) -> None: ...

    async def capture_audio(self, frame: rtc.AudioFrame) -> None: ...

    async def aclose(self) -> None: ...


ByteStreamHandler = Callable[[rtc.ByteStreamReader, str], None]
RpcHandler = Callable[[rtc.RpcInvocationData], Union[str, Awaitable[str]]]
RoomEvent = Literal["participant_connected", "participant_disconnected", "disconnected"]


class RoomPort(Protocol):
    """The part of a LiveKit room the worker uses. Callbacks: participant_connected(identity, is_agent),
    participant_disconnected(identity), disconnected(reason: str)."""

    async def connect(self, url: str, token: str) -> None: ...

    @property
    def local_identity(self) -> str: ...

    @property
    def local_attributes(self) -> Mapping[str, str]: ...

    def remote_participants(self) -> dict[str, bool]:
        """identity -> whether it is an agent participant."""
        ...

    async def publish(self, spec: PublishSpec) -> MediaOut: ...

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None: ...

    def register_rpc_method(self, method: str, handler: RpcHandler) -> None: ...

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float) -> str: ...

    def on(self, event: RoomEvent, callback: Callable[..., None]) -> None: ...

    async def disconnect(self) -> None: ...


class _RtcMedia:
    """MediaOut over the SDK's VideoSource and AudioSource."""

    def __init__(self, video: rtc.VideoSource, audio: rtc.AudioSource) -> None:
        self.video, self.audio = video, audio

    def audio_delay_s(self) -> float:
        return self.audio.queued_duration

    def capture_video(self, frame: rtc.VideoFrame, timestamp_us: int) -> None:
        self.video.capture_frame(frame, timestamp_us=timestamp_us)

    async def capture_audio(self, frame: rtc.AudioFrame) -> None:
        await self.audio.capture_frame(frame)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            self.audio.clear_queue()
        await self.audio.aclose()
        await self.video.aclose()


def rtc_media(spec: PublishSpec) -> tuple[_RtcMedia, rtc.LocalVideoTrack, rtc.LocalAudioTrack]:
    """The SDK's sources and local tracks for `spec` (no room needed to build them)."""
    video = rtc.VideoSource(spec.width, spec.height)
    audio = rtc.AudioSource(spec.sample_rate, 1, queue_size_ms=spec.audio_queue_ms)
    return (_RtcMedia(video, audio), rtc.LocalVideoTrack.create_video_track("avatar_video", video),
            rtc.LocalAudioTrack.create_audio_track("avatar_audio", audio))


def _is_agent(participant: rtc.Participant) -> bool:
    return participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


class LiveKitRoom:
    """RoomPort on a real `livekit.rtc.Room`."""

    def __init__(self, room: Optional[rtc.Room] = None) -> None:
        self.room = room or rtc.Room()
        self.publications: list[rtc.LocalTrackPublication] = []

    async def connect(self, url: str, token: str) -> None:
        # Nothing to subscribe to: the agent's audio comes as byte streams, not as a track.
        await self.room.connect(url, token, rtc.RoomOptions(auto_subscribe=False))

    @property
    def local_identity(self) -> str:
        return self.room.local_participant.identity

    @property
    def local_attributes(self) -> Mapping[str, str]:
        return dict(self.room.local_participant.attributes)

    def remote_participants(self) -> dict[str, bool]:
        return {identity: _is_agent(p) for identity, p in self.room.remote_participants.items()}

    async def publish(self, spec: PublishSpec) -> MediaOut:
        media, video_track, audio_track = rtc_media(spec)
        local = self.room.local_participant
        self.publications.append(await local.publish_track(audio_track, audio_publish_options()))
        self.publications.append(await local.publish_track(video_track, video_publish_options(spec)))
        return media

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        self.room.register_byte_stream_handler(topic, handler)

    def register_rpc_method(self, method: str, handler: RpcHandler) -> None:
        self.room.local_participant.register_rpc_method(method, handler)

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float) -> str:
        return await self.room.local_participant.perform_rpc(
            destination_identity=destination_identity, method=method, payload=payload,
            response_timeout=response_timeout)

    def on(self, event: RoomEvent, callback: Callable[..., None]) -> None:
        if event == "participant_connected":
            self.room.on("participant_connected", lambda p: callback(p.identity, _is_agent(p)))
        elif event == "participant_disconnected":
            self.room.on("participant_disconnected", lambda p: callback(p.identity))
        elif event == "disconnected":
            self.room.on("disconnected", lambda reason: callback(rtc.DisconnectReason.Name(reason)
                                                                if isinstance(reason, int) else str(reason)))
        else:
            raise ValueError(f"unknown room event {event!r}")

    async def disconnect(self) -> None:
        await self.room.disconnect()


# --- the worker -------------------------------------------------------------------------------------

@dataclass
class _Utterance:
    """One agent stream turned into one session utterance."""

    utterance_id: str
    sample_rate: int
    pushed_s: float = 0.0
    started_at: Optional[float] = None
    cleared: bool = False


@dataclass
class WorkerFigures:
    """What a status answer shows of a worker."""

    frames_sent: int = 0
    frames_dropped: int = 0
    """Ticks the worker took too late and its subscription dropped (a starved event loop, never the session)."""
    utterances: int = 0
    interrupted: int = 0
    finished_sent: int = 0
    streams_refused: int = 0
    rpc_failures: int = 0
    fallback_answers: int = 0
    """Interrupted utterances answered by the fallback timer because their speech_finished did not come."""


@dataclass
class WorkerInfo:
    worker_id: str
    room_name: str
    livekit_url: str
    state: str
    created_at: float
    session_id: Optional[str]
    identity: Optional[str]
    agent_identity: Optional[str]
    reason: Optional[str]
    figures: WorkerFigures = field(default_factory=WorkerFigures)


class LiveKitWorker:
    """One session in one room, until the room, the agent or the session goes."""

    def __init__(self, *, room: RoomPort, session: Any, livekit_url: str, token: str, room_name: str,
                 agent_identity: Optional[str] = None, video_max_bitrate: int = 2_000_000,
                 audio_queue_ms: int = 100, join_timeout_s: float = 20.0, agent_wait_s: float = 60.0,
                 finished_fallback_s: float = 1.0,
                 release: Optional[Callable[[], Awaitable[None]]] = None,
                 worker_id: Optional[str] = None) -> None:
        self.worker_id = worker_id or "lkw_" + uuid.uuid4().hex[:16]
        self.room, self.session = room, session
        self.livekit_url, self._token, self.room_name = livekit_url, token, room_name
        self.agent_identity = agent_identity
        self._agent_hint = agent_identity
        self._video_max_bitrate, self._audio_queue_ms = video_max_bitrate, audio_queue_ms
        self._join_timeout_s, self._agent_wait_s = join_timeout_s, agent_wait_s
        self._finished_fallback_s = finished_fallback_s
        self._release = release
        self.state = "starting"
        self.reason: Optional[str] = None
        self.created_at = time.time()
        self.figures = WorkerFigures()
        self.identity: Optional[str] = None

        self._done = asyncio.Event()
        self._agent_here = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()
        self._media: Optional[MediaOut] = None
        self._feed = None
        self._streams: asyncio.Queue[rtc.ByteStreamReader] = asyncio.Queue()
        self._cut = asyncio.Event()
        self._reading: Optional[_Utterance] = None
        self._utterances: dict[str, _Utterance] = {}
        self._rpc_out: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._started_supported = True
        self._closed = False

    # -- life ---------------------------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, room_name=self.room_name, livekit_url=self.livekit_url,
                          state=self.state, created_at=self.created_at,
                          session_id=getattr(self.session, "session_id", None), identity=self.identity,
                          agent_identity=self.agent_identity, reason=self.reason, figures=self.figures)

    @property
    def playing(self) -> Optional[str]:
        """The agent's utterance the room hears now (speech_started seen, speech_finished not yet), if any."""
        return next((u.utterance_id for u in self._utterances.values() if u.started_at is not None), None)

    @property
    def running(self) -> bool:
        return self.state in ("starting", "joining", "running")

    async def join(self) -> None:
        """Join the room, publish the tracks and start speaking the protocol; raises if the room cannot be joined."""
        self.state = "joining"
        # Listen before any utterance exists, so that no speech_finished can be missed.
        self._feed = self.session.listen()
        # Byte streams may come as soon as the agent sees us: the handler is set before connecting.
        self.room.register_byte_stream_handler(AUDIO_STREAM_TOPIC, self._on_stream)
        self.room.on("participant_connected", self._on_participant_connected)
        self.room.on("participant_disconnected", self._on_participant_disconnected)
        self.room.on("disconnected", self._on_disconnected)
        try:
            await asyncio.wait_for(self.room.connect(self.livekit_url, self._token), self._join_timeout_s)
        except asyncio.TimeoutError:
            raise ConnectionError(f"the LiveKit server did not let the worker join within {self._join_timeout_s:g} s")
        self.identity = self.room.local_identity
        self.agent_identity = self.room.local_attributes.get(ATTRIBUTE_PUBLISH_ON_BEHALF) or self._agent_hint
        self.room.register_rpc_method(RPC_CLEAR_BUFFER, self._on_clear_buffer)
        spec = PublishSpec(width=self.session.size[0], height=self.session.size[1], fps=self.session.fps,
                           sample_rate=self.session.sample_rate, video_max_bitrate=self._video_max_bitrate,
                           audio_queue_ms=self._audio_queue_ms)
        self._media = await self.room.publish(spec)
        for identity, is_agent in self.room.remote_participants().items():
            self._on_participant_connected(identity, is_agent)
        self._tasks = [asyncio.create_task(coro, name=f"{self.worker_id}-{name}") for name, coro in (
            ("media", self._pump_media()), ("events", self._pump_events()), ("streams", self._consume_streams()),
            ("rpc", self._send_rpcs()), ("agent", self._await_agent()))]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)
        self.state = "running"
        log.info("livekit worker joined", extra={"worker_id": self.worker_id, "room": self.room_name,
                                                 "identity": self.identity, "agent": self.agent_identity})

    async def run(self) -> None:
        """Until the worker is told to leave (room, agent or session gone); then leaves and ends the session."""
        try:
            await self._done.wait()
        finally:
            await self.close()

    def _task_ended(self, task: asyncio.Task) -> None:
        """A part of the worker that fails takes the worker down with it: a deaf or mute avatar helps nobody."""
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("livekit worker task %s failed: %r", task.get_name(), exc, exc_info=exc,
                      extra={"worker_id": self.worker_id})
            self.stop(f"internal error in {task.get_name().rsplit('-', 1)[-1]}: {type(exc).__name__}: {exc}")

    def stop(self, reason: str) -> None:
        """Ask the worker to leave (idempotent; the first reason is kept)."""
        if self.reason is None:
            self.reason = reason
        self._done.set()

    async def close(self, failed: Optional[str] = None) -> None:
        """Leave the room and end the session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if failed is not None:
            self.reason = failed
        self._done.set()
        for task in self._tasks + list(self._side_tasks):
            task.cancel()
        for task in self._tasks + list(self._side_tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._feed is not None:
            with contextlib.suppress(Exception):
                self._feed.close()
        if self._media is not None:
            with contextlib.suppress(Exception):
                await self._media.aclose()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.room.disconnect(), 10)
        if self._release is not None:
            with contextlib.suppress(Exception):
                await self._release()
        self.state = "failed" if failed is not None else "ended"
        log.info("livekit worker left", extra={"worker_id": self.worker_id, "reason": self.reason})

    # -- room events --------------------------------------------------------------------------------

    def _on_participant_connected(self, identity: str, is_agent: bool) -> None:
        if self.agent_identity is None and is_agent:
            self.agent_identity = identity  # no publish_on_behalf attribute: the first agent is ours
        if identity == self.agent_identity:
            self._agent_here.set()

    def _on_participant_disconnected(self, identity: str) -> None:
        if identity == self.agent_identity:
            self.stop("the agent left the room")

    def _on_disconnected(self, reason: str) -> None:
        self.stop(f"disconnected from the room ({reason})")

    async def _await_agent(self) -> None:
        try:
            await asyncio.wait_for(self._agent_here.wait(), self._agent_wait_s)
        except asyncio.TimeoutError:
            self.stop(f"no agent joined within {self._agent_wait_s:g} s")

    def _from_agent(self, identity: str) -> bool:
        if self.agent_identity is None:
            self._on_participant_connected(identity, self.room.remote_participants().get(identity, False))
        return identity == self.agent_identity

    # -- media --------------------------------------------------------------------------------------

    async def _pump_media(self) -> None:
        """Each tick's frame and its 40 ms of audio from the same tick, so the tracks cannot drift apart; the
        frame is captured when its audio starts playing out of the audio source's queue (LIVEKIT__AUDIO_QUEUE_MS
        ahead), so the room sees the two together."""
        from gpu_service.streaming.media import SessionClosed

        media = self._media
        assert media is not None
        loop = asyncio.get_running_loop()
        sub = self.session.subscribe()
        rate = self.session.sample_rate
        pending: set[asyncio.TimerHandle] = set()

        def show(frame: rtc.VideoFrame, timestamp_us: int, handle_box: list) -> None:
            pending.discard(handle_box[0])
            if not self._closed:
                media.capture_video(frame, timestamp_us)

        try:
            while True:
                tick = await sub.get()
                frame, stamp = video_frame(tick.frame), int(round(tick.pts_s * 1_000_000))
                delay = media.audio_delay_s()
                if delay > 0.002:
                    box: list = []
                    box.append(loop.call_later(delay, show, frame, stamp, box))
                    pending.add(box[0])
                else:
                    media.capture_video(frame, stamp)
                await media.capture_audio(audio_frame(tick.audio, rate))
                self.figures.frames_sent += 1
                self.figures.frames_dropped = sub.dropped
        except SessionClosed:
            self.stop("the session ended")
        finally:
            sub.close()
            for handle in pending:
                handle.cancel()

    # -- the agent's audio --------------------------------------------------------------------------

    def _on_stream(self, reader: rtc.ByteStreamReader, sender_identity: str) -> None:
        if not self._from_agent(sender_identity):
            log.warning("audio stream from a participant that is not the agent ignored",
                        extra={"worker_id": self.worker_id, "sender": sender_identity})
            self._spawn(_drain(reader))
            return
        if self._reading is not None:
            self._cut.set()  # the agent never overlaps streams: the open one's trailer was lost
        self._streams.put_nowait(reader)

    async def _consume_streams(self) -> None:
        while True:
            reader = await self._streams.get()
            await self._play_stream(reader)

    async def _play_stream(self, reader: rtc.ByteStreamReader) -> None:
        try:
            rate, channels = stream_format(reader.info.attributes or {})
        except ValueError as exc:
            log.warning("audio stream refused: %s", exc, extra={"worker_id": self.worker_id})
            self.figures.streams_refused += 1
            self._notify_finished(0.0, interrupted=True)  # the agent still waits for this segment's end
            self._spawn(_drain(reader))
            return
        try:
            audio = self.session.open_audio(rate, channels)
        except Exception as exc:  # noqa: BLE001 - the session refused or ended: this stream is not played
            log.warning("audio stream not played: %s", exc, extra={"worker_id": self.worker_id})
            self.figures.streams_refused += 1
            self._notify_finished(0.0, interrupted=True)
            self._spawn(_drain(reader))
            return
        utt = _Utterance(audio.utterance_id, rate)
        self._utterances[utt.utterance_id] = utt
        self.figures.utterances += 1
        self._reading = utt
        self._cut.clear()
        frame_bytes = 2 * channels
        rest = b""
        ended = "trailer"
        try:
            while not utt.cleared:
                chunk = await self._next_chunk(reader)
                if chunk is None:
                    break
                if isinstance(chunk, str):
                    ended = chunk
                    break
                if utt.cleared:
                    break
                data = rest + chunk
                whole = len(data) - len(data) % frame_bytes
                rest = data[whole:]
                if whole:
                    audio.push(data[:whole])
                    utt.pushed_s += whole / frame_bytes / rate
        finally:
            self._reading = None
            with contextlib.suppress(Exception):
                audio.end()
        if ended not in ("trailer", "cleared"):
            log.warning("audio stream ended before its trailer (%s)", ended,
                        extra={"worker_id": self.worker_id, "utterance_id": utt.utterance_id})
        if utt.cleared:
            self._spawn(_drain(reader))  # what the agent still sends of a cleared stream is not played

    async def _next_chunk(self, reader: rtc.ByteStreamReader) -> Union[bytes, str, None]:
        """The next chunk, None at the trailer, or why the stream is taken as ended without one."""
        next_chunk = asyncio.ensure_future(reader.__anext__())
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            done, _ = await asyncio.wait({next_chunk, cut}, timeout=STREAM_IDLE_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
        if next_chunk in done:
            try:
                return next_chunk.result()
            except StopAsyncIteration:
                return None
        if cut in done and not (self._reading is not None and self._reading.cleared):
            # superseded: the chunks it sent before the newer stream began are already here; they still play
            try:
                return await asyncio.wait_for(next_chunk, 0.05)
            except StopAsyncIteration:
                return None
            except asyncio.TimeoutError:
                return "superseded by a newer stream"
        next_chunk.cancel()
        return "cleared" if cut in done else f"idle for {STREAM_IDLE_TIMEOUT_S:g} s"

    async def _on_clear_buffer(self, data: rtc.RpcInvocationData) -> str:
        """lk.clear_buffer: drop what is queued, interrupt the session; speech_finished answers each utterance."""
        if not self._from_agent(data.caller_identity):
            return "reject"
        while not self._streams.empty():  # streams not yet begun: never played
            self._spawn(_drain(self._streams.get_nowait()))
            self._notify_finished(0.0, interrupted=True)
        if self._reading is not None:
            self._reading.cleared = True
            self._cut.set()  # stop reading it now: what still comes of it is drained
        pending = list(self._utterances.values())
        self.session.interrupt()
        if pending:
            self.figures.interrupted += 1
        for utt in pending:
            self._spawn(self._finish_later(utt))
        return "ok"

    async def _finish_later(self, utt: _Utterance) -> None:
        """An interrupted utterance whose speech_finished does not come is answered anyway: the agent waits."""
        await asyncio.sleep(self._finished_fallback_s)
        if utt.utterance_id in self._utterances:
            played = 0.0 if utt.started_at is None else min(utt.pushed_s, time.monotonic() - utt.started_at)
            log.warning("no speech_finished for an interrupted utterance; answering the agent anyway",
                        extra={"worker_id": self.worker_id, "utterance_id": utt.utterance_id})
            self.figures.fallback_answers += 1
            self._finish(utt.utterance_id, played, interrupted=True)

    # -- the session's events -----------------------------------------------------------------------

    async def _pump_events(self) -> None:
        async for event in self._feed:
            kind = event.get("event")
            uid = event.get("utterance_id")
            if kind == "speech_started" and uid in self._utterances:
                self._utterances[uid].started_at = time.monotonic()
                if self._started_supported:
                    self._send_when_heard((RPC_PLAYBACK_STARTED, ""))
            elif kind == "speech_finished" and uid in self._utterances:
                self._finish(uid, float(event.get("position_s") or 0.0), bool(event.get("interrupted")))
            elif kind == "session_closed":
                break
        self.stop("the session ended")

    def _finish(self, utterance_id: str, position_s: float, interrupted: bool) -> None:
        """lk.playback_finished for this utterance, once: the utterance leaves the table as it is answered."""
        if self._utterances.pop(utterance_id, None) is not None:
            self._notify_finished(position_s, interrupted, when_heard=True)

    def _notify_finished(self, position_s: float, interrupted: bool, when_heard: bool = False) -> None:
        payload = json.dumps({"playback_position": round(max(0.0, position_s), 4), "interrupted": interrupted})
        if when_heard:
            self._send_when_heard((RPC_PLAYBACK_FINISHED, payload))
        else:
            self._rpc_out.put_nowait((RPC_PLAYBACK_FINISHED, payload))

    def _send_when_heard(self, item: tuple[str, str]) -> None:
        """Send once the room hears what the session released just now: the session's events come as ticks
        leave it, and the audio source holds up to LIVEKIT__AUDIO_QUEUE_MS more before playing them."""
        delay = self._media.audio_delay_s() if self._media is not None else 0.0
        if delay > 0.005:
            asyncio.get_running_loop().call_later(delay, self._rpc_out.put_nowait, item)
        else:
            self._rpc_out.put_nowait(item)

    async def _send_rpcs(self) -> None:
        """The notifications in order, each tried a few times (the agent may be busy)."""
        while True:
            method, payload = await self._rpc_out.get()
            if self.agent_identity is None:
                await self._agent_here.wait()
            if method == RPC_PLAYBACK_STARTED and not self._started_supported:
                continue
            for attempt in range(RPC_TRIES):
                try:
                    await self.room.perform_rpc(destination_identity=self.agent_identity, method=method,
                                                payload=payload, response_timeout=RPC_TIMEOUT_S)
                    if method == RPC_PLAYBACK_FINISHED:
                        self.figures.finished_sent += 1
                    break
                except Exception as exc:  # noqa: BLE001 - RpcError, or the SDK's own failure to send
                    if (method == RPC_PLAYBACK_STARTED and isinstance(exc, rtc.RpcError)
                            and exc.code == rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD):
                        self._started_supported = False  # the agent does not wait for playback_started
                        break
                    if attempt == RPC_TRIES - 1:
                        self.figures.rpc_failures += 1
                        log.error("%s failed after %d tries: %s", method, RPC_TRIES,
                                  getattr(exc, "message", None) or repr(exc), extra={"worker_id": self.worker_id})
                    else:
                        await asyncio.sleep(0.1)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)


def stream_format(attributes: Mapping[str, str]) -> tuple[int, int]:
    """(sample_rate, num_channels) of an lk.audio_stream, from its attributes, or ValueError saying what is wrong."""
    try:
        rate = int(attributes["sample_rate"])
        channels = int(attributes["num_channels"])
    except KeyError as exc:
        raise ValueError(f"the stream has no {exc.args[0]} attribute") from None
    except ValueError:
        raise ValueError(f"sample_rate and num_channels must be integers, got {dict(attributes)}") from None
    if not 8000 <= rate <= 96_000:
        raise ValueError(f"sample_rate {rate} is outside 8000..96000 Hz")
    if not 1 <= channels <= 8:
        raise ValueError(f"num_channels {channels} is outside 1..8")
    return rate, channels


async def _drain(reader: rtc.ByteStreamReader) -> None:
    """Read a stream to its end, bounded by the idle timeout, so the SDK frees it."""
    with contextlib.suppress(Exception):
        while True:
            await asyncio.wait_for(reader.__anext__(), STREAM_IDLE_TIMEOUT_S)
