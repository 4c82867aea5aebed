"""Tier 1: lip-sync pieces on real media: smoothing, length policies, probing, streamed decoding, audio."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gpu_service.errors import BadMedia, UnsupportedMediaType
from gpu_service.lipsync import stream_io as sio
from gpu_service.lipsync.tracking import FaceTracker, OneEuroFilter
from gpu_service.talking_head.video import encode_mp4


def test_one_euro_removes_jitter_but_follows_a_fast_move():
    rng = np.random.default_rng(1)
    f = OneEuroFilter()
    still = np.array([[100.0, 100.0], [150.0, 120.0]])
    out = [f(still + rng.normal(0, 1.0, still.shape), 0.04, 100.0) for _ in range(50)]
    jitter_in = 1.0
    jitter_out = float(np.std(np.array(out[10:])[:, 0, 0]))
    assert jitter_out < 0.45 * jitter_in
    # A 20 px (0.2 face) move, as fast as lips go: within 2 frames the filter has covered most of it.
    moved = [f(still + [20.0, 0.0], 0.04, 100.0) for _ in range(2)]
    assert moved[-1][0, 0] > 100.0 + 0.8 * 20.0


@pytest.mark.parametrize("policy,expected", [
    ("loop", [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]),
    ("pingpong", [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]),
])
def test_source_index_policies(policy, expected):
    assert [sio.source_index(i, 4, policy) for i in range(10)] == expected


def test_plan_length():
    assert sio.plan_length(100, 60, "pingpong") == 60  # shorter audio: every policy trims the video
    assert sio.plan_length(100, 160, "trim") == 100
    assert sio.plan_length(100, 160, "loop") == 160 and sio.plan_length(100, 160, "pingpong") == 160


@pytest.fixture(scope="module")
def numbered_clip(tmp_path_factory) -> Path:
    """12 frames at 25 fps whose grey level tells their index (20 * i), small and real H.264."""
    path = tmp_path_factory.mktemp("num") / "num.mp4"
    frames = [np.full((64, 96, 3), 20 * i, np.uint8) for i in range(12)]
    path.write_bytes(encode_mp4(frames, 25, (96, 64))[0])
    return path


def _indices(frames) -> list[int]:
    return [int(round(float(f.mean()) / 20.0)) for f in frames]


@pytest.mark.parametrize("policy", ["loop", "pingpong", "trim"])
def test_frames_in_order_streams_the_policy(numbered_clip, policy):
    src = sio.open_video(numbered_clip, max_s=60, max_pixels=10**6)
    assert src.size == (96, 64) and float(src.fps) == 25.0 and src.estimated_frames() == 12
    got = list(sio.frames_in_order(src, 40, policy, chunk=5))  # small chunks: several backward re-reads
    want = [sio.source_index(i, 12, policy) for i in range(sio.plan_length(12, 40, policy))]
    assert [i for i, _ in got] == want
    assert _indices(f for _, f in got) == want  # the pixels are those frames, backwards passes included


def test_probe_and_open_video_refuse_what_they_should(tmp_path, numbered_clip):
    info = sio.probe(numbered_clip)
    assert info.video_codec == "h264" and (info.width, info.height) == (96, 64) and info.fps == 25.0
    assert info.duration_s == pytest.approx(0.48, abs=0.05)
    with pytest.raises(BadMedia, match="at most 0.2 s"):
        sio.open_video(numbered_clip, max_s=0.2, max_pixels=10**6)
    with pytest.raises(BadMedia, match="pixels"):
        sio.open_video(numbered_clip, max_s=60, max_pixels=96 * 63)
    wav = tmp_path / "x.wav"
    sf.write(wav, np.zeros(8000, np.float32), 16000)
    with pytest.raises(BadMedia, match="no video stream"):
        sio.open_video(wav, max_s=60, max_pixels=10**6)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(numbered_clip.read_bytes()[:600])
    with pytest.raises(BadMedia, match="not a readable media file"):
        sio.open_video(junk, max_s=60, max_pixels=10**6)
    gif = tmp_path / "x.gif"
    import subprocess

    subprocess.run([sio.ffmpeg_exe(), "-loglevel", "error", "-i", str(numbered_clip), str(gif)], check=True)
    with pytest.raises(UnsupportedMediaType, match="gif"):
        sio.open_video(gif, max_s=60, max_pixels=10**6)


def test_exact_fps_recognises_ntsc():
    assert sio.exact_fps(29.97) == sio.Fraction(30000, 1001)
    assert sio.exact_fps(25.0) == 25 and sio.exact_fps(23.98) == sio.Fraction(24000, 1001)


def test_decode_audio_file(tmp_path):
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    ok = tmp_path / "ok.flac"
    sf.write(ok, tone, 16000)
    audio, rate = sio.decode_audio_file(ok)
    assert rate == 16000 and len(audio) == 16000 and np.abs(audio - tone).max() < 1e-3
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(BadMedia, match="silent"):
        sio.decode_audio_file(silent)
    with pytest.raises(BadMedia, match="at most 0.5 s"):
        sio.decode_audio_file(ok, max_s=0.5)
    text = tmp_path / "notes.wav"
    text.write_text("hello, not audio at all\n" * 50)
    with pytest.raises(BadMedia, match="not an audio file"):
        sio.decode_audio_file(text)


def test_tracker_follows_a_face_and_reports_none_without(media):
    frames = media["a_frames"]
    with FaceTracker(25.0) as tr:
        found = [tr.track(f) for f in frames[:10]]
        assert all(lm is not None and lm.shape == (478, 2) for lm in found)
        assert tr.track(np.full_like(frames[0], 128)) is None
        assert tr.track(frames[0]) is not None  # found again after losing it


def _astronaut_mouth(open_: float):
    """The talking head's astronaut rendered (uncompressed) with the mouth open by `open_`, and its encoding."""
    from gpu_service.talking_head.controls import Controls
    from gpu_service.talking_head.encoding import encode_image
    from gpu_service.talking_head.renderer import Renderer
    from tests.lipsync.media import astronaut_portrait

    enc = encode_image(astronaut_portrait(320))
    c = Controls.neutral(1, 25.0)
    c.mouth_open[:] = open_
    return Renderer("cpu").render(enc, c, head_motion=False)[0]


