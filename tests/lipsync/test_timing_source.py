"""/lipsync/generate with real speech and no phonemes: the `text` field is aligned to it; the lips seal on its m."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gpu_service.lipsync.engines import landmark
from gpu_service.speech import alignment
from tests.conftest import running_app
from tests.speech_kit import FIXTURES, load_clip

pytestmark = pytest.mark.skipif(not alignment.available(), reason="pocketsphinx is not installed")

CLOSED = 0.02  # the closure threshold of tests/talking_head/test_driving.py


def test_text_field_is_aligned_and_reported(gpu_settings, monkeypatch):
    a03 = load_clip(FIXTURES / "a03_cmu_goforward_male.wav")
    settings = gpu_settings.model_copy(update={"video_engines": [], "lipsync_engines": ["landmark"]})
    driven = []
    real = landmark.drive
    monkeypatch.setattr(landmark, "drive", lambda *a, **k: driven.append(real(*a, **k)) or driven[-1])
    files = {"video": ("v01.mp4", (FIXTURES / "v01_grid_swiz3n_darker_skin_moustache.mp4").read_bytes(), "video/mp4"),
             "audio": ("a03.wav", (FIXTURES / "a03_cmu_goforward_male.wav").read_bytes(), "audio/wav")}

    async def scenario():
        async with running_app(settings) as client:
            mp4 = await client.post("/lipsync/generate", files=files, data={"text": a03.text, "length_policy": "trim"})
            as_json = await client.post("/lipsync/generate", files=files,
                                        data={"response": "json", "length_policy": "trim"})
            return mp4, as_json

    mp4, as_json = asyncio.run(scenario())
    assert mp4.status_code == 200, mp4.text
    assert mp4.headers["X-Timing-Source"] == "forced_alignment"
    assert as_json.status_code == 200 and as_json.json()["timing_source"] == "phone_recognition"
    ctl = driven[0]
    for _, s, e in a03.bilabials():
        assert ctl.mouth_open[int(np.floor(0.5 * (s + e) * ctl.fps))] <= CLOSED
    assert ctl.mouth_open[int(0.5 * ctl.fps): int(2.1 * ctl.fps)].max() > 0.3
