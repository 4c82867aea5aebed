"""WebRTC viewers of a stream session (aiortc): `POST /stream/sessions/{id}/offer` and the tracks behind it.

Each viewer gets its own peer connection and its own `Subscription`; one subscription feeds both the
viewer's audio and video track (`ViewerFeed`), so the audio and the video of a tick leave together:
video pts = index * 90000 / fps (time base 1/90000), audio pts = index * samples_per_tick (1/48000).
aiortc's Opus encoder takes its timestamps from the count of samples it was given, not from the
frames' pts, so the audio track hands it 20 ms frames (960 samples, one Opus packet each: a longer
frame would become two packets with one RTP timestamp) and fills ticks this viewer lost with
silence: the two clocks stay equal however many ticks a slow viewer drops. Both tracks deliver a
tick at the same wall-clock time (one anchor per viewer), so the RTCP sender reports of the two
streams map their RTP times to the same NTP time and a browser lines them up.

A viewer never touches another viewer's state: its own subscription (a slow one drops its own
ticks), its own encoders (aiortc makes one per sender). A connection that fails or closes closes
its subscription and the peer connection; the end of the session (the subscription raises) closes
every viewer's peer connection; the app's shutdown closes all of them.

ICE: STREAM_ICE_SERVERS (STUN/TURN) and STREAM_ICE_LOOPBACK. aioice gathers host candidates from
`aioice.ice.get_host_addresses`, which leaves out 127.0.0.1; `enable_loopback_candidates` wraps it
so that loopback is added when configured, or when the host has no other address (a network
namespace with only `lo` up), where there would be no candidate at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import logging
import re
import time
import uuid
from typing import Any, Callable, Literal, Optional

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, Field

from gpu_service.errors import Overloaded, ValidationFailed
from gpu_service.http import require_json
from gpu_service.streaming.media import SAMPLE_RATE, SessionClosed, samples_per_tick

log = logging.getLogger("gpu_service.streaming.webrtc")

AUDIO_RATE = SAMPLE_RATE
"""Opus's rate and the session's: no resampling anywhere."""

OPUS_FRAME = 960
"""Samples of one 20 ms Opus packet, as aiortc's encoder cuts them (aiortc.codecs.opus.SAMPLES_PER_FRAME)."""

VIDEO_CLOCK = 90_000
"""RTP clock of video."""

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)

FEED_BUFFER_TICKS = 12
"""Ticks a viewer's track may hold before it drops its oldest (about half a second at 25 fps)."""

LATE_REANCHOR_S = 0.25
"""A tick this late for its slot moves the viewer's anchor (no burst to catch up, no latency kept)."""

SILENCE_FILL_MAX_S = 10.0
"""Longest gap of lost ticks whose audio is filled with silence (past it the audio clock skips)."""

MAX_SDP_CHARS = 64 * 1024
"""Longest offer accepted; browsers' offers are 3-8 KB."""


# -- loopback host candidates -------------------------------------------------------------------------

_loopback = {"wanted": False, "installed": False}


