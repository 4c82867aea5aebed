"""MP4 assembly with ffmpeg: raw RGB frames piped in, H.264 yuv420p (+ AAC), moov atom first."""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from avatar_contracts.probe import MediaInfo
from gpu_service.audio import wav_bytes
from gpu_service.errors import GenerationFailed


_END = object()
"""The end of a frame iterator."""


def ffmpeg_exe() -> str:
    """The ffmpeg binary bundled with imageio-ffmpeg (has libx264 and aac)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def encode_mp4(
    frames: Iterable[np.ndarray],
    fps: float,
    size: tuple[int, int],
    audio: Optional[np.ndarray] = None,
    sample_rate: Optional[int] = None,
    preset: str = "veryfast",
    crf: int = 16,
    like: Optional[MediaInfo] = None,
    x264_params: Optional[str] = None,
) -> tuple[bytes, dict]:
    """Encode RGB frames of `size` (width, height) to MP4 bytes; returns (bytes, facts with timings).

    `x264_params` are extra libx264 options (`key=value:key=value`) on top of the preset.

    The timings split the run into `frames_ms` (waiting for the next frame: its rendering) and
    `encode_ms` (the rest: writing to the encoder while it keeps up, and its final flush).

    `like` is the source of a re-voiced video: its sample aspect ratio and colour description are
    kept (the RGB frames are turned back into YUV with the source's own matrix and tagged like it).
    """
    width, height = size
    with tempfile.TemporaryDirectory(prefix="th_video_") as tmp:
        out = Path(tmp) / "out.mp4"
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps}", "-i", "pipe:0"]
        if audio is not None:
            wav = Path(tmp) / "audio.wav"
            wav.write_bytes(wav_bytes(audio, int(sample_rate)))
            cmd += ["-i", str(wav)]
        cmd += _keep_look(like)
        cmd += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p", "-threads", "2"]
        if x264_params:
            cmd += ["-x264-params", x264_params]
        if audio is not None:
            cmd += ["-c:a", "aac", "-b:a", "128k"]
        cmd += ["-movflags", "+faststart", str(out)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        widen_pipe(proc.stdin, width * height * 3)
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
        reader.start()
        n = 0
        first_frame_ms = None
        making_ms = 0.0  # time spent making frames (rendering); the rest of the run is spent on the encoder
        source = iter(frames)
        try:
            while True:
                asked = time.perf_counter()
                frame = next(source, _END)
                making_ms += (time.perf_counter() - asked) * 1000
                if frame is _END:
                    break
                if first_frame_ms is None:
                    first_frame_ms = (time.perf_counter() - started) * 1000
                # The frame's own buffer, not a bytes copy of it (2.7 MB a frame at 720p).
                proc.stdin.write(memoryview(np.ascontiguousarray(frame, dtype=np.uint8)).cast("B"))
                n += 1
        except BrokenPipeError:
            pass
        except BaseException:  # the frames failed (a device out of memory): stop ffmpeg, leave no process behind
            proc.kill()
            proc.wait()
            raise
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            close = getattr(source, "close", None)  # a generator's threads, trackers and decoder end with it
            if close is not None:
                close()
        rc = proc.wait()
        reader.join(10)
        if rc != 0 or not out.exists():
            detail = (errors[0] if errors else b"").decode(errors="replace").replace(f"{tmp}/", "")
            raise GenerationFailed(f"video encoding failed (ffmpeg exit {rc}): {detail.strip()[-500:]}")
        data = out.read_bytes()
    total_ms = (time.perf_counter() - started) * 1000
    facts = {
        "frames": n,
        "first_frame_ms": first_frame_ms or 0.0,
        "render_encode_ms": total_ms,
        "frames_ms": making_ms,
        # x264 runs beside the frames' making: this is what it added, waits on a full pipe and the final flush
        "encode_ms": max(0.0, total_ms - making_ms),
    }
    return data, facts


def widen_pipe(pipe, frame_bytes: int) -> None:
    """Give a pipe of raw frames room for a large part of a frame (Linux: up to 1 MB without privileges), so a
    720p frame crosses it in 3 writes instead of 42, each a wake-up of both processes (about 1 ms of CPU a
    720p frame in lip-sync, decoder and encoder together). Best effort: the default pipe also works."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), min(frame_bytes, 1 << 20))
    except (ImportError, OSError, ValueError):
        pass  # not Linux, or a lower limit


# Matrices swscale converts with, by the colour-space names the probe reports.
_MATRICES = {"bt709": "bt709", "smpte170m": "bt601", "bt470bg": "bt601", "smpte240m": "smpte240m", "fcc": "fcc",
             "bt2020nc": "bt2020"}


def _keep_look(like: Optional[MediaInfo]) -> list[str]:
    """ffmpeg output options that give the new video its source's pixel shape and colour description."""
    if like is None:
        return []
    filters, params = [], []
    sar = like.sample_aspect_ratio
    if sar and sar != 1:
        filters.append(f"setsar={sar.numerator}/{sar.denominator}")
    matrix = _MATRICES.get(like.color_space or "")
    if matrix:
        # Decoding to RGB used the source's matrix; encoding must use the same one, or colours shift.
        filters.insert(0, f"scale=out_color_matrix={matrix}:out_range=tv")
        params += [f"colorspace={like.color_space}", "range=tv"]
    if like.color_primaries:
        params.append(f"color_primaries={like.color_primaries}")
    if like.color_trc:
        params.append(f"color_trc={like.color_trc}")
    if params:  # setparams tags the frames; x264 writes what the frames say (output options alone are lost)
        filters.append("setparams=" + ":".join(params))
    return ["-vf", ",".join(filters)] if filters else []


def read_frames(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Decode an MP4's frames to (T, H, W, 3) uint8 RGB (for tests and the contact sheet)."""
    width, height = size
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        res = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", f.name, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
            capture_output=True,
        )
    if res.returncode != 0:
        raise GenerationFailed(f"could not decode video: {res.stderr.decode(errors='replace')[-300:]}")
    return np.frombuffer(res.stdout, np.uint8).reshape(-1, height, width, 3)
