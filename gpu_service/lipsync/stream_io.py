"""Media probing and streaming IO for lip-sync: ffmpeg pipes in and out, never a whole video in memory.

Probing is in process (avatar_contracts.probe, PyAV). Decoding is one ffmpeg process
per pass writing rawvideo rgb24 to a pipe, read one frame at a time. Longer audio than video is
met by replaying the source in the order of the length policy; a reversed (pingpong) pass is
decoded in short chunks from the end, each chunk held in memory and yielded backwards, so memory
stays at one chunk whatever the clip's length.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

import numpy as np

from avatar_contracts.probe import MediaInfo, probe
from gpu_service.errors import BadMedia, GenerationFailed, UnsupportedMediaType
from gpu_service.talking_head.video import ffmpeg_exe, widen_pipe

log = logging.getLogger(__name__)

LengthPolicy = Literal["trim", "loop", "pingpong"]
LENGTH_POLICIES: tuple[str, ...] = ("trim", "loop", "pingpong")

# Containers as ffmpeg names them ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm").
VIDEO_CONTAINERS = ("mov", "mp4", "matroska", "webm")
# Camera, phone and web codecs the bundled ffmpeg decodes; anything else (ffv1, rawvideo, gif...) is refused
# up front rather than failing or crawling half way through a long job.
VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg", "prores")
AUDIO_CONTAINERS = ("wav", "mp3", "flac", "ogg")

MIN_SIDE = 64
"""Fewest pixels per side of an input video: smaller has no face to track."""


def exact_fps(fps: float) -> Fraction:
    """A frame rate as a fraction, recognising the NTSC rates ffmpeg prints rounded (29.97 -> 30000/1001)."""
    for base in (24, 30, 60, 120):
        ntsc = Fraction(base * 1000, 1001)
        if abs(float(ntsc) - fps) < 0.006:
            return ntsc
    return Fraction(fps).limit_denominator(1001)


@dataclass
class VideoSource:
    """A validated input video, decoded as rgb24 frames of `size` at `fps`."""

    path: Path
    info: MediaInfo
    fps: Fraction
    size: tuple[int, int]
    """Width, height of the decoded (and output) frames; even, as H.264 yuv420p needs."""

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame."""
        return self.size[0] * self.size[1] * 3

    def estimated_frames(self) -> int:
        """Frames the decoder should deliver, from the probed duration (the real count comes from decoding)."""
        return int(round((self.info.duration_s or 0.0) * float(self.fps)))

    def _cmd(self, start_s: float = 0.0, max_frames: Optional[int] = None) -> list[str]:
        w, h = self.size
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin"]
        if start_s > 0:
            cmd += ["-ss", f"{start_s:.6f}"]
        # The fps filter makes variable-rate phone video constant-rate; crop keeps sides even.
        vf = f"fps={self.fps.numerator}/{self.fps.denominator},crop={w}:{h}:0:0"
        cmd += ["-i", str(self.path), "-an", "-sn", "-vf", vf, "-threads", "1"]
        if max_frames is not None:
            cmd += ["-frames:v", str(max_frames)]
        return cmd + ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]

    def _frames(self, start_s: float = 0.0, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
        """Decode frames from `start_s` on through a pipe, one frame in memory at a time."""
        w, h = self.size
        proc = subprocess.Popen(self._cmd(start_s, max_frames), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)
        widen_pipe(proc.stdout, self.frame_bytes)
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
        reader.start()
        n = 0
        try:
            while True:
                buf = _read_exact(proc.stdout, self.frame_bytes)
                if buf is None:
                    break
                n += 1
                yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(5)
        if proc.returncode not in (0, None) and n == 0 and not (max_frames and proc.returncode < 0):
            detail = (errors[0] if errors else b"").decode(errors="replace").replace(str(self.path), "video")
            raise BadMedia(f"video could not be decoded (corrupt or truncated file): {detail.strip()[-300:]}")

    def forward(self) -> Iterator[np.ndarray]:
        """Every frame, first to last."""
        yield from self._frames()

    def first(self, n_frames: int) -> Iterator[np.ndarray]:
        """The first n_frames frames (fewer if the video is shorter); the decoder stops there."""
        yield from self._frames(0.0, max(1, int(n_frames)))

    def backward(self, n_frames: int, first: int, last: int, chunk: int) -> Iterator[np.ndarray]:
        """Frames `last` down to `first` (inclusive), decoded `chunk` frames at a time from the end."""
        stop = last + 1
        while stop > first:
            start = max(first, stop - chunk)
            # Seek half a frame early: ffmpeg keeps frames at or after the seek time, so frame `start` is the first.
            seek = max(0.0, (start - 0.5) / float(self.fps))
            got = list(self._frames(seek, stop - start)) if start > 0 else list(self._frames(0.0, stop))
            if len(got) < stop - start:
                raise GenerationFailed(f"re-reading frames {start}..{stop - 1} gave {len(got)} frames")
            yield from reversed(got[: stop - start])
            stop = start


class ReadAhead:
    """An iterable run in a thread of its own, up to `depth` items ahead of the loop that consumes it.

    Use as a context manager: leaving it (the consumer done, stopped early or failed) stops the
    producer, closes its iterator (so a decoder's ffmpeg is ended there) and joins the thread. An
    exception in the producer is raised in the consumer, at the item where it happened.
    """

    _END = object()

    def __init__(self, items: Iterable, depth: int = 4, name: str = "read-ahead") -> None:
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue an item unless the consumer has gone; False once it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        it = iter(self._items)
        try:
            for item in it:
                if not self._put((True, item)):
                    return
            self._put((True, self._END))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((False, exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator:
        while True:
            ok, item = self._queue.get()
            if not ok:
                raise item
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        """Stop the producer and wait for its thread (dropping what it had queued)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.05)

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_exact(stream, size: int) -> Optional[bytearray]:
    """`size` bytes from a pipe, read straight into one new buffer, or None at its end (a partial last frame is dropped)."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            return None
        got += n
    return buf


def plan_length(n_source: int, n_target: int, policy: str) -> int:
    """Output frames for a source of n_source frames and audio worth n_target frames under `policy`."""
    if n_target <= n_source or policy != "trim":
        return n_target
    return n_source


def source_index(i: int, n_source: int, policy: str) -> int:
    """The source frame shown at output frame i (pingpong bounces without repeating the end frames)."""
    if i < n_source or n_source <= 1:
        return min(i, n_source - 1) if n_source > 0 else 0
    if policy == "loop":
        return i % n_source
    if policy == "pingpong":
        period = 2 * n_source - 2
        k = i % period
        return k if k < n_source else period - k
    raise ValueError(f"policy {policy!r} does not extend past the source")


def frames_in_order(src: VideoSource, n_target: int, policy: str, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(source index, frame) for each output frame: the source once, then replayed as the policy says.

    The source's true frame count is only known once it is decoded, so the first pass streams
    while counting and the replays are planned from the count.
    """
    n = 0
    for frame in src.forward():
        if n >= n_target:
            return
        yield n, frame
        n += 1
    if n == 0:
        raise BadMedia("video has no decodable frames")
    i = n
    total = plan_length(n, n_target, policy)
    while i < total:
        if policy == "loop" or n == 1:
            for frame in src.forward():
                if i >= total:
                    return
                yield source_index(i, n, policy), frame
                i += 1
        else:  # pingpong: down from n-2 to 1, then up again from 0
            k = i % (2 * n - 2)
            if k >= n:
                top = (2 * n - 2) - k
                for frame in src.backward(n, 1, top, chunk):
                    if i >= total:
                        return
                    yield source_index(i, n, policy), frame
                    i += 1
            else:
                for frame in src.forward():
                    if i >= total:
                        return
                    yield source_index(i, n, policy), frame
                    i += 1


def decode_pcm(path: Path, rate: int, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """ffmpeg's decode of the audio in `path` to mono float32 at `rate` (stdout holds the samples; the caller checks
    returncode). Raises subprocess.TimeoutExpired past `timeout_s`."""
    return subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path), "-vn", "-ac", "1",
         "-ar", str(rate), "-f", "f32le", "pipe:1"],
        capture_output=True, timeout=timeout_s,
    )


def decode_audio_file(path: Path, field: str = "audio", max_s: float = 600.0) -> tuple[np.ndarray, int]:
    """Any audio ffmpeg reads as mono float32 at its own rate; BadMedia when unreadable, empty or too long."""
    info = probe(path)
    if not info.container or info.audio_codec is None:
        raise BadMedia(f"{field} is not an audio file (WAV, MP3, FLAC or OGG expected)")
    if not any(c in info.container.split(",") for c in AUDIO_CONTAINERS):
        raise UnsupportedMediaType(f"{field} is a {info.container!r} file; WAV, MP3, FLAC or OGG expected")
    if info.duration_s is not None and info.duration_s > max_s:
        raise BadMedia(f"{field} is {info.duration_s:.1f} s long; at most {max_s:g} s is accepted")
    rate = info.sample_rate or 22050
    res = decode_pcm(path, rate)
    if res.returncode != 0:
        detail = res.stderr.decode(errors="replace").replace(str(path), field)  # the temp path stays on the server
        raise BadMedia(f"{field} could not be decoded (corrupt audio): {detail.strip()[-200:]}")
    audio = np.frombuffer(res.stdout, np.float32).copy()
    if audio.size == 0:
        raise BadMedia(f"{field} contains no audio samples")
    if len(audio) / rate > max_s:
        raise BadMedia(f"{field} is {len(audio) / rate:.1f} s long; at most {max_s:g} s is accepted")
    if float(np.max(np.abs(audio))) < 1e-4:
        raise BadMedia(f"{field} is silent; lip-sync needs speech")
    return audio, rate


def open_video(path: Path, *, max_s: float, max_pixels: int, fps: Optional[float] = None,
               field: str = "video") -> VideoSource:
    """Probe and validate an input video; 4xx naming the problem (not a video, codec, limits)."""
    info = probe(path)
    if not info.container:
        raise BadMedia(f"{field} is not a readable media file (MP4, MOV, WebM or MKV expected)")
    if info.video_codec is None:
        raise BadMedia(f"{field} has no video stream (is it an audio or image file?)")
    containers = info.container.split(",")
    if not any(c in containers for c in VIDEO_CONTAINERS):
        raise UnsupportedMediaType(f"{field} is a {info.container!r} file; MP4, MOV, WebM or MKV expected")
    if info.video_codec not in VIDEO_CODECS:
        raise UnsupportedMediaType(
            f"{field} uses the {info.video_codec!r} codec; supported: {', '.join(VIDEO_CODECS)}")
    if not info.width or not info.height:
        raise BadMedia(f"{field}: the frame size could not be read (corrupt file?)")
    w, h = info.display_size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise BadMedia(f"{field} is {w}x{h} pixels; lip-sync needs at least {MIN_SIDE}x{MIN_SIDE}")
    if w * h > max_pixels:
        raise BadMedia(f"{field} is {w}x{h} ({w * h} pixels); at most {max_pixels} pixels per frame are accepted")
    if info.duration_s is None or info.duration_s <= 0:
        raise BadMedia(f"{field} has no duration (corrupt or still image)")
    if info.duration_s > max_s:
        raise BadMedia(f"{field} is {info.duration_s:.1f} s long; at most {max_s:g} s is accepted")
    rate = fps if fps is not None else info.fps
    if rate is None or not (1.0 <= rate <= 120.0):
        raise BadMedia(f"{field}: frame rate {rate!r} is unreadable or out of range; pass fps explicitly")
    exact = info.frame_rate if fps is None and info.frame_rate else exact_fps(rate)
    return VideoSource(path=path, info=info, fps=exact, size=(w - w % 2, h - h % 2))