def enable_loopback_candidates(wanted: bool) -> None:
    """Gather ICE host candidates on 127.0.0.1 too when `wanted`, or when the host has no other address.

    aioice calls `aioice.ice.get_host_addresses` by its module name for every connection, so the wrapper
    installed here is process-wide; `wanted` is the service's setting (the last app built decides).
    """
    import aioice.ice

    _loopback["wanted"] = bool(wanted)
    if _loopback["installed"]:
        return
    original = aioice.ice.get_host_addresses

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = original(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
        if use_ipv4 and "127.0.0.1" not in addresses and (_loopback["wanted"] or not addresses):
            addresses = [*addresses, "127.0.0.1"]
        return addresses

    get_host_addresses.__wrapped__ = original  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = get_host_addresses
    _loopback["installed"] = True


def ice_servers(settings: Any) -> list:
    """STREAM_ICE_SERVERS as aiortc's RTCIceServer list; empty (not aiortc's Google default) when unset."""
    from aiortc import RTCIceServer

    return [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
            for s in settings.stream.ice_servers]


def video_codec_preferences(names: list[str]) -> list:
    """aiortc's capabilities of the named video codecs, in the given order (RTX kept for each)."""
    from aiortc import RTCRtpSender

    caps = RTCRtpSender.getCapabilities("video").codecs
    wanted = []
    for name in names:
        wanted += [c for c in caps if c.mimeType.lower() == f"video/{name.lower()}"]
    wanted += [c for c in caps if c.mimeType.lower() == "video/rtx"]
    return wanted


# -- one viewer's feed -----------------------------------------------------------------------------------

class ViewerFeed:
    """One viewer's Subscription, read by one pump and shared by the viewer's audio and video track.

    Each track has its own short buffer (a track whose sender is not reading yet, or is slow, drops its
    own oldest ticks). Both deliver a tick at the same wall-clock slot: anchor + (index - anchor_index) / fps.
    """

    def __init__(self, subscription: Any, fps: int, on_end: Optional[Callable[[], None]] = None,
                 kinds: tuple[str, ...] = ("audio", "video")) -> None:
        self.subscription = subscription
        self.fps = int(fps)
        self.samples_per_tick = samples_per_tick(self.fps)
        self._on_end = on_end
        self._buffers: dict[str, collections.deque] = {k: collections.deque(maxlen=FEED_BUFFER_TICKS)
                                                        for k in kinds}
        self._wake: dict[str, asyncio.Event] = {k: asyncio.Event() for k in kinds}
        self._started: dict[str, bool] = {"audio": False, "video": False}
        self._anchor: Optional[tuple[float, int]] = None  # (monotonic time, tick index)
        self.ended = False
        self.end_reason: Optional[str] = None
        self.ticks_in = 0
        self.dropped = {"audio": 0, "video": 0}   # lost from a full track buffer
        self.skipped = {"audio": 0, "video": 0}   # left behind when the track started (before it connected)
        self._pump: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Start reading the subscription (at once: the end of the session is seen even before the viewer connects)."""
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run(), name="webrtc-feed")

    async def _run(self) -> None:
        reason = "closed"
        try:
            while True:
                tick = await self.subscription.get()
                self.ticks_in += 1
                for kind, buf in self._buffers.items():
                    if len(buf) == buf.maxlen:
                        self.dropped[kind] += 1
                    buf.append(tick)
                    self._wake[kind].set()
        except asyncio.CancelledError:
            reason = "closed"
        except SessionClosed:
            reason = "session closed"
        except Exception as exc:  # the session failed: this feed is over all the same
            reason = f"session failed: {type(exc).__name__}"
            log.warning("stream feed failed", extra={"why": repr(exc)})
        finally:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.end_reason = reason
        for event in self._wake.values():
            event.set()
        with contextlib.suppress(Exception):
            self.subscription.close()
        if self._on_end is not None:
            self._on_end()

    def close(self) -> None:
        """The viewer left: stop the pump and close the subscription (idempotent)."""
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        self._finish("closed")

    def slot(self, index: float) -> float:
        """Wall-clock time (monotonic) at which tick `index` (fractional for audio inside a tick) goes out."""
        assert self._anchor is not None
        t0, i0 = self._anchor
        return t0 + (index - i0) / self.fps

    async def next(self, kind: Literal["audio", "video"]) -> Any:
        """The next tick for `kind`'s track; raises MediaStreamError once the feed has ended."""
        from aiortc.mediastreams import MediaStreamError

        buf, wake = self._buffers[kind], self._wake[kind]
        while not buf:
            if self.ended:
                raise MediaStreamError
            wake.clear()
            await wake.wait()
        if not self._started[kind]:
            # A track's first tick: the anchor's if the other track set it, else the newest (no start-up latency).
            self._started[kind] = True
            if self._anchor is not None:
                while len(buf) > 1 and buf[0].index < self._anchor[1]:
                    buf.popleft()
                    self.skipped[kind] += 1
            else:
                while len(buf) > 1:
                    buf.popleft()
                    self.skipped[kind] += 1
        tick = buf.popleft()
        if self._anchor is None:
            self._anchor = (time.monotonic(), tick.index)
        return tick

    async def wait_slot(self, index: float) -> None:
        """Sleep until `index`'s slot; a tick late by more than LATE_REANCHOR_S moves the anchor to now."""
        now = time.monotonic()
        due = self.slot(index)
        if now - due > LATE_REANCHOR_S:
            self._anchor = (now, index)
            return
        if due > now:
            await asyncio.sleep(min(due - now, 1.0))


def _tracks():
    """The aiortc track classes (aiortc is imported only when a viewer connects)."""
    import av
    from aiortc import MediaStreamTrack

    class SessionVideoTrack(MediaStreamTrack):
        """The session's frames: pts = index * 90000 / fps at 1/90000."""

        kind = "video"

        def __init__(self, feed: ViewerFeed) -> None:
            super().__init__()
            self.feed = feed
            self.frames_sent = 0

        async def recv(self):
            tick = await self.feed.next("video")
            await self.feed.wait_slot(tick.index)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(tick.frame), format="rgb24")
            frame.pts = tick.index * VIDEO_CLOCK // self.feed.fps
            frame.time_base = VIDEO_TIME_BASE
            self.frames_sent += 1
            return frame

        def stop(self) -> None:
            super().stop()

    class SessionAudioTrack(MediaStreamTrack):
        """The session's audio in 20 ms s16 mono 48 kHz frames; pts = sample position (index * samples_per_tick)."""

        kind = "audio"

        def __init__(self, feed: ViewerFeed) -> None:
            super().__init__()
            self.feed = feed
            self._pending = np.zeros(0, dtype=np.int16)
            self._position: Optional[int] = None  # sample position of _pending[0] on the session clock
            self.samples_sent = 0
            self.silence_filled = 0

        async def _fill(self) -> None:
            spt = self.feed.samples_per_tick
            while len(self._pending) < OPUS_FRAME:
                tick = await self.feed.next("audio")
                start = tick.index * spt
                if self._position is None:
                    self._position = start
                end = self._position + len(self._pending)
                if start < end:
                    continue  # a tick already sent (cannot happen with a well-behaved subscription)
                gap = start - end
                if gap > SILENCE_FILL_MAX_S * AUDIO_RATE:
                    log.warning("audio gap not filled", extra={"gap_s": gap / AUDIO_RATE})
                    self._position, self._pending = start - len(self._pending), self._pending
                    gap = 0
                audio = np.asarray(tick.audio, dtype=np.int16).reshape(-1)
                if gap:
                    self.silence_filled += gap
                    audio = np.concatenate([np.zeros(gap, np.int16), audio])
                self._pending = np.concatenate([self._pending, audio])

        async def recv(self):
            await self._fill()
            chunk, self._pending = self._pending[:OPUS_FRAME], self._pending[OPUS_FRAME:]
            position = self._position
            self._position += OPUS_FRAME
            await self.feed.wait_slot(position / self.feed.samples_per_tick)
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts = position
            frame.time_base = AUDIO_TIME_BASE
            self.samples_sent += OPUS_FRAME
            return frame

    return SessionVideoTrack, SessionAudioTrack


