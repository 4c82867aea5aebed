"""The talking head re-enacts a real talker (the kit's v01) from his own audio, in process, as `evaluator reenact` does.

The portrait is the clip's first closed-mouth frame; driving gets the clip's audio and the phoneme
timings the service derives for audio sent without them or its text (phone recognition, as the reenact
measure sends it); the frames go through the service's own MP4 encoding and
are measured against the real clip by evaluator.reenact.compare (MediaPipe). The guarantees are the
realism issue's: the opening as wide as the talker's (amp within 0.7-1.4; it was 2.06 when the mouth
opened to a fifth of the face), and no frame-to-frame change larger than real speech makes (jump
within 0.05 per 40 ms, or the real clip's own largest where that is higher: 0.087 on v01).

On v01 MediaPipe reads an opening below ~0.045 face heights under the moustache as shut and one of
0.06 as 0.09-0.1, his and ours alike: a closing at the jaw's top speed (0.026 per frame) that passes
that point reads as a jump of 0.083-0.103 depending on the head's drift (0.095 with the head still),
where his own reads 0.087. SNAP allows for that; the renderer of the issue jumped by 0.153.
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluator.metrics.judges import MEDIAPIPE
from evaluator.metrics.mouth_match import upper_share
from evaluator.reenact import closed_frame, compare, decode, measure_reference
from gpu_service.speech.alignment import timings_for
from gpu_service.talking_head.driving import drive, lip_lead
from gpu_service.talking_head.encoding import encode_image
from gpu_service.talking_head.renderer import Renderer
from gpu_service.talking_head.video import encode_mp4
from tests.helpers import REPO

CLIP = REPO / "tests" / "fixtures" / "media" / "v01_grid_swiz3n_darker_skin_moustache.mp4"
AMP = (0.7, 1.4)
JUMP = 0.05
SNAP = 0.01


@pytest.fixture(scope="module")
def reenacted(tmp_path_factory):
    """(figures, the real clip's own max jump, his upper_share) of the head driven by v01's audio on v01's closed frame."""
    real = decode(CLIP)
    ref = measure_reference(real, MEDIAPIPE)
    k, closed = closed_frame(ref.gap)
    assert closed
    enc = encode_image(real.frames[k])
    phones, source = timings_for(real.audio, real.sample_rate, None, None)
    assert source == "phone_recognition"
    controls = drive(len(real.audio) / real.sample_rate, real.fps, phonemes=phones, audio=real.audio,
                     sample_rate=real.sample_rate, avatar_key="v01", lip_lead_s=lip_lead(source))
    frames = Renderer("cpu").render(enc, controls)
    mp4, _ = encode_mp4(frames, real.fps, (frames.shape[2], frames.shape[1]), audio=real.audio,
                        sample_rate=real.sample_rate)
    path = tmp_path_factory.mktemp("reenact") / "head.mp4"
    path.write_bytes(mp4)
    figs, _, _ = compare(ref, decode(path))
    own = float(np.nanmax(np.abs(np.diff(ref.gap))))
    return figs, own, upper_share(ref.landmarks, MEDIAPIPE)


def test_the_head_opens_as_wide_as_the_real_talker(reenacted):
    figs, _, _ = reenacted
    assert AMP[0] <= figs["amp"] <= AMP[1], figs


def test_the_head_never_moves_faster_than_real_speech(reenacted):
    figs, own, _ = reenacted
    assert figs["jump"] <= max(JUMP, own) + SNAP, (figs["jump"], own)


def test_the_head_follows_the_talkers_mouth(reenacted):
    # The issue's target, r >= 0.6, and in step with him: lag 0. From v01's audio alone the head reaches
    # 0.77 in process (0.71 through the service, whose head drifts), 0.46 before the recogniser's "uw"
    # run into a vowel was read as the /w/ it is (alignment._onglides): "set white" had kept the lips
    # open where his close. With the lip lead that Piper's timings need, 0.78 but a frame early (lag -1):
    # recognised timings get none (driving.lip_lead).
    figs, _, _ = reenacted
    assert figs["r"] >= 0.6 and figs["lag_frames"] == 0, figs


def test_the_head_opens_with_the_upper_lip_as_the_talker_does(reenacted):
    # Real talkers lift the upper lip as they open (the kit's v01-v03: 0.42/0.18/0.37 of the opening lies
    # above the line between the mouth corners), which is what shows their upper teeth. When the jaw took
    # all but 0.15 of the opening, our heads read 0.31/-0.03/0.26 there (a sliver of teeth over a dark
    # hole); with encoding.UPPER_LIP_SHARE at 0.3, 0.41/0.09/0.35.
    figs, _, his = reenacted
    assert his is not None and figs["upper_share"] is not None
    assert abs(figs["upper_share"] - his) <= 0.06, (figs["upper_share"], his)
