"""MP4 assembly with ffmpeg: raw RGB frames piped in, H.264 yuv420p (+ AAC), moov atom first."""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from gpu_service.audio import wav_bytes
from gpu_service.errors import GenerationFailed


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
) -> tuple[bytes, dict]:
    """Encode RGB frames of `size` (width, height) to MP4 bytes; returns (bytes, facts with timings)."""
    width, height = size
    with tempfile.TemporaryDirectory(prefix="th_video_") as tmp:
        out = Path(tmp) / "out.mp4"
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps}", "-i", "pipe:0"]
        if audio is not None:
            wav = Path(tmp) / "audio.wav"
            wav.write_bytes(wav_bytes(audio, int(sample_rate)))
            cmd += ["-i", str(wav)]
        cmd += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p", "-threads", "2"]
        if audio is not None:
            cmd += ["-c:a", "aac", "-b:a", "128k"]
        cmd += ["-movflags", "+faststart", str(out)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
        reader.start()
        n = 0
        first_frame_ms = None
        try:
            for frame in frames:
                if first_frame_ms is None:
                    first_frame_ms = (time.perf_counter() - started) * 1000
                proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
                n += 1
        except BrokenPipeError:
            pass
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        rc = proc.wait()
        reader.join(10)
        if rc != 0 or not out.exists():
            detail = (errors[0] if errors else b"").decode(errors="replace").replace(f"{tmp}/", "")
            raise GenerationFailed(f"video encoding failed (ffmpeg exit {rc}): {detail.strip()[-500:]}")
        data = out.read_bytes()
    facts = {
        "frames": n,
        "first_frame_ms": first_frame_ms or 0.0,
        "render_encode_ms": (time.perf_counter() - started) * 1000,
    }
    return data, facts


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