def _encoder(codec_name: Optional[str], bitrate: int, preset: str) -> Any:
    """The video encoder of one viewer's sender: aiortc's, started at `bitrate`; H.264 at x264 `preset`.

    aiortc's H.264 encoder leaves libx264 at its default preset (medium), 3-4x the CPU of veryfast for the
    same bitrate, and lets x264 start a thread pool per viewer; this one differs only in those options.
    """
    from aiortc.codecs.h264 import H264Encoder
    from aiortc.codecs.vpx import Vp8Encoder

    if codec_name is None or codec_name.lower() not in ("h264", "vp8"):
        return None
    if codec_name.lower() == "vp8":
        encoder = Vp8Encoder()
        encoder.target_bitrate = bitrate
        return encoder

    class PresetH264Encoder(H264Encoder):
        def _encode_frame(self, frame, force_keyframe):
            import av

            if self.codec and (frame.width != self.codec.width or frame.height != self.codec.height
                               or abs(self.target_bitrate - self.codec.bit_rate) / self.codec.bit_rate > 0.1):
                self.buffer_data, self.buffer_pts, self.codec = b"", None, None
            frame.pict_type = av.video.frame.PictureType.I if force_keyframe else av.video.frame.PictureType.NONE
            if self.codec is None:
                self.codec = av.CodecContext.create("libx264", "w")
                self.codec.width, self.codec.height = frame.width, frame.height
                self.codec.bit_rate = self.target_bitrate
                self.codec.pix_fmt = "yuv420p"
                self.codec.framerate = fractions.Fraction(30, 1)
                self.codec.time_base = fractions.Fraction(1, 30)
                self.codec.options = {"level": "31", "tune": "zerolatency", "preset": preset, "threads": "1"}
                self.codec.profile = "Baseline"
            data = b"".join(bytes(p) for p in self.codec.encode(frame))
            if data:
                yield from self._split_bitstream(data)

    encoder = PresetH264Encoder()
    encoder.target_bitrate = bitrate
    return encoder