def test_refine_inner_lips_reaches_the_visible_opening_and_leaves_a_closed_mouth():
    from gpu_service.lipsync.mouth import refine_inner_lips
    from gpu_service.talking_head import landmarks as L

    wide = _astronaut_mouth(0.6)
    lm = L.detect_faces(wide)[0].copy()
    # MediaPipe can put the lower inner lip on the lower teeth (on real frames, and on renders with drawn
    # teeth): made here by lifting the detected lower inner lip by 4 px. The refinement moves it down to the
    # visible opening, never up.
    lm[L.INNER_LOWER_MID, 1] -= 4.0
    moved = refine_inner_lips(wide, lm)
    down = (moved - lm)[L.INNER_LOWER_MID, 1]
    assert down.max() > 1.0 and down.min() >= 0.0
    assert np.all((moved - lm)[L.INNER_UPPER, 1] <= 0.0)
    closed = _astronaut_mouth(0.0)
    lm = L.detect_faces(closed)[0]
    assert np.abs(refine_inner_lips(closed, lm) - lm).max() < 1.5


@pytest.mark.parametrize("open_", [0.6, 1.0])
def test_a_wide_open_frame_closes_completely(open_):
    """Re-voicing closes a source frame's mouth however far it was open: no gap left for a tracker to read."""
    from evaluator.metrics.face import measure_image
    from gpu_service.lipsync.engines.landmark import CLOSE_SEAM
    from gpu_service.lipsync.mouth import refine_inner_lips
    from gpu_service.talking_head import landmarks as L
    from gpu_service.talking_head.controls import Controls
    from gpu_service.talking_head.encoding import encode_from_landmarks
    from gpu_service.talking_head.renderer import Renderer

    wide = _astronaut_mouth(open_)
    assert measure_image(wide).mouth_gap[0] > 0.09
    lm = refine_inner_lips(wide, L.detect_faces(wide)[0])
    enc = encode_from_landmarks(wide, lm, seam=CLOSE_SEAM, follow_gap=True)
    out = next(iter(Renderer("cpu").frames(enc, Controls.neutral(1, 25.0), head_motion=False, close_upper=CLOSE_SEAM)))
    # At the midline with a 0.4/0.6 split and the oval fall-off this left 0.043 (0.6) and 0.10 (1.0).
    assert measure_image(out).mouth_gap[0] < 0.03


def test_closes_compares_the_new_opening_with_this_frames_gap():
    from gpu_service.lipsync.engines.landmark import closes
    from gpu_service.talking_head.controls import Controls
    from gpu_service.talking_head.encoding import encode_image
    from tests.lipsync.media import astronaut_portrait

    enc = encode_image(astronaut_portrait(320))
    c = Controls.neutral(1, 25.0)
    assert closes(None, c, 5.0)  # no face size known yet: close
    g_max = enc.geometry.max_gap
    c.mouth_open[:] = 0.5
    assert not closes(enc, c, 0.2 * g_max) and closes(enc, c, 0.8 * g_max)


