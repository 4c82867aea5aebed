"""Shared silences (gpu_service/lipsync/silence.py): where nobody speaks, the filmed mouth is kept.

The real clip is the kit's v01 (its own soundtrack: he sits silent, mouth parted, for 0.59 s before
he speaks, and is silent after 2.81 s), re-voiced with its own audio and with other speech.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpu_service.lipsync.silence import MARGIN_S, RAMP_S, filmed_weights, toward_filmed
from gpu_service.talking_head.controls import Controls
from gpu_service.talking_head.video import ffmpeg_exe, read_frames

REPO = Path(__file__).resolve().parents[2]
CLIP = REPO / "tests" / "fixtures" / "media" / "v01_grid_swiz3n_darker_skin_moustache.mp4"
OTHER = REPO / "tests" / "fixtures" / "media" / "a03_cmu_goforward_male.wav"
FPS = 25.0


def _mask(n: int, *spans: tuple[int, int]) -> np.ndarray:
    m = np.zeros(n, bool)
    for a, b in spans:
        m[a:b] = True
    return m


def test_weights_keep_only_frames_well_inside_a_silence_both_share():
    n = 100
    new = _mask(n, (30, 60))   # the new speech speaks at frames 30-59
    old = _mask(n, (20, 50), (80, 90))  # the filmed person at 20-49 and 80-89
    w = filmed_weights(new, old, n, n, "trim", FPS)
    quiet = ~(new | old)
    assert np.all(w[~quiet] == 0.0)  # anyone speaking: rendered
    margin = int(np.floor(MARGIN_S * FPS))
    assert np.all(w[20 - margin:20] == 0.0) and np.all(w[60:60 + margin] == 0.0)  # lips prepare and relax
    full = int(np.ceil((MARGIN_S + RAMP_S) * FPS))
    assert np.all(w[:20 - full] == 1.0) and np.all(w[60 + full:80 - full] == 1.0) and np.all(w[90 + full:] == 1.0)
    ramp = w[20 - full:20 - margin]
    assert np.all(np.diff(ramp) <= 0) and 0.0 < ramp.max() <= 1.0  # eases out towards the speech


def test_weights_follow_the_source_frame_each_output_frame_shows():
    # A 40-frame source played pingpong for 100 frames: output frame 60 shows source frame 18.
    old = _mask(40, (10, 25))
    new = np.zeros(100, bool)
    new[95:] = True
    w = filmed_weights(new, old, 100, 40, "pingpong", FPS)
    from gpu_service.lipsync.stream_io import source_index
    shown = np.array([source_index(i, 40, "pingpong") for i in range(100)])
    assert np.all(w[(shown >= 10) & (shown < 25)] == 0.0)
    assert w[shown == 0].max() == 1.0


def test_nothing_is_kept_without_a_soundtrack_that_tells():
    n = 50
    assert filmed_weights(_mask(n, (10, 20)), None, n, n, "trim", FPS) is None  # no source audio / silent track
    assert filmed_weights(None, _mask(n, (10, 20)), n, n, "trim", FPS) is None
    assert filmed_weights(np.ones(n, bool), _mask(n, (10, 20)), n, n, "trim", FPS) is None  # always someone


def test_toward_filmed_at_full_share_warps_nothing():
    from dataclasses import replace

    from gpu_service.talking_head.encoding import encode_image
    from gpu_service.talking_head.renderer import mode_weights
    import cv2

    img = cv2.cvtColor(cv2.imread(str(REPO / "tests/fixtures/media/p01_neutral_closed_mouth_grid_bbaf2n_f000.png")),
                       cv2.COLOR_BGR2RGB)
    enc = encode_image(img)
    like = replace(enc, geometry=replace(enc.geometry, rest_gap=0.06 * enc.geometry.face_height))  # a parted mouth
    c = Controls.neutral(1, FPS)
    c.mouth_open[:], c.mouth_round[:] = 0.0, 0.5
    kept = toward_filmed(c, like, 1.0)
    assert abs(float(mode_weights(like, kept)[0, 0])) < 0.02 * like.geometry.rest_gap  # the jaw stays where filmed
    assert float(kept.mouth_round[0]) == 0.0
    half = toward_filmed(c, like, 0.5)
    assert float(mode_weights(like, c)[0, 0]) < float(mode_weights(like, half)[0, 0]) < 0.0  # part of the way
    assert toward_filmed(c, like, 0.0).mouth_open[0] == c.mouth_open[0]


@pytest.fixture(scope="module")
def engine():
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync

    eng = LandmarkLipSync()
    eng.load("cpu")
    return eng


def _decode_audio(path: Path) -> np.ndarray:
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-ac", "1", "-ar", "16000", "-f", "f32le",
                          "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.float32).copy()


def _revoice(engine, video: Path, audio: np.ndarray, silence: str = "filmed"):
    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.stream_io import open_video

    return engine.lipsync(LipSyncJob(video=open_video(video, max_s=60, max_pixels=10**6), audio=audio,
                                     sample_rate=16000, length_policy="trim", silence=silence))


def test_the_filmed_mouth_stays_where_neither_speaks(engine):
    audio = _decode_audio(CLIP)
    res = _revoice(engine, CLIP, audio)
    rendered = _revoice(engine, CLIP, audio, silence="rendered")
    src = read_frames(CLIP.read_bytes(), (res.width, res.height)).astype(np.int16)
    out = read_frames(res.mp4, (res.width, res.height)).astype(np.int16)
    again = read_frames(rendered.mp4, (res.width, res.height)).astype(np.int16)
    # The mouth region: where rendering changed the picture while he speaks.
    region = np.abs(again[20:60] - src[20:60]).max(axis=(0, 3)) > 25
    assert region.sum() > 200
    diff = [float(np.abs(o - f)[region].mean()) for o, f in zip(out, src)]
    diff_rendered = [float(np.abs(o - f)[region].mean()) for o, f in zip(again, src)]
    print(res.frames_as_filmed, [round(d, 1) for d in diff[:12]], [round(d, 1) for d in diff_rendered[:12]])
    # He speaks from 0.59 s (his in-breath is heard from about 0.45 s) to 2.81 s of 3.0: the first 7 frames are his.
    assert 5 <= res.frames_as_filmed <= 12, res.frames_as_filmed
    assert res.filmed_spans == [(0, res.frames_as_filmed)]  # all at the start, before he speaks
    assert rendered.frames_as_filmed == 0
    assert max(diff[:5]) < 2.5, diff[:5]  # as filmed, up to one more H.264 pass
    assert min(diff_rendered[:5]) > 2 * max(diff[:5]), diff_rendered[:5]  # rendered, his parted lips were closed
    assert np.median(diff[20:60]) > 2 * max(diff[:5])  # while he speaks, the mouth is ours


def test_a_source_without_a_soundtrack_is_rendered_throughout(engine, tmp_path):
    mute = tmp_path / "mute.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(CLIP), "-an", "-c:v", "copy", str(mute)], check=True)
    assert _revoice(engine, mute, _decode_audio(CLIP)).frames_as_filmed == 0


def test_new_speech_over_the_filmed_silence_is_rendered(engine):
    import scipy.signal as ss

    from tests.speech_kit import load_clip

    speech = load_clip(OTHER)
    audio = ss.resample_poly(speech.audio, 16000, speech.sample_rate).astype(np.float32)
    start = int(speech.words[0][1] * 16000)  # a03 from its first word: it speaks over v01's silent start
    res = _revoice(engine, CLIP, audio[start:start + 3 * 16000])
    assert res.frames_as_filmed == 0, res.frames_as_filmed


def test_a_source_shorter_than_probed_is_redone_with_its_soundtrack_decoded_once(engine, tmp_path, monkeypatch):
    """A file cut short (its header still says 3 s) decodes fewer frames than it probes: the job is
    redone on the frames there are, and the source's soundtrack is decoded once for both passes."""
    from gpu_service.lipsync import silence
    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.stream_io import open_video

    whole = tmp_path / "whole.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(CLIP), "-c", "copy", "-movflags", "+faststart", str(whole)],
                   check=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(0.83 * whole.stat().st_size)])  # the index first, then 83% of the media
    src = open_video(cut, max_s=60, max_pixels=10**6)
    decodable = sum(1 for _ in src.forward())
    assert src.estimated_frames() == 75 and 40 < decodable < 75, decodable
    calls = []
    real = silence.decode_pcm
    monkeypatch.setattr(silence, "decode_pcm", lambda *a, **k: calls.append(a) or real(*a, **k))
    res = engine.lipsync(LipSyncJob(video=src, audio=_decode_audio(CLIP), sample_rate=16000, length_policy="trim",
                                    silence="filmed"))
    assert res.frames == decodable and res.duration_s == pytest.approx(decodable / FPS)
    assert len(calls) == 1, calls
    # What is left of his soundtrack still says he sits silent at the start: kept as filmed on the second pass too.
    assert 5 <= res.frames_as_filmed <= 12 and res.filmed_spans == [(0, res.frames_as_filmed)]