# -- peers -------------------------------------------------------------------------------------------------

class Viewer:
    """One viewer: its peer connection, feed and tracks."""

    def __init__(self, viewer_id: str, session_id: str, pc: Any, feed: ViewerFeed, video: Any, audio: Any) -> None:
        self.viewer_id, self.session_id = viewer_id, session_id
        self.pc, self.feed, self.video, self.audio = pc, feed, video, audio
        self.created = time.monotonic()
        self.closed = False
        self.video_codec: Optional[str] = None
        self.video_sender: Any = None


class WebRtcPeers:
    """Every WebRTC viewer of the app, by session; closes them when they fail, when their session ends, at shutdown."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        config = settings.stream
        self.viewers: dict[str, dict[str, Viewer]] = {}
        self._tasks: set[asyncio.Task] = set()       # closings under way
        self._deadlines: set[asyncio.Task] = set()   # connect deadlines
        self.bitrate = config.video_bitrate
        self.codecs = list(config.video_codecs)
        self.max_viewers = config.max_viewers
        self.connect_timeout_s = config.connect_timeout_s
        self.x264_preset = config.x264_preset
        enable_loopback_candidates(config.ice_loopback)

    def count(self, session_id: Optional[str] = None) -> int:
        """Open viewers of one session, or of all."""
        if session_id is not None:
            return len(self.viewers.get(session_id, {}))
        return sum(len(v) for v in self.viewers.values())

    def _spawn(self, coro, tasks: Optional[set] = None) -> None:
        tasks = self._tasks if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def answer(self, session: Any, sdp: str) -> tuple[str, Viewer]:
        """Answer a viewer's offer with a peer connection sending `session`'s audio and video.

        A bad offer is a ValidationFailed naming `sdp`; nothing is left open when it fails.
        """
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        session_id = session.session_id
        if self.count(session_id) >= self.max_viewers:
            raise Overloaded(f"session {session_id} already has {self.max_viewers} viewers (STREAM_MAX_VIEWERS)",
                             headers={"Retry-After": "5"})
        kinds = _check_offer_text(sdp)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers(self.settings)))
        subscription = None
        try:
            VideoTrack, AudioTrack = _tracks()
            # Our transceivers first, so the offer's m-lines take them (and the video codec preference);
            # only for the kinds offered (aiortc cannot answer with a transceiver no m-line took).
            video_tr = pc.addTransceiver("video", direction="sendonly") if "video" in kinds else None
            audio_tr = pc.addTransceiver("audio", direction="sendonly") if "audio" in kinds else None
            if video_tr is not None:
                video_tr.setCodecPreferences(video_codec_preferences(self.codecs))
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except Exception as exc:  # aiortc's parser raises ValueError, KeyError, IndexError... on bad text
                raise ValidationFailed(f"sdp: not a usable offer ({_short(exc)})") from None
            wanted = {t.kind for t in pc.getTransceivers() if t.mid is not None
                      and getattr(t, "_offerDirection", None) in ("sendonly", "sendrecv")}
            if not wanted:
                raise ValidationFailed("sdp: the offer receives neither audio nor video "
                                       "(add a recvonly audio and video transceiver)")
            subscription = session.subscribe()
            viewer_id = uuid.uuid4().hex[:12]
            viewer: Optional[Viewer] = None

            def on_end() -> None:
                if viewer is not None:
                    self._spawn(self.close_viewer(viewer, viewer.feed.end_reason or "closed"))

            feed = ViewerFeed(subscription, int(session.fps), on_end=on_end,
                              kinds=tuple(k for k, t in (("audio", audio_tr), ("video", video_tr)) if t is not None))
            video, audio = VideoTrack(feed), AudioTrack(feed)
            if video_tr is not None:
                video_tr.sender.replaceTrack(video)
            if audio_tr is not None:
                audio_tr.sender.replaceTrack(audio)
            viewer = Viewer(viewer_id, session_id, pc, feed, video, audio)
            viewer.video_sender = video_tr.sender if video_tr is not None else None
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except BaseException:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    subscription.close()
            await pc.close()
            raise
        viewer.video_codec = _negotiated(video_tr) if video_tr is not None else None
        if video_tr is not None:
            # Our encoder in place of the one aiortc would make at the first frame (it reads this attribute:
            # `if self.__encoder is None: self.__encoder = get_encoder(codec)`); REMB moves its bitrate later.
            encoder = _encoder(viewer.video_codec, self.bitrate, self.x264_preset)
            if encoder is not None:
                video_tr.sender._RTCRtpSender__encoder = encoder

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close_viewer(viewer, f"connection {pc.connectionState}")

        self.viewers.setdefault(session_id, {})[viewer_id] = viewer
        feed.start()
        self._spawn(self._connect_deadline(viewer), self._deadlines)
        log.info("webrtc viewer", extra={"session_id": session_id, "viewer_id": viewer_id,
                                         "codec": viewer.video_codec, "viewers": self.count(session_id)})
        return pc.localDescription.sdp, viewer

    async def _connect_deadline(self, viewer: Viewer) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if not viewer.closed and viewer.pc.connectionState != "connected":
            await self.close_viewer(viewer, "not connected in time")

    async def close_viewer(self, viewer: Viewer, reason: str = "closed") -> None:
        """Close one viewer: its subscription, then its peer connection (idempotent)."""
        if viewer.closed:
            return
        viewer.closed = True
        viewers = self.viewers.get(viewer.session_id, {})
        viewers.pop(viewer.viewer_id, None)
        if not viewers:
            self.viewers.pop(viewer.session_id, None)
        viewer.feed.close()
        with contextlib.suppress(Exception):
            await viewer.pc.close()
        log.info("webrtc viewer left", extra={"session_id": viewer.session_id, "viewer_id": viewer.viewer_id,
                                              "why": reason, "frames": viewer.video.frames_sent})

    async def close_session(self, session_id: str) -> None:
        """Close every viewer of a session (its end also closes them, through their subscriptions)."""
        await asyncio.gather(*(self.close_viewer(v, "session closed")
                               for v in list(self.viewers.get(session_id, {}).values())))

    async def close_all(self) -> None:
        """Close every viewer (app shutdown)."""
        await asyncio.gather(*(self.close_viewer(v, "shutdown")
                               for vs in list(self.viewers.values()) for v in list(vs.values())))
        for task in list(self._deadlines):
            task.cancel()
        if self._tasks:  # closings already under way (a viewer that left just now) finish first
            await asyncio.wait(list(self._tasks), timeout=5.0)


def _negotiated(transceiver: Any) -> Optional[str]:
    """The codec a transceiver will send with (its first negotiated one)."""
    codecs = getattr(transceiver, "_codecs", None) or []
    return codecs[0].mimeType.split("/", 1)[1] if codecs else None


def _short(exc: BaseException) -> str:
    """An exception as a short line for a client: its type and first line, no trace."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_FINGERPRINT = re.compile(r"^a=fingerprint:(sha-1|sha-224|sha-256|sha-384|sha-512) [0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+$")


def _check_offer_text(sdp: str) -> set[str]:
    """The checks aiortc's parser does not make, named by field; the media kinds offered."""
    if len(sdp) > MAX_SDP_CHARS:
        raise ValidationFailed(f"sdp: longer than {MAX_SDP_CHARS} characters")
    lines = [line.strip() for line in sdp.strip().splitlines()]
    if not lines or lines[0] != "v=0":
        raise ValidationFailed("sdp: not a session description (it must start with v=0)")
    if not any(line.startswith(("m=audio ", "m=video ")) for line in lines):
        raise ValidationFailed("sdp: the offer has no audio or video media section (m=audio / m=video)")
    fingerprints = [line for line in lines if line.startswith("a=fingerprint:")]
    if not fingerprints:
        raise ValidationFailed("sdp: the offer has no DTLS fingerprint (a=fingerprint)")
    for line in fingerprints:
        if not _FINGERPRINT.match(line):
            raise ValidationFailed(f"sdp: malformed DTLS fingerprint {line[:80]!r}")
    if not any(line.startswith("a=ice-ufrag:") for line in lines):
        raise ValidationFailed("sdp: the offer has no ICE credentials (a=ice-ufrag)")
    return {line[2:7] for line in lines if line.startswith(("m=audio ", "m=video "))}


# -- HTTP ---------------------------------------------------------------------------------------------------

class OfferRequest(BaseModel):
    """A viewer's SDP offer."""

    model_config = {"extra": "forbid"}

    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"]


class AnswerResponse(BaseModel):
    """The service's SDP answer (ICE candidates included: no trickle)."""

    sdp: str
    type: Literal["answer"] = "answer"


def peers(app: FastAPI) -> WebRtcPeers:
    """The app's WebRTC viewers (made on first use)."""
    existing = getattr(app.state, "webrtc", None)
    if existing is None:
        existing = app.state.webrtc = WebRtcPeers(app.state.settings)
    return existing


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    peers(app)  # loopback candidates configured before the first offer
    with contextlib.suppress(ImportError):  # aiortc's import (~1 s) not on the first viewer's clock
        await asyncio.to_thread(_tracks)
    try:
        yield
    finally:
        webrtc = getattr(app.state, "webrtc", None)
        if webrtc is not None:
            await webrtc.close_all()


router = APIRouter(tags=["stream"], lifespan=_lifespan)


@router.post("/stream/sessions/{session_id}/offer", response_model=AnswerResponse,
             dependencies=[Depends(require_json)])
async def offer(session_id: str, body: OfferRequest, request: Request) -> AnswerResponse:
    """Answer a viewer's WebRTC offer: one audio and one video track of the session (H.264, else VP8).

    Send a non-trickle offer (after ICE gathering) with recvonly audio and video; the answer carries
    the service's candidates. Each viewer is independent of the others.
    """
    session = request.app.state.streams.get(session_id)  # unknown: the manager's 404
    sdp, _ = await peers(request.app).answer(session, body.sdp)
    return AnswerResponse(sdp=sdp)