@pytest.mark.parametrize("roll_deg,seam,follow", [(0.0, 0.5, False), (18.0, 0.15, True), (-12.0, 0.15, True)])
def test_mouth_only_encoding_matches_the_full_one(roll_deg, seam, follow):
    """The lip-sync's fast encoding builds the mouth's fields over the window they reach and is cropped to it:
    inside, they must equal the full ones; outside, the full ones must be zero; the frames must be the same."""
    import cv2

    from gpu_service.lipsync.engines.landmark import CLOSE_SEAM
    from gpu_service.lipsync.mouth import refine_inner_lips
    from gpu_service.talking_head import landmarks as L
    from gpu_service.talking_head.controls import Controls
    from gpu_service.talking_head.encoding import MODES, MOUTH_MODES, encode_from_landmarks, measure_appearance
    from gpu_service.talking_head.renderer import Renderer

    img = _astronaut_mouth(0.6)
    if roll_deg:  # a tilted head: the mouth's reach is a rotated box inside the crop
        m = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2), roll_deg, 1.0)
        img = cv2.warpAffine(img, m, img.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
    lm = refine_inner_lips(img, L.detect_faces(img)[0])
    full = encode_from_landmarks(img, lm, seam=seam, follow_gap=follow)
    fast = encode_from_landmarks(img, lm, seam=seam, follow_gap=follow, mouth_only=True)
    # The fast crop is a window of the full one, a good deal smaller (the lips to the chin, not the head).
    ox, oy = fast.crop.x0 - full.crop.x0, fast.crop.y0 - full.crop.y0
    assert ox >= 0 and oy >= 0 and fast.crop.x1 <= full.crop.x1 and fast.crop.y1 <= full.crop.y1
    assert fast.crop.width * fast.crop.height < 0.6 * full.crop.width * full.crop.height
    win = (slice(None), slice(oy, oy + fast.crop.height), slice(ox, ox + fast.crop.width))
    mouth = [MODES.index(m) for m in MOUTH_MODES]
    assert np.array_equal(full.bases[mouth][win], fast.bases[mouth])
    outside = full.bases[mouth].copy()
    outside[win] = 0.0
    assert not outside.any()  # nothing the crop leaves out moves
    assert np.abs(full.bases[mouth]).max() > 0.9  # the fields are real (unit amounts), not two empty arrays
    others = [k for k in range(len(MODES)) if k not in mouth]
    assert not fast.bases[others].any() and full.bases[others].any()
    # Crop coordinates shift with the window; everything else about the face is the same.
    assert fast.geometry.mouth_x == full.geometry.mouth_x - ox and fast.geometry.mouth_y == full.geometry.mouth_y - oy
    assert replace(fast.geometry, mouth_x=0.0, mouth_y=0.0) == replace(full.geometry, mouth_x=0.0, mouth_y=0.0)
    assert tuple(fast.patch) == (full.patch.x0 - ox, full.patch.y0 - oy, full.patch.x1 - ox, full.patch.y1 - oy)
    assert fast.head_mask.shape == (fast.crop.height, fast.crop.width) and not fast.head_mask.any()
    for name in ("patch_side", "patch_mask", "lut_upper", "lut_lower", "palette", "teeth_rgb"):
        assert np.array_equal(getattr(full, name), getattr(fast, name)), name
    # The interior's colours measured on the whole frame (as lip-sync does, then reuses) are the crop's.
    assert fast.geometry == encode_from_landmarks(img, lm, seam=seam, follow_gap=follow, mouth_only=True,
                                                  appearance=measure_appearance(img, lm)).geometry
    # With the controls a re-voice uses (eyes, brows, smile left as filmed) the frames are the same: sample
    # positions counted from another origin round differently in float32, which may move a pixel by one level.
    c = Controls.neutral(2, 25.0)
    c.mouth_open[:] = [0.0, 0.8]
    c.mouth_spread[:] = [0.5, -0.3]
    c.lip_tuck[:] = [0.4, 0.0]
    r = Renderer("cpu")
    for a, b in zip(r.frames(full, c, head_motion=False, close_upper=CLOSE_SEAM),
                    r.frames(fast, c, head_motion=False, close_upper=CLOSE_SEAM)):
        diff = np.abs(a.astype(np.int16) - b)
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 20, (diff.max(), np.count_nonzero(diff))
        assert not np.array_equal(a, img)  # the mouth did move


def test_read_ahead_keeps_order_raises_where_the_producer_failed_and_stops_it_when_left():
    import threading

    closed = threading.Event()

    def numbers(fail_at=None):
        try:
            for i in range(1000):
                if i == fail_at:
                    raise ValueError(f"broken at {i}")
                yield i
        finally:
            closed.set()

    with sio.ReadAhead(numbers(), depth=3) as items:
        assert list(items) == list(range(1000))
    assert closed.is_set()
    closed.clear()
    got = []
    with pytest.raises(ValueError, match="broken at 7"):
        with sio.ReadAhead(numbers(fail_at=7)) as items:
            got.extend(items)
    assert got == list(range(7)) and closed.is_set()
    closed.clear()
    # Leaving early (the consumer stopped) ends the producer's thread and closes its generator (an ffmpeg pipe).
    with sio.ReadAhead(numbers(), depth=2, name="early") as items:
        for i in items:
            if i == 5:
                break
    assert closed.wait(5) and not any(t.name == "early" for t in threading.enumerate())
