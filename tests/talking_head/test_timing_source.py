"""/video/generate with real speech and no phonemes: timings aligned to the text, or recognised, or the envelope.

The controls the engine really rendered are caught on their way out of drive() (the engine imports
it when it generates), and the lips must be sealed at the kit's reference m/b/p centres.
"""

from __future__ import annotations

import asyncio
import base64
import sys

import numpy as np
import pytest
from skimage import data

from gpu_service.speech import alignment
from gpu_service.talking_head import driving
from gpu_service.talking_head.controls import SPEECH_OPEN
from tests.conftest import running_app
from tests.speech_kit import FIXTURES, load_clip
from tests.talking_head.test_video_api import png

pytestmark = pytest.mark.skipif(not alignment.available(), reason="pocketsphinx is not installed")

CLOSED = 0.02  # the closure threshold of tests/talking_head/test_driving.py
WAV = FIXTURES / "a03_cmu_goforward_male.wav"


@pytest.fixture(scope="module")
def a03():
    return load_clip(WAV)


@pytest.fixture
def astro_settings(gpu_settings):
    (gpu_settings.preset_avatars_dir / "astro").mkdir(parents=True)
    (gpu_settings.preset_avatars_dir / "astro" / "portrait.png").write_bytes(png(data.astronaut()))
    return gpu_settings


@pytest.fixture
def rendered(monkeypatch) -> list:
    """The controls of every clip the engine drives, in order."""
    out = []
    real = driving.drive

    def drive(*args, **kwargs):
        out.append(real(*args, **kwargs))
        return out[-1]

    monkeypatch.setattr(driving, "drive", drive)
    return out


def _post(settings, bodies: list[dict]):
    audio = base64.b64encode(WAV.read_bytes()).decode()

    async def scenario():
        async with running_app(settings) as client:
            return [await client.post("/video/generate", json={"avatar_id": "astro", "audio": audio,
                                                                "head_motion": False, **b}) for b in bodies]

    return asyncio.run(scenario())


def _mouth_at(ctl, t: float) -> float:
    return float(ctl.mouth_open[int(np.floor(t * ctl.fps))])


def test_text_is_aligned_and_the_lips_seal_on_the_m(astro_settings, rendered, a03):
    with_text, without, given = _post(astro_settings, [
        {"text": a03.text},
        {"response": "json"},
        {"phonemes": [{"phoneme": "_", "start_s": 0.0, "end_s": a03.duration_s}]},
    ])
    assert with_text.status_code == 200, with_text.text
    assert with_text.headers["X-Timing-Source"] == "forced_alignment"
    assert "align=" in with_text.headers["X-Timings-Ms"]
    assert without.status_code == 200 and without.json()["timing_source"] == "phone_recognition"
    assert without.json()["timings_ms"]["align"] > 0
    assert given.headers["X-Timing-Source"] == "request"

    aligned, recognised, _ = rendered
    centres = [0.5 * (s + e) for _, s, e in a03.bilabials()]
    assert centres and all(_mouth_at(aligned, c) <= CLOSED for c in centres), [_mouth_at(aligned, c) for c in centres]
    for ctl in (aligned, recognised):
        # the lead-in silence (0-0.46 s) at most parted for the in-breath before the first words, the words open
        assert ctl.mouth_open[: int(0.3 * ctl.fps)].max() <= 0.45 * SPEECH_OPEN
        assert ctl.mouth_open[int(0.5 * ctl.fps): int(2.1 * ctl.fps)].max() > 0.6 * SPEECH_OPEN


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="phone recognition hears the M of 'meters' as NG (see test_alignment.py)")
def test_recognised_timings_seal_the_lips_on_the_m(astro_settings, rendered, a03):
    (resp,) = _post(astro_settings, [{}])
    assert resp.headers["X-Timing-Source"] == "phone_recognition"
    assert all(_mouth_at(rendered[0], 0.5 * (s + e)) <= CLOSED for _, s, e in a03.bilabials())


def test_envelope_when_alignment_is_unavailable(astro_settings, rendered, monkeypatch, a03):
    alignment.available.cache_clear()
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)
    try:
        (resp,) = _post(astro_settings, [{"text": a03.text, "response": "json"}])
    finally:
        alignment.available.cache_clear()
    assert resp.status_code == 200, resp.text
    assert resp.json()["timing_source"] == "envelope"
    centre = 0.5 * sum(a03.bilabials()[0][1:])
    assert _mouth_at(rendered[0], centre) > CLOSED  # the volume meter: open through the M
