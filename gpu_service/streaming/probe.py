"""A WebRTC viewer that measures what it receives, and a test-pattern tick source to measure the transport with.

`StreamProbe` is an aiortc peer with recvonly audio and video: it posts its offer through a callable
(in-process ASGI client or a live service URL), decodes what arrives and records, for every video frame
and audio frame, its arrival time (time.monotonic) and its RTP pts (aiortc's receiver counts both
streams from their first packet, and the service starts both at the same tick). From those:

- offer -> first decoded frame, fps over a window, the 95th percentile of the interval between frames;
- the A/V offset by pts: offset(k) = arrival(video frame k) - arrival(audio sample k * samples_per_frame),
  k read from the video pts (positive: the video arrives later than its audio), at the network (each RTP
  timestamp's first packet: the transport's figure) and after aiortc decoded it (which adds the probe's own
  receive buffering: 80 ms for audio, 40 ms for video, so about -40 ms);
- the A/V offset by content, for sources that mark a tick in both streams (the test pattern: a white
  flash and a tone burst in the same tick): arrival of the flashed frame - arrival of the burst's onset,
  and the same difference in media time (pts), which is 0 when the sender paired them right.

`TestPatternSession` is a stand-in for a `StreamSession` as the transport sees it (session_id, fps,
subscribe() -> media.Subscription of media.MediaTicks), paced by the wall clock: a frame with the tick index
drawn as a bar code, a flash and a 1 kHz burst every `marker_every` ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Awaitable, Callable, Optional

import numpy as np

from gpu_service.streaming.media import SAMPLE_RATE, MediaTick, SessionClosed, Subscription, samples_per_tick


# -- test pattern -------------------------------------------------------------------------------------------

def pattern_frame(index: int, width: int, height: int, flash: bool) -> np.ndarray:
    """A grey frame with the index as a 16-bit bar code on top and a moving bar; all white when `flash`."""
    frame = np.full((height, width, 3), 255 if flash else 60, np.uint8)
    if not flash:
        bits = width // 16
        for b in range(16):
            if (index >> b) & 1:
                frame[: height // 8, b * bits:(b + 1) * bits] = 230
        x = (index * 4) % width
        frame[height // 2:, x:x + max(2, width // 32)] = (200, 40, 40)
    return frame


def read_pattern_index(frame: np.ndarray) -> int:
    """The index drawn by pattern_frame (after lossy coding: thresholded block means)."""
    height, width = frame.shape[:2]
    bits = width // 16
    band = frame[: height // 8].astype(np.float32).mean(axis=(0, 2)) if frame.ndim == 3 else \
        frame[: height // 8].astype(np.float32).mean(axis=0)
    value = 0
    for b in range(16):
        if band[b * bits + bits // 4:(b + 1) * bits - bits // 4].mean() > 145:
            value |= 1 << b
    return value


class TestPatternSession:
    """Ticks on the wall clock, fanned out to each open subscription (the transport's view of a StreamSession)."""

    __test__ = False  # not a pytest class

    def __init__(self, session_id: str = "pattern", fps: int = 25, size: tuple[int, int] = (256, 256),
                 marker_every: int = 25) -> None:
        self.session_id, self.fps, self.size = session_id, fps, size
        self.sample_rate = SAMPLE_RATE
        self.marker_every = marker_every
        self.closed = False
        self._subs: set[Subscription] = set()
        self._task: Optional[asyncio.Task] = None
        self.index = 0
        spt = samples_per_tick(fps)
        t = np.arange(spt) / SAMPLE_RATE
        self._burst = (12000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
        self._quiet = (300 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)

    @property
    def viewers(self) -> int:
        return len(self._subs)

    def subscribe(self, buffer: int = 8) -> Subscription:
        if self.closed:
            raise SessionClosed(self.session_id)
        sub = Subscription(buffer, on_close=self._subs.discard)
        self._subs.add(sub)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return sub

    def tick(self, index: int) -> MediaTick:
        w, h = self.size
        flash = index % self.marker_every == 0
        return MediaTick(index, index / self.fps, pattern_frame(index, w, h, flash),
                         self._burst if flash else self._quiet, None, 1.0 if flash else 0.0)

    async def _run(self) -> None:
        t0 = time.monotonic()
        while not self.closed:
            tick = self.tick(self.index)
            for sub in list(self._subs):
                sub._deliver(tick)
            self.index += 1
            delay = t0 + self.index / self.fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def close(self) -> None:
        self.closed = True
        for sub in list(self._subs):
            sub._end()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


# -- the measuring viewer -----------------------------------------------------------------------------------

def answer_codec(sdp: str, kind: str = "video") -> Optional[str]:
    """The first codec of the answer's `kind` media section (the one the sender uses)."""
    payloads: list[str] = []
    names: dict[str, str] = {}
    section = None
    for line in sdp.splitlines():
        if line.startswith("m="):
            section = line[2:].split(" ", 1)[0]
            if section == kind:
                payloads = line.split()[3:]
        elif section == kind and line.startswith("a=rtpmap:"):
            pt, rest = line[len("a=rtpmap:"):].split(" ", 1)
            names[pt] = rest.split("/", 1)[0]
    for pt in payloads:
        if pt in names and names[pt].lower() not in ("rtx", "red", "ulpfec"):
            return names[pt]
    return None


def _pctl(values: list[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


class StreamProbe:
    """A recvonly aiortc viewer that records arrival time and pts of every decoded video and audio frame.

    `video_marker(rgb)` / `audio_marker(samples)` return True for a marked frame (the test pattern's flash
    and burst); `keep_video` keeps the decoded frames' pixels (rgb arrays) for tests that read them.
    """

    def __init__(self, fps: int = 25, video_marker: Optional[Callable[[np.ndarray], bool]] = None,
                 audio_marker: Optional[Callable[[np.ndarray], bool]] = None, keep_video: int = 0,
                 on_video_frame: Optional[Callable[[np.ndarray, int], None]] = None) -> None:
        self.fps = fps
        self.samples_per_frame = SAMPLE_RATE // fps
        self.video: list[tuple[float, int]] = []          # (arrival, pts at 1/90000)
        self.audio: list[tuple[float, int, int]] = []     # (arrival, pts at 1/48000, samples)
        self.video_marks: list[tuple[float, int]] = []
        self.audio_marks: list[tuple[float, int]] = []
        self.kept: list[np.ndarray] = []
        self.rtp: dict[str, list[tuple[float, int]]] = {"audio": [], "video": []}  # (arrival, relative RTP ts)
        self.levels: list[float] = []                     # mean |sample| of each audio frame
        self._keep = keep_video
        self._video_marker, self._audio_marker = video_marker, audio_marker
        self._on_video_frame = on_video_frame
        self._was_marked = {"audio": False, "video": False}
        self.pc: Any = None
        self.t_offer: Optional[float] = None
        self.answer_sdp: Optional[str] = None
        self._readers: list[asyncio.Task] = []
        self._frame_event = asyncio.Event()
        self.ended = asyncio.Event()

    @property
    def codec(self) -> Optional[str]:
        return answer_codec(self.answer_sdp or "")

    @property
    def audio_codec(self) -> Optional[str]:
        return answer_codec(self.answer_sdp or "", "audio")

    async def connect(self, post_offer: Callable[[dict], Awaitable[dict]], timeout_s: float = 10.0) -> None:
        """Offer recvonly audio and video, post it, apply the answer; returns once the answer is set."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        for kind in ("video", "audio"):
            self._tap(kind, pc.addTransceiver(kind, direction="recvonly").receiver)

        @pc.on("track")
        def on_track(track) -> None:
            reader = self._read_video if track.kind == "video" else self._read_audio
            self._readers.append(asyncio.get_running_loop().create_task(reader(track)))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.ended.set()

        await pc.setLocalDescription(await pc.createOffer())
        self.t_offer = time.monotonic()
        answer = await asyncio.wait_for(post_offer({"sdp": pc.localDescription.sdp, "type": "offer"}), timeout_s)
        self.answer_sdp = answer["sdp"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    def _tap(self, kind: str, receiver: Any) -> None:
        """Record the arrival of each RTP timestamp's first packet, before aiortc's jitter buffers."""
        handle = receiver._handle_rtp_packet
        packets = self.rtp[kind]
        origin: list[int] = []

        async def tapped(packet, arrival_time_ms: int) -> None:
            if not origin:
                origin.append(packet.timestamp)
            ts = (packet.timestamp - origin[0]) % 2**32
            if not packets or ts > packets[-1][1]:
                packets.append((time.monotonic(), ts))
            await handle(packet, arrival_time_ms=arrival_time_ms)

        receiver._handle_rtp_packet = tapped

    def _mark(self, kind: str, marked: bool, arrival: float, pts: int) -> None:
        if marked and not self._was_marked[kind]:
            (self.video_marks if kind == "video" else self.audio_marks).append((arrival, pts))
        self._was_marked[kind] = marked

    async def _read_video(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                arrival = time.monotonic()
                self.video.append((arrival, int(frame.pts)))
                if self._video_marker or self._keep or self._on_video_frame:
                    rgb = frame.to_ndarray(format="rgb24")
                    if self._video_marker:
                        self._mark("video", bool(self._video_marker(rgb)), arrival, int(frame.pts))
                    if len(self.kept) < self._keep:
                        self.kept.append(rgb)
                    if self._on_video_frame:
                        self._on_video_frame(rgb, int(frame.pts))
                self._frame_event.set()
        self.ended.set()

    async def _read_audio(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                arrival = time.monotonic()
                samples = frame.to_ndarray().reshape(-1)
                self.audio.append((arrival, int(frame.pts), int(frame.samples)))
                self.levels.append(float(np.abs(samples.astype(np.float32)).mean()))
                if self._audio_marker:
                    self._mark("audio", bool(self._audio_marker(samples)), arrival, int(frame.pts))

    async def wait_video(self, frames: int, timeout_s: float = 10.0) -> bool:
        """Wait until `frames` video frames have arrived (False on timeout)."""
        deadline = time.monotonic() + timeout_s
        while len(self.video) < frames:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._frame_event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._frame_event.wait(), min(left, 0.5))
        return True

    def audio_level(self, seconds: float = 1.0) -> float:
        """Mean absolute sample value of the audio received in the last `seconds` (0 before any)."""
        frames = int(seconds * SAMPLE_RATE / 960)
        recent = self.levels[-frames:]
        return float(np.mean(recent)) if recent else 0.0

    async def wait_audio(self, samples: int, timeout_s: float = 10.0) -> bool:
        """Wait until `samples` audio samples have arrived (False on timeout)."""
        deadline = time.monotonic() + timeout_s
        while sum(a[2] for a in self.audio) < samples:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # -- figures --

    @property
    def first_frame_s(self) -> Optional[float]:
        """Offer posted -> first decoded video frame."""
        return self.video[0][0] - self.t_offer if self.video and self.t_offer is not None else None

    def window(self, seconds: Optional[float] = None) -> list[tuple[float, int]]:
        """The video frames of the last `seconds` (all when None)."""
        if seconds is None or not self.video:
            return list(self.video)
        end = self.video[-1][0]
        return [v for v in self.video if v[0] >= end - seconds]

    def fps_received(self, seconds: Optional[float] = None, skip_s: float = 0.0) -> Optional[float]:
        """Frames per second of arrival over the last `seconds` (after skipping the first `skip_s`)."""
        frames = [v for v in self.window(seconds) if not self.video or v[0] >= self.video[0][0] + skip_s]
        if len(frames) < 2:
            return None
        return (len(frames) - 1) / (frames[-1][0] - frames[0][0])

    def intervals(self, seconds: Optional[float] = None) -> list[float]:
        frames = self.window(seconds)
        return [b[0] - a[0] for a, b in zip(frames, frames[1:])]

    def p95_interval_s(self, seconds: Optional[float] = None) -> Optional[float]:
        return _pctl(self.intervals(seconds), 95)

    def rtp_fps(self, seconds: Optional[float] = None) -> Optional[float]:
        """Video frames per second at the network (first packet of each RTP timestamp) over the last `seconds`."""
        frames = self.rtp["video"]
        if seconds is not None and frames:
            frames = [f for f in frames if f[0] >= frames[-1][0] - seconds]
        if len(frames) < 2:
            return None
        return (len(frames) - 1) / (frames[-1][0] - frames[0][0])

    def rtp_p95_interval_s(self, seconds: Optional[float] = None) -> Optional[float]:
        frames = self.rtp["video"]
        if seconds is not None and frames:
            frames = [f for f in frames if f[0] >= frames[-1][0] - seconds]
        return _pctl([b[0] - a[0] for a, b in zip(frames, frames[1:])], 95)

    def _audio_arrival(self, sample: int) -> Optional[float]:
        """Arrival time of the audio frame holding relative sample `sample`."""
        if not self.audio:
            return None
        a0 = self.audio[0][1]
        for arrival, pts, n in self.audio:
            if pts - a0 <= sample < pts - a0 + n:
                return arrival
        return None

    def av_offsets(self) -> list[tuple[float, float]]:
        """(arrival of video frame k, offset(k)) for every frame whose audio arrived, k from the video pts."""
        if not self.video or not self.audio:
            return []
        v0 = self.video[0][1]
        out = []
        starts = [pts - self.audio[0][1] for _, pts, _ in self.audio]
        arrivals = [a for a, _, _ in self.audio]
        for arrival, pts in self.video:
            sample = (pts - v0) * SAMPLE_RATE // 90_000
            i = int(np.searchsorted(starts, sample, side="right")) - 1
            if 0 <= i < len(starts) and sample < starts[i] + self.audio[i][2]:
                out.append((arrival, arrival - arrivals[i]))
        return out

    def rtp_av_offsets(self) -> list[tuple[float, float]]:
        """As av_offsets, at the network: first packet of video frame k - the audio packet of sample k * spf.

        Free of the probe's own buffering (aiortc's receiver holds 4 audio packets, 80 ms, before it decodes
        one, and a video frame until the next one starts, 40 ms), so this is the transport's own figure.
        """
        audio, video = self.rtp["audio"], self.rtp["video"]
        if not audio or not video:
            return []
        starts = [ts for _, ts in audio]
        out = []
        for arrival, ts in video:
            sample = ts * SAMPLE_RATE // 90_000
            i = int(np.searchsorted(starts, sample, side="right")) - 1
            if 0 <= i < len(starts) and sample - starts[i] < 960:
                out.append((arrival, arrival - audio[i][0]))
        return out

    def av_offset_s(self, at: str = "start", seconds: float = 2.0, level: str = "rtp") -> Optional[float]:
        """Median A/V offset over the first (`at="start"`) or last (`"end"`) `seconds`, at the network
        (`level="rtp"`) or after decoding (`"decoded"`)."""
        offsets = self.rtp_av_offsets() if level == "rtp" else self.av_offsets()
        if not offsets:
            return None
        if at == "start":
            chosen = [o for t, o in offsets if t <= offsets[0][0] + seconds]
        else:
            chosen = [o for t, o in offsets if t >= offsets[-1][0] - seconds]
        return float(np.median(chosen))

    def marker_offsets(self) -> list[dict]:
        """Each flashed frame paired with the nearest burst onset (by media time): arrival and pts offsets."""
        if not self.video or not self.audio:
            return []
        v0, a0 = self.video[0][1], self.audio[0][1]
        out = []
        for varr, vpts in self.video_marks:
            vt = (vpts - v0) / 90_000
            best = min(self.audio_marks, key=lambda m: abs((m[1] - a0) / SAMPLE_RATE - vt), default=None)
            if best is None:
                continue
            at = (best[1] - a0) / SAMPLE_RATE
            if abs(at - vt) > 0.5:
                continue
            out.append({"media_t_s": vt, "pts_offset_s": vt - at, "arrival_offset_s": varr - best[0]})
        return out

    def summary(self, window_s: float = 10.0) -> dict:
        """The transport figures of this run."""
        return {
            "codec": self.codec,
            "first_frame_s": self.first_frame_s,
            "frames": len(self.video),
            "fps": self.fps_received(window_s),
            "p95_interval_s": self.p95_interval_s(window_s),
            "rtp_fps": self.rtp_fps(window_s),
            "rtp_p95_interval_s": self.rtp_p95_interval_s(window_s),
            "audio_s": sum(a[2] for a in self.audio) / SAMPLE_RATE,
            "av_offset_start_s": self.av_offset_s("start"),
            "av_offset_end_s": self.av_offset_s("end"),
            "decoded_av_offset_start_s": self.av_offset_s("start", level="decoded"),
            "decoded_av_offset_end_s": self.av_offset_s("end", level="decoded"),
        }

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        if self.pc is not None:
            await self.pc.close()
        for task in self._readers:
            with contextlib.suppress(BaseException):
                await task


def flash_marker(rgb: np.ndarray) -> bool:
    """The test pattern's flash: a frame that is almost all white."""
    return float(rgb.mean()) > 200


def burst_marker(samples: np.ndarray) -> bool:
    """The test pattern's burst: loud audio (the rest of the pattern's audio is a quiet hum)."""
    return float(np.abs(samples.astype(np.float32)).mean()) > 3000
