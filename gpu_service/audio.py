"""Audio encoding and decoding of uploads (no torch here)."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

from gpu_service.errors import BadMedia


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio in [-1, 1] as a 16-bit PCM WAV file."""
    pcm = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_stream_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A WAV header for a stream of unknown length (sizes set to the maximum, as streaming players expect)."""
    byte_rate = sample_rate * channels * bits // 8
    return (
        b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, byte_rate, channels * bits // 8, bits)
        + b"data" + struct.pack("<I", 0xFFFFFFFF)
    )


def pcm16(audio: np.ndarray) -> bytes:
    """Float audio as little-endian 16-bit PCM samples."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def decode_audio(raw: bytes, field: str, min_s: float, max_s: float) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG bytes to mono float32; BadMedia if not audio, silent or out of length bounds."""
    if not raw:
        raise BadMedia(f"{field} is empty")
    try:
        audio, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception:
        raise BadMedia(f"{field} is not a readable audio file (WAV, FLAC or OGG expected)") from None
    audio = audio.mean(axis=1)
    duration = len(audio) / float(rate) if rate else 0.0
    if duration < min_s:
        raise BadMedia(f"{field} is {duration:.2f} s long; at least {min_s:g} s of speech is needed")
    if duration > max_s:
        raise BadMedia(f"{field} is {duration:.2f} s long; at most {max_s:g} s is accepted")
    if float(np.max(np.abs(audio))) < 1e-4:
        raise BadMedia(f"{field} is silent")
    return audio.astype(np.float32), int(rate)
