"""Gaze: small shifts of where the eyes look, drawn per avatar and seed, and rendered by moving the iris inside the eye.

Driving: a speaker mostly looks at the listener (the camera), with shifts of about a degree between
fixations, and now and then looks away sideways for a fraction of a second (driving._GazeSchedule);
with speech, looks back at the listener as each phrase ends and often away as one begins after a pause.
The clip starts looking as the portrait does. Rendering: the gaze fields slide the iris and the
white around it inside the eye's opening; the lids, brows and everything outside the eyes stay.
Measured on the kit's p05 (glasses) by the iris's dark-pixel centroid inside each eye's lid outline:
MediaPipe's own iris points move about half as far as the pixels do (its iris is a fitted disc).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from gpu_service.lipsync.engines.landmark import speech_controls
from gpu_service.talking_head import landmarks as L
from gpu_service.talking_head.controls import Controls
from gpu_service.talking_head.driving import GAZE_AVERT, IdleMotion, drive
from gpu_service.talking_head.encoding import encode_image
from gpu_service.talking_head.renderer import GAZE_MAX, Renderer
from tests.helpers import REPO

PORTRAIT = REPO / "tests" / "fixtures" / "media" / "p05_glasses_older_woman_grace_hopper.jpg"
FPS = 25.0


def shifts(x: np.ndarray, y: np.ndarray, least: float = 0.004) -> np.ndarray:
    """Frames where the gaze jumps by more than `least` eye widths (a saccade)."""
    return np.flatnonzero(np.hypot(np.diff(x), np.diff(y)) > least) + 1


def test_a_clip_looks_at_the_camera_first_then_shifts_its_gaze_now_and_then():
    c = drive(60.0, FPS, seed=0, avatar_key="grace")
    assert c.gaze_x[0] == 0.0 and c.gaze_y[0] == 0.0  # the portrait's own gaze
    jumps = shifts(c.gaze_x, c.gaze_y)
    # Fixations last 0.3-3 s: 20-120 gaze shifts a minute, none in the first 0.8 s.
    assert 20 <= len(jumps) <= 120 and jumps[0] >= 0.8 * FPS, len(jumps)
    assert np.abs(c.gaze_x).max() <= GAZE_AVERT[1] + 1e-6 and np.abs(c.gaze_y).max() <= 0.05
    # Mostly on the listener: within 2 degrees (0.015 eye widths) most of the time, away at times.
    near = np.hypot(c.gaze_x, c.gaze_y) < 0.015
    assert 0.5 <= near.mean() <= 0.95 and (np.abs(c.gaze_x) >= GAZE_AVERT[0] - 1e-6).any()
    # A saccade is over within two frames: the eyes jump, they do not drift.
    assert np.abs(np.diff(c.gaze_x, 2)).max() > 0.02


def test_gaze_differs_per_avatar_and_per_seed_and_repeats_for_the_same():
    def gaze(**kw) -> np.ndarray:
        c = drive(20.0, FPS, **kw)
        return np.stack([c.gaze_x, c.gaze_y])

    a = gaze(seed=0, avatar_key="astro")
    assert np.array_equal(a, gaze(seed=0, avatar_key="astro"))
    assert not np.array_equal(a, gaze(seed=0, avatar_key="grace"))
    assert not np.array_equal(a, gaze(seed=1, avatar_key="astro"))
    assert set(shifts(*a)) != set(shifts(*gaze(seed=0, avatar_key="grace")))


def test_gaze_leaves_the_blinks_and_the_head_as_they_were_drawn():
    # Gaze has its own generator: adding it moved no blink and no head drift of an existing seed.
    c = drive(20.0, FPS, seed=3, avatar_key="astro")
    idle = IdleMotion(FPS, seed=3, avatar_key="astro").apply(Controls.neutral(c.n_frames, FPS), 0)
    assert np.array_equal(idle.gaze_x, c.gaze_x) and np.array_equal(idle.gaze_y, c.gaze_y)


def test_revoiced_video_keeps_the_filmed_gaze():
    audio = np.sin(np.linspace(0, 2000, 32000)).astype(np.float32) * 0.3
    c = speech_controls(audio, 16000, FPS, 50)
    assert not c.gaze_x.any() and not c.gaze_y.any()


def _iris(frame: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(2 eyes, x y) centroid of each eye's darkest third inside its lid outline (the iris and pupil)."""
    lum = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    ys, xs = np.mgrid[: frame.shape[0], : frame.shape[1]]
    out = []
    for upper, lower in ((L.EYE_LEFT_UPPER, L.EYE_LEFT_LOWER), (L.EYE_RIGHT_UPPER, L.EYE_RIGHT_LOWER)):
        mask = np.zeros(frame.shape[:2], np.uint8)
        cv2.fillPoly(mask, [np.concatenate([lm[upper], lm[lower][::-1]]).astype(np.int32)], 1)
        w = np.clip(np.percentile(lum[mask > 0], 30) - lum, 0, None) * mask
        out.append([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    return np.array(out)


@pytest.fixture(scope="module")
def rendered():
    image = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    enc = encode_image(image)
    c = Controls.neutral(4, FPS)
    c.gaze_x[:] = [0.0, 0.06, -0.06, 0.0]
    c.gaze_y[:] = [0.0, 0.0, 0.0, 0.04]
    return enc, c, Renderer("cpu").render(enc, c, head_motion=False)


def test_the_iris_moves_where_the_gaze_asks(rendered):
    enc, c, frames = rendered
    ew = enc.geometry.eye_width
    assert 0.15 * enc.geometry.face_height < ew < 0.25 * enc.geometry.face_height
    rest = _iris(frames[0], enc.landmarks)
    for k in (1, 2, 3):
        moved = _iris(frames[k], enc.landmarks) - rest
        asked = np.array([c.gaze_x[k], c.gaze_y[k]]) * ew  # 2.2 px sideways, 1.5 px down on this face
        main = int(np.argmax(np.abs(asked)))
        # Each eye's iris goes at least 60 % of the way asked (the lids hide part of it), the other way hardly.
        assert np.all(moved[:, main] * np.sign(asked[main]) >= 0.6 * abs(asked[main]) - 0.25), (k, moved, asked)
        assert np.all(np.abs(moved[:, 1 - main]) <= 0.5), (k, moved)


def test_gaze_moves_nothing_but_the_eyes(rendered):
    enc, _, frames = rendered
    lm = enc.landmarks
    eyes = np.zeros(enc.image.shape[:2], bool)
    for upper, lower in ((L.EYE_LEFT_UPPER, L.EYE_LEFT_LOWER), (L.EYE_RIGHT_UPPER, L.EYE_RIGHT_LOWER)):
        x0, y0 = np.floor(lm[upper + lower].min(0)).astype(int) - 2
        x1, y1 = np.ceil(lm[upper + lower].max(0)).astype(int) + 3
        eyes[y0:y1, x0:x1] = True
    diff = np.abs(frames[1:].astype(np.int16) - frames[0].astype(np.int16)).max(axis=(0, 3))  # frame 0: gaze 0
    assert not diff[~eyes].any() and diff[eyes].max() > 40
    # The lids stay: MediaPipe reads the eyes' opening within 0.75 px of the portrait's. (Its reading of these
    # untouched lids moves with pixels elsewhere: the same frames with main's mouth read 0.30 / 0.38 / 0.07 px
    # off, with the interior branch's pressed-lip seam 0.38 / 0.61 / 0.09; the pixels outside the eyes are
    # the same in every frame, as asserted above.)
    def opening(frame):
        m = L.detect_faces(frame)[0]
        return np.mean([m[lo, 1] - m[up, 1] for up, lo in (L.LID_MID_LEFT, L.LID_MID_RIGHT)])
    base = opening(frames[0])
    assert all(abs(opening(f) - base) < 0.75 for f in frames[1:])


def test_the_gaze_asked_is_held_to_what_the_eye_can_show(rendered):
    enc, _, _ = rendered
    from gpu_service.talking_head.renderer import mode_weights
    from gpu_service.talking_head.encoding import MODES

    c = Controls.neutral(2, FPS)
    c.gaze_x[:] = [1.0, -1.0]
    w = mode_weights(enc, c)[:, MODES.index("gaze_x")]
    assert np.allclose(np.abs(w), GAZE_MAX * enc.geometry.eye_width)


def _phrased(seed: int, phrases: int = 8, talk_s: float = 2.6, pause_s: float = 0.6):
    """Controls for speech of `phrases` phrases (vowel-consonant runs) with pauses between, and their spans."""
    phones, spans, t = [("_", 0.0, 1.0)], [], 1.0
    for _ in range(phrases):
        start = t
        while t < start + talk_s - 1e-9:
            phones += [("a", t, t + 0.12), ("t", t + 0.12, t + 0.2)]
            t += 0.2
        spans.append((start, t))
        phones.append(("_", t, t + pause_s))
        t += pause_s
    return drive(t, FPS, phonemes=phones, seed=seed, avatar_key="grace", head_motion=False), spans


def test_the_gaze_comes_back_to_the_listener_as_each_phrase_ends():
    for seed in range(10):
        c, spans = _phrased(seed)
        for a, b in spans:
            k0, k1 = int((b - 0.45) * FPS), int(b * FPS)
            assert np.all(np.abs(c.gaze_x[k0:k1]) < GAZE_AVERT[0] - 1e-6), (seed, a, b, c.gaze_x[k0:k1])


def test_a_phrase_after_a_pause_often_starts_with_a_look_away_where_idle_eyes_seldom_do():
    def looks_away_at_starts(c, spans) -> float:
        hits = 0
        for a, _ in spans:
            k0, k1 = int((a - 0.25) * FPS), int((a + 0.3) * FPS)
            hits += bool(np.any(np.abs(c.gaze_x[k0:k1]) >= GAZE_AVERT[0] - 1e-6))
        return hits / len(spans)

    spoken, idle = [], []
    for seed in range(12):
        c, spans = _phrased(seed)
        spoken.append(looks_away_at_starts(c, spans))
        idle.append(looks_away_at_starts(drive(c.n_frames / FPS, FPS, seed=seed, avatar_key="grace", head_motion=False), spans))
    assert np.mean(spoken) >= 0.35 and np.mean(spoken) >= np.mean(idle) + 0.2, (np.mean(spoken), np.mean(idle))


def _streamed(c: Controls, seed: int, blocks: list[int]) -> Controls:
    """c's frames through a stream's IdleMotion in blocks of the given sizes (cycled), joined again."""
    idle = IdleMotion(FPS, seed=seed, head_motion=False, avatar_key="grace")
    parts, k, i = [], 0, 0
    while k < c.n_frames:
        n = blocks[i % len(blocks)]
        parts.append(idle.apply(c.slice(k, min(k + n, c.n_frames)), k))
        k, i = k + n, i + 1
    return Controls(fps=FPS, **{name: np.concatenate([getattr(p, name) for p in parts]) for name in Controls.names()})


def _speech_only(c: Controls) -> Controls:
    """The mouth of c with every other control at rest: what a stream's driver hands the engine's stream."""
    out = Controls.neutral(c.n_frames, FPS)
    out.mouth_open[:] = c.mouth_open
    return out


def test_a_streams_gaze_follows_its_phrases_however_its_frames_are_cut():
    ends_back, starts_away, idle_away, n_phrases = 0, 0, 0, 0
    for seed in range(12):
        c, spans = _phrased(seed)
        mouth = _speech_only(c)
        whole = _streamed(mouth, seed, [mouth.n_frames])
        assert np.array_equal(whole.gaze_x, _streamed(mouth, seed, [1, 7, 25, 3]).gaze_x), seed
        still = _streamed(Controls.neutral(c.n_frames, FPS), seed, [c.n_frames])
        for a, b in spans:
            n_phrases += 1
            # Back on the listener into the pause (a stream learns that a phrase ended 0.2 s after its end).
            k0, k1 = int((b + 0.25) * FPS), int((b + 0.5) * FPS)
            ends_back += bool(np.all(np.abs(whole.gaze_x[k0:k1]) < GAZE_AVERT[0] - 1e-6))
            k0, k1 = int(a * FPS), int((a + 0.4) * FPS)
            starts_away += bool(np.any(np.abs(whole.gaze_x[k0:k1]) >= GAZE_AVERT[0] - 1e-6))
            idle_away += bool(np.any(np.abs(still.gaze_x[k0:k1]) >= GAZE_AVERT[0] - 1e-6))
    assert ends_back == n_phrases, (ends_back, n_phrases)
    assert starts_away / n_phrases >= 0.35 and starts_away >= idle_away + 0.2 * n_phrases, (starts_away, idle_away)
