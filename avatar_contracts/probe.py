"""What a media file holds, read in process with PyAV (FFmpeg's libraries): no subprocess, no stderr parsing.

One probe for every part: the GPU service validates lip-sync uploads and checks its own MP4s with
it, the runtime reads its chunks' frame rates and sizes, and tests read outputs back through it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union


@dataclass
class MediaInfo:
    """A file's container and its first video and audio streams; empty `container` when it is not media."""

    container: str = ""
    """FFmpeg's demuxer names, comma-separated (e.g. "mov,mp4,m4a,3gp,3g2,mj2")."""
    duration_s: Optional[float] = None
    video_codec: Optional[str] = None
    width: int = 0
    height: int = 0
    frame_rate: Optional[Fraction] = None
    """The exact average frame rate (30000/1001, not 29.97)."""
    pix_fmt: Optional[str] = None
    sample_aspect_ratio: Optional[Fraction] = None
    """Shape of one stored pixel; None when the file does not say (read as square)."""
    color_range: Optional[str] = None
    color_space: Optional[str] = None
    color_primaries: Optional[str] = None
    color_trc: Optional[str] = None
    rotation: float = 0.0
    """Degrees of the display matrix; decoders apply it, so frames come out turned."""
    video_frames: int = 0
    """Frames the container declares for the video stream (0 when it does not say)."""
    audio_codec: Optional[str] = None
    sample_rate: Optional[int] = None
    channels: Optional[int] = None

    @property
    def fps(self) -> Optional[float]:
        """The frame rate as a float, None when the file does not say."""
        return float(self.frame_rate) if self.frame_rate else None

    @property
    def display_size(self) -> tuple[int, int]:
        """Width, height as decoded frames come out (the rotation applied)."""
        if round(abs(self.rotation)) % 180 == 90:
            return self.height, self.width
        return self.width, self.height


# FFmpeg's enum values of the colour properties (libavutil/pixfmt.h), by the names ffmpeg's options use.
_RANGES = {1: "tv", 2: "pc"}
_SPACES = {0: "gbr", 1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 9: "bt2020nc", 10: "bt2020c"}
_PRIMARIES = {1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "film", 9: "bt2020"}
_TRCS = {1: "bt709", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m", 8: "linear", 13: "iec61966-2-1",
         14: "bt2020-10", 15: "bt2020-12", 16: "smpte2084", 18: "arib-std-b67"}


def _named(table: dict[int, str], value) -> Optional[str]:
    """A colour property by name; None when unspecified (2) or unknown."""
    if value is None:
        return None
    value = int(value)
    return table.get(value) if value != 2 else None


def probe(source: Union[Path, str, bytes]) -> MediaInfo:
    """Probe a file (or the bytes of one); a MediaInfo with an empty container when FFmpeg cannot open it."""
    import av

    target = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        container = av.open(target, mode="r")
    except (av.FFmpegError, OSError, ValueError):
        return MediaInfo()
    with container:
        info = MediaInfo(container=container.format.name)
        if container.duration is not None:
            info.duration_s = container.duration / 1_000_000  # AV_TIME_BASE
        video = next((s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic), None)
        if video is not None:
            cc = video.codec_context
            info.video_codec = cc.name
            info.width, info.height = int(cc.width or 0), int(cc.height or 0)
            rate = video.average_rate or video.guessed_rate
            if rate:
                info.frame_rate = Fraction(rate)
            info.pix_fmt = cc.pix_fmt
            sar = video.sample_aspect_ratio or cc.sample_aspect_ratio
            info.sample_aspect_ratio = Fraction(sar) if sar else None
            info.color_range = _RANGES.get(int(cc.color_range or 0))
            info.color_space = _named(_SPACES, cc.colorspace)
            info.color_primaries = _named(_PRIMARIES, cc.color_primaries)
            info.color_trc = _named(_TRCS, cc.color_trc)
            info.video_frames = int(video.frames or 0)
            info.rotation = _rotation(container, video)
        audio = next(iter(container.streams.audio), None)
        if audio is not None:
            info.audio_codec = audio.codec_context.name
            info.sample_rate = int(audio.codec_context.sample_rate or 0) or None
            info.channels = int(audio.codec_context.channels or 0) or None
    return info


def _rotation(container, stream) -> float:
    """The display rotation, from the first decoded frame's display matrix (PyAV exposes it there)."""
    import av

    try:
        for frame in container.decode(stream):
            return float(frame.rotation or 0.0)
    except (av.FFmpegError, ValueError):
        pass  # undecodable video: the caller's own decode reports it
    return 0.0


def count_video_frames(path: Union[Path, str]) -> int:
    """Frames of the first video stream, counted from its packets (each holds one frame); 0 without video."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            return 0
        return _count_packets(container, container.streams.video[0])


def _count_packets(container, stream) -> int:
    """Frames of a video stream, counted from its packets without decoding (each packet holds one frame)."""
    return sum(1 for packet in container.demux(stream) if packet.size)


def decoded_duration(path: Union[Path, str], kind: str) -> float:
    """Seconds of the first video ("v": frames over the frame rate) or audio ("a": decoded samples) stream."""
    import av

    with av.open(str(path)) as container:
        if kind == "v":
            stream = container.streams.video[0]
            return _count_packets(container, stream) / float(stream.average_rate or stream.guessed_rate)
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / float(stream.codec_context.sample_rate)
