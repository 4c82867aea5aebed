"""Media assembly with the bundled ffmpeg: joining chunks, muxing, thumbnails; probing with PyAV.

Audio is joined as PCM (each chunk padded or trimmed to its video chunk's exact length) and
encoded to AAC once, so chunk boundaries have no encoder gap or click and the audio track is
exactly as long as the video track. Video chunks are joined without re-encoding, in the same
ffmpeg run as the audio.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import soundfile as sf

from avatar_contracts.probe import MediaInfo, count_video_frames, decoded_duration
from avatar_contracts.probe import probe as _probe

FADE_S = 0.004
"""Short fade at each chunk edge: a sample step at a boundary is an audible click."""


@lru_cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped with imageio-ffmpeg (libx264 + aac)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


class MediaError(RuntimeError):
    """ffmpeg failed; the message carries the tail of its output."""


def run_ffmpeg(args: Sequence[str], timeout_s: float = 600.0) -> str:
    """Run ffmpeg quietly; return its stderr, raise MediaError on failure."""
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise MediaError(f"ffmpeg failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stderr


def probe(path: Path) -> MediaInfo:
    """Container duration, codecs, frame rate and size of a file (PyAV, in process)."""
    return _probe(path)


def stream_duration(path: Path, kind: str) -> float:
    """Decoded duration in seconds of the first video ('v') or audio ('a') stream."""
    try:
        return decoded_duration(path, kind)
    except (IndexError, ZeroDivisionError, av.FFmpegError) as exc:
        raise MediaError(f"cannot measure the {kind} stream of {path.name}: {exc}") from exc


def count_frames(path: Path) -> int:
    """Frames of the first video stream."""
    frames = count_video_frames(path)
    if not frames:
        raise MediaError(f"no video frames in {path.name}")
    return frames


def fit_audio(audio: np.ndarray, sample_rate: int, seconds: float) -> np.ndarray:
    """Pad with silence or trim to exactly `seconds`, with short fades so joins do not click."""
    target = int(round(seconds * sample_rate))
    out = np.zeros(target, dtype=np.float32)
    n = min(target, len(audio))
    out[:n] = audio[:n]
    fade = min(int(FADE_S * sample_rate), n // 2)
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        out[:fade] *= ramp
        out[n - fade:n] *= ramp[::-1]
    return out


def read_wav(data_or_path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of a WAV (bytes or path)."""
    import io

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else str(data_or_path)
    audio, rate = sf.read(src, dtype="float32", always_2d=True)
    return audio.mean(axis=1), int(rate)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def mux_chunks(parts: Sequence[Path], wav: Path, out: Path) -> None:
    """Final MP4 from video-only chunks of one encoding and the joined speech, in one ffmpeg run: the video
    streams copied end to end (concat demuxer, no re-encoding), the audio encoded to AAC once, moov first.

    The AAC encoder's fast coder: it takes half the time of the default one, which this step, the
    last of a job and alone on the critical path, is mostly made of; speech at 128 kb/s sounds the same.
    """
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=out.parent, delete=False) as listing:
        for part in parts:
            listing.write(f"file '{Path(part).resolve()}'\n")
    try:
        run_ffmpeg([
            "-f", "concat", "-safe", "0", "-i", listing.name, "-i", str(wav),
            "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "copy", "-c:a", "aac", "-aac_coder", "fast", "-b:a", "128k",
            "-movflags", "+faststart", str(tmp),
        ])
    finally:
        os.unlink(listing.name)
    os.replace(tmp, out)


class _Pending:
    """An ffmpeg run in the background; wait() raises MediaError on failure and moves the output in place."""

    def __init__(self, proc: subprocess.Popen, tmp: Path, out: Path) -> None:
        self.proc, self.tmp, self.out = proc, tmp, out

    def wait(self, timeout_s: float = 120.0) -> None:
        """Block until done."""
        _, err = self.proc.communicate(timeout=timeout_s)
        if self.proc.returncode != 0:
            raise MediaError(f"ffmpeg failed ({self.proc.returncode}): {err.strip()[-800:]}")
        os.replace(self.tmp, self.out)


def start_thumbnail(video: Path, out: Path, at_s: float) -> _Pending:
    """Begin extracting one JPEG frame from `at_s` seconds in; call wait() on the result."""
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    proc = subprocess.Popen(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", "-ss", f"{max(0.0, at_s):.3f}", "-i", str(video),
         "-frames:v", "1", "-q:v", "3", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    return _Pending(proc, tmp, out)
