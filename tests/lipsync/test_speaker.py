"""The filmed person's own opening (gpu_service/lipsync/speaker.py), read off the kit's v01 and his soundtrack.

v01's talker opens wide: MediaPipe reads his own p95 inner-lip gap while he speaks at 0.11 face
heights, where driving's population opening asks about 0.066 of the same speech. Re-voiced, he
should open like himself; a clip that cannot tell (no soundtrack, barely any speech) keeps the
population's amplitude. Driving's `amplitude` scales the opening and nothing else: seals stay
shut and the jaw's speed cap holds.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_service.errors import ValidationFailed
from gpu_service.lipsync import speaker
from gpu_service.lipsync.engines.landmark import speech_controls
from gpu_service.lipsync.silence import source_speech
from gpu_service.lipsync.stream_io import open_video
from gpu_service.speech.alignment import timings_for
from gpu_service.talking_head.controls import SPEECH_OPEN
from gpu_service.talking_head.driving import _JAW_SPEED, drive, speech_mask
from tests.helpers import REPO

CLIP = REPO / "tests" / "fixtures" / "media" / "v01_grid_swiz3n_darker_skin_moustache.mp4"


@pytest.fixture(scope="module")
def clip():
    from evaluator.reenact import decode

    src = open_video(CLIP, max_s=60, max_pixels=10**6)
    return src, source_speech(src, src.estimated_frames()), decode(CLIP)


def test_the_speakers_own_opening_is_read_off_the_frames_he_speaks_in(clip):
    src, heard, _ = clip
    assert heard is not None and heard.sum() >= 40
    gap = speaker.speaking_gap(src, heard)
    assert gap is not None and 0.095 <= gap <= 0.13, gap
    # His silent frames are not his speaking opening: read off them alone, the mouth is far less open.
    silent = speaker.speaking_gap(src, ~heard)
    assert silent is None or silent < 0.8 * gap
    # Too few speaking frames, or a soundtrack that cannot tell: no estimate.
    few = np.zeros_like(heard)
    few[np.flatnonzero(heard)[:speaker.STEP * (speaker.MIN_SAMPLES - 1)]] = True
    assert speaker.speaking_gap(src, few) is None
    assert speaker.speaking_gap(src, None) is None
    # Speech only after the window (a long clip whose person starts late): not decoded for, no estimate.
    late = np.zeros(int(speaker.WINDOW_S * float(src.fps)) + 200, bool)
    late[-150:] = True
    assert speaker.speaking_gap(src, late) is None


def test_a_wide_opener_gets_a_wider_mouth_within_bounds(clip):
    src, heard, real = clip
    phones, source = timings_for(real.audio, real.sample_rate, None, None)
    n = len(real.frames)
    ctl = speech_controls(real.audio, real.sample_rate, real.fps, n, phones, source)
    talking = speech_mask(real.audio, real.sample_rate, n, real.fps)
    gain = speaker.amplitude(speaker.speaking_gap(src, heard), ctl, talking)
    lo, hi = speaker.AMPLITUDE_RANGE
    assert 1.15 <= gain <= hi, gain
    assert speaker.amplitude(None, ctl, talking) == 1.0
    assert speaker.amplitude(0.5, ctl, talking) == hi and speaker.amplitude(0.001, ctl, talking) == lo
    assert speaker.amplitude(0.1, ctl, np.zeros(n, bool)) == 1.0  # no new speech to compare with


def test_amplitude_scales_the_opening_keeps_the_seals_and_the_speed_cap():
    phones = [("_", 0.0, 0.2), ("m", 0.2, 0.3), ("ɑ", 0.3, 0.6), ("p", 0.6, 0.7), ("a", 0.7, 1.0), ("_", 1.0, 1.4)]
    base = drive(1.4, 25.0, phonemes=phones, head_motion=False)
    wide = drive(1.4, 25.0, phonemes=phones, head_motion=False, amplitude=1.3)
    assert wide.mouth_open.max() == pytest.approx(1.3 * base.mouth_open.max(), rel=0.08)
    sealed = base.mouth_open < 1e-3
    assert sealed.any() and np.all(wide.mouth_open[sealed] < 1e-3)  # m and p still shut
    cap = _JAW_SPEED / 25.0 * SPEECH_OPEN
    assert np.abs(np.diff(wide.mouth_open)).max() <= cap + 1e-6
    np.testing.assert_array_equal(wide.mouth_round, base.mouth_round)
    for bad in (0.0, -1.0, float("nan"), 3.0):
        with pytest.raises(ValidationFailed):
            drive(1.0, 25.0, phonemes=phones, head_motion=False, amplitude=bad)
