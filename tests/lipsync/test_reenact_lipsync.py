"""Lip-sync re-enacts a real talker (the kit's v01) from his own audio, in process, as `evaluator reenact` does,
and follows other speech when given other speech.

The clip is re-voiced with its own audio (timings derived as the service derives them, by phone
recognition) and measured against itself (evaluator.reenact.compare, MediaPipe): the opening as wide
as the talker's (amp within 0.7-1.4) and no frame-to-frame change beyond real speech's (jump within
0.05 per 40 ms, or the clip's own largest where that is higher, 0.088 on v01, with test_reenact_head's
allowance for MediaPipe's snap under this moustache).

Re-voiced with its own audio, an engine that passed the source through untouched would score
perfectly, so the clip is also re-voiced with other speech (the kit's a03, "go forward ten meters"):
the output, given that speech's reference timings, must follow the mouth they call for (driving's
opening from the same timings) far better than the filmed mouth does (what passing the source through would score), and
must no longer move like the filmed mouth.
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluator.metrics import mouth_match as mm
from evaluator.metrics.judges import MEDIAPIPE
from evaluator.reenact import compare, cross_figures, decode, measure_reference
from tests.helpers import REPO

CLIP = REPO / "tests" / "fixtures" / "media" / "v01_grid_swiz3n_darker_skin_moustache.mp4"
AMP = (0.7, 1.4)
JUMP = 0.05
SNAP = 0.01


@pytest.fixture(scope="module")
def revoice(tmp_path_factory):
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync
    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.stream_io import open_video
    from gpu_service.speech.alignment import timings_for

    engine = LandmarkLipSync()
    engine.load("cpu")
    folder = tmp_path_factory.mktemp("revoice")

    def run(audio: np.ndarray, rate: int, name: str, phones=None, silence: str = "filmed"):
        source = "request"
        if phones is None:  # derived as the service derives them for speech that comes without text
            phones, source = timings_for(audio, rate, None, None)
        res = engine.lipsync(LipSyncJob(video=open_video(CLIP, max_s=60, max_pixels=10**6), audio=audio,
                                        sample_rate=rate, length_policy="trim", phonemes=phones,
                                        timing_source=source, silence=silence))
        path = folder / f"{name}.mp4"
        path.write_bytes(res.mp4)
        return decode(path)

    return run


@pytest.fixture(scope="module")
def ref():
    return measure_reference(decode(CLIP), MEDIAPIPE)


def test_revoiced_with_its_own_audio_opens_as_wide_and_no_faster_than_the_talker(ref, revoice):
    real = ref.video
    figs, _, _ = compare(ref, revoice(real.audio, real.sample_rate, "own"))
    own = float(np.nanmax(np.abs(np.diff(ref.gap))))
    assert AMP[0] <= figs["amp"] <= AMP[1], figs
    assert figs["jump"] <= max(JUMP, own) + SNAP, (figs["jump"], own)
    # The r >= 0.6: 0.65 (0.34 before "t w" was recognised as such, alignment._onglides).
    assert figs["r"] >= 0.6, figs
    # and its lmd <= 0.8 of a still mouth's: 0.72; 0.83 before his silent, parted lips were kept as filmed (silence.py).
    assert figs["lmd_over_still"] <= 0.8, figs


def test_revoiced_with_other_speech_follows_that_speech_not_the_filmed_mouth(ref, revoice):
    from gpu_service.speech.alignment import ipa
    from gpu_service.talking_head.driving import drive
    from tests.speech_kit import load_clip

    real = ref.video
    speech = load_clip(REPO / "tests" / "fixtures" / "media" / "a03_cmu_goforward_male.wav")
    phones = [(ipa(p, e - s), s, e) for p, s, e in speech.phones]  # its reference timings, for both
    out = revoice(speech.audio, speech.sample_rate, "a03", phones)
    gap = MEDIAPIPE.mouth_gap(mm.resample_landmarks(MEDIAPIPE.track(out.frames), out.times, real.times))
    wanted = drive(speech.duration_s, real.fps, phonemes=phones, audio=speech.audio, sample_rate=speech.sample_rate)
    figs = cross_figures(gap, ref.gap, wanted.mouth_open.astype(np.float64), real.fps)
    # Measured: r 0.69 at lag 0, passthrough 0.44, r against the filmed mouth 0.34 (passing through: 1.0).
    assert figs["r"] >= 0.6 and abs(figs["lag_frames"]) <= 1 and figs["margin"] >= 0.15 and figs["r_filmed"] <= 0.5, figs


def test_revoiced_with_silence_shows_none_of_the_filmed_speech(ref, revoice):
    # Every mouth rendered (no frame kept as filmed) and nothing said: each frame's own opening must be
    # closed away, or the old speech leaks through. v01 opens to 0.113 face heights (p95); measured
    # through the service: p95 0.002, largest 0.012 (frame 53, as his lips start to part). Passing the
    # source through scores his own 0.113; a tracker that reads half his opening, p95 0.064.
    real = ref.video
    hush = np.random.default_rng(0).normal(0.0, 1e-4, int(16000 * len(real.frames) / real.fps)).astype(np.float32)
    out = revoice(hush, 16000, "silent", [], silence="rendered")
    gap = MEDIAPIPE.mouth_gap(mm.resample_landmarks(MEDIAPIPE.track(out.frames), out.times, real.times))
    assert np.isfinite(gap).mean() > 0.95
    assert np.nanpercentile(gap, 95) <= 0.01 and np.nanmax(gap) <= 0.03, (np.nanpercentile(gap, 95), np.nanmax(gap))
    assert np.nanpercentile(ref.gap, 95) > 0.08  # ... where his own mouth does open


def test_drawn_teeth_take_the_persons_own_colour_from_the_frames_that_show_them():
    # v01's teeth are a warm yellow under GRID's light; a frame with closed lips shows none, and the drawn
    # ones were an off-white estimated from his highlights. Re-voiced with other speech, every frame whose
    # teeth are drawn takes the colour his own showed (TeethBank). Measured through the service on v03,
    # whose own are greyer: the brightest inner-lip pixels over the cheek's went 1.10 -> 0.91 (real 0.94).
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync, _new_stats, speech_controls
    from gpu_service.lipsync.stream_io import open_video
    from gpu_service.talking_head.encoding import interior_palette
    from tests.speech_kit import load_clip
    import scipy.signal as ss

    speech = load_clip(REPO / "tests" / "fixtures" / "media" / "a03_cmu_goforward_male.wav")
    audio = ss.resample_poly(speech.audio, 16000, speech.sample_rate).astype(np.float32)[:3 * 16000]
    src = open_video(CLIP, max_s=60, max_pixels=10**6)
    engine = LandmarkLipSync()
    engine.load("cpu")
    controls = speech_controls(audio, 16000, float(src.fps), 75)
    own, drawn = [], []
    for frame, enc, _, _, _ in engine._face_work(src, controls, "trim", _new_stats(), 1, 0):
        if enc is None:
            continue
        if enc.geometry.own_teeth > 0:
            own.append(np.asarray(enc.teeth_rgb, np.float32))
        elif own:
            drawn.append((np.asarray(enc.teeth_rgb, np.float32), np.mean(own[-25:], axis=0),
                          interior_palette(frame, enc.frame_landmarks)[1]))
    assert len(own) >= 10 and len(drawn) >= 10, (len(own), len(drawn))
    for teeth, seen, guessed in drawn:
        assert np.abs(teeth - seen).max() < 1.0, (teeth, seen)
    # ... which is not what the estimate alone gives
    assert np.median([np.abs(seen - guessed).max() for _, seen, guessed in drawn]) > 10.0
