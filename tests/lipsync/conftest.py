"""Session media for the lip-sync tests: one talking clip, a second sentence, and their bad cousins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gpu_service.talking_head.video import encode_mp4, read_frames
from tests.lipsync.media import SENTENCE_A, SENTENCE_B, speak, talking_clip, transcode

BLANK_FRAMES = range(20, 30)


@pytest.fixture(scope="session")
def media(tmp_path_factory, piper_engine) -> dict:
    """Clip A (the astronaut saying sentence A, 320x320 @ 25 fps), speech B as WAV, and variants."""
    root: Path = tmp_path_factory.mktemp("lipsync_media")
    clip = talking_clip(piper_engine, SENTENCE_A, root / "a.mp4")
    audio_b, sr_b, phones_b = speak(piper_engine, SENTENCE_B)
    sf.write(root / "b.wav", audio_b, sr_b, subtype="PCM_16")
    frames = read_frames((root / "a.mp4").read_bytes(), (320, 320))
    # Face-free frames: a flat grey card and a heavily blurred, darkened frame alternate.
    import cv2

    holed = frames.copy()
    for i in BLANK_FRAMES:
        holed[i] = 128 if i % 2 else (cv2.GaussianBlur(frames[i], (0, 0), 25) * 0.3).astype(np.uint8)
    data, _ = encode_mp4(list(holed), 25, (320, 320), audio=clip["audio"], sample_rate=clip["sample_rate"])
    (root / "holed.mp4").write_bytes(data)
    # A video without a face: a colour gradient sweeping across (structure-free, so no detector is fooled).
    ramp = np.linspace(0, 255, 160, dtype=np.float32)
    sweep = [np.stack([np.roll(ramp, 6 * k)[None, :].repeat(160, 0), ramp[:, None].repeat(160, 1),
                       np.full((160, 160), 90.0)], -1).astype(np.uint8) for k in range(25)]
    (root / "noface.mp4").write_bytes(encode_mp4(sweep, 25, (160, 160))[0])
    return {
        "root": root,
        "a": root / "a.mp4",
        "a_frames": frames,
        "audio_a": clip["audio"],
        "sr_a": clip["sample_rate"],
        "b_wav": root / "b.wav",
        "audio_b": audio_b,
        "sr_b": sr_b,
        "phones_b": phones_b,
        "holed": root / "holed.mp4",
        "holed_frames": holed,
        "noface": root / "noface.mp4",
        "transcode": lambda name, *args: transcode(root / "a.mp4", root / name, *args),
    }
