"""Evaluator metrics proven on real data: Piper speech, and the astronaut portrait warped by known amounts."""

from __future__ import annotations

import subprocess

import cv2
import numpy as np
import pytest
import skimage.data

from evaluator.metrics.face import measure_frames, measure_image, read_video
from evaluator.metrics.identity import identity_ssim
from evaluator.metrics.phonemes import CLOSED_GAP, phoneme_agreement
from evaluator.metrics.stability import detect_blinks, landmark_jitter
from evaluator.metrics.sync import av_offset, lip_audio_correlation, speech_envelope, syllable_smooth

FPS = 25.0
TEXT = "Please bring me the map of the moon. Well, we will meet them by the pool at noon, and then, maybe, we shall see."


@pytest.fixture(scope="module")
def speech(piper_engine):
    """Real Piper speech with phoneme timings (repeatable ones: see the piper_engine fixture)."""
    from gpu_service.speech.protocol import SpeechRequest

    return piper_engine.synthesize(SpeechRequest(text=TEXT))


@pytest.fixture(scope="module")
def portrait():
    """The astronaut portrait and its landmarks."""
    img = skimage.data.astronaut()
    return img, measure_image(img).landmarks[0]


def _mouth_from_audio(audio: np.ndarray, sr: int, n: int) -> np.ndarray:
    """A mouth-opening series derived from speech differently from speech_envelope: 50 ms RMS amplitude, low-passed."""
    hop = sr / FPS
    half = int(0.025 * sr)
    centres = ((np.arange(n) + 0.5) * hop).astype(int)
    rms = np.array([np.sqrt(np.mean(audio[max(0, c - half): c + half] ** 2) + 1e-12) for c in centres])
    opening = np.clip(rms / np.percentile(rms, 95), 0, 1) ** 0.7
    from scipy.signal import butter, sosfiltfilt

    return sosfiltfilt(butter(2, 6.0 / (FPS / 2), output="sos"), opening)


def _shift_audio(audio: np.ndarray, sr: int, frames: int) -> np.ndarray:
    """Audio moved later by `frames` video frames (earlier if negative), same length."""
    k = int(round(frames * sr / FPS))
    if k >= 0:
        return np.concatenate([np.zeros(k, audio.dtype), audio[: len(audio) - k]])
    return np.concatenate([audio[-k:], np.zeros(-k, audio.dtype)])


# -- sync ---------------------------------------------------------------------------------------
def test_speech_envelope_frames_and_silence(speech):
    env = speech_envelope(speech.audio, speech.sample_rate, FPS)
    assert len(env) == round(speech.duration_s * FPS)
    silence = speech_envelope(np.zeros(speech.sample_rate), speech.sample_rate, FPS)
    assert np.all(silence == -70.0)
    assert env.max() > -30 and np.percentile(env, 90) - np.percentile(env, 10) > 20


@pytest.mark.parametrize("shift", [2, -2, 5, -5])
def test_offset_detector_finds_known_shifts(speech, shift):
    n = int(round(speech.duration_s * FPS))
    mouth = _mouth_from_audio(speech.audio, speech.sample_rate, n)
    aligned = av_offset(mouth, speech_envelope(speech.audio, speech.sample_rate, FPS, n), FPS, max_lag_frames=8)
    assert aligned.lag_frames == 0 and aligned.corr_at_lag > 0.6, aligned
    moved = _shift_audio(speech.audio, speech.sample_rate, shift)
    off = av_offset(mouth, speech_envelope(moved, speech.sample_rate, FPS, n), FPS, max_lag_frames=8)
    # Audio moved later = video early = negative lag.
    assert abs(off.lag_frames - (-shift)) <= 1, (shift, off.lag_frames, off.corr_curve)
    assert off.lag_ms == pytest.approx(1000 * off.lag_frames / FPS)
    assert len(off.corr_curve) == 17 and off.corr_curve[off.lag_frames + 8] == pytest.approx(off.corr_at_lag)
    at_lag = lip_audio_correlation(mouth, speech_envelope(moved, speech.sample_rate, FPS, n), FPS, off.lag_frames)
    assert at_lag == pytest.approx(off.corr_at_lag)
    # Moving the mouth instead of the audio flips the sign.
    late_mouth = np.concatenate([np.full(abs(shift), mouth[0]), mouth[: n - abs(shift)]])
    off2 = av_offset(late_mouth, speech_envelope(speech.audio, speech.sample_rate, FPS, n), FPS, max_lag_frames=8)
    assert abs(off2.lag_frames - abs(shift)) <= 1


def test_frozen_mouth_scores_near_zero(speech):
    n = int(round(speech.duration_s * FPS))
    env = speech_envelope(speech.audio, speech.sample_rate, FPS, n)
    assert lip_audio_correlation(np.full(n, 0.065), env, FPS) == 0.0
    # A frozen mouth with tracking noise: nothing to correlate with.
    noisy = 0.065 + np.random.default_rng(1).normal(0, 0.002, n)
    assert abs(lip_audio_correlation(noisy, env, FPS)) < 0.2
    assert lip_audio_correlation(_mouth_from_audio(speech.audio, speech.sample_rate, n), env, FPS) > 0.6
    # NaNs (frames without a face) are bridged, not propagated.
    holes = _mouth_from_audio(speech.audio, speech.sample_rate, n)
    holes[10:13] = np.nan
    assert np.all(np.isfinite(syllable_smooth(holes, FPS)))


# -- phonemes -----------------------------------------------------------------------------------
def test_phoneme_agreement_rewards_real_closures_and_punishes_frozen_open_mouth(speech):
    from gpu_service.talking_head.driving import drive

    ctl = drive(speech.duration_s, FPS, phonemes=speech.phonemes)
    gap = ctl.mouth_open / 3.0  # mouth_open 1 is about a third of the face height
    good = phoneme_agreement(speech.phonemes, gap, FPS)
    assert good.n_bilabial >= 8 and good.n_vowel >= 20 and good.n_pause_frames >= 3
    assert good.bilabial_closed == 1.0 and good.vowel_open >= 0.8 and good.pause_closed == 1.0, good

    # The astronaut's rest mouth (gap ~0.065), frozen: no closures, no openings.
    frozen = phoneme_agreement(speech.phonemes, np.full(len(gap), 0.065), FPS)
    assert frozen.bilabial_closed == 0.0 and frozen.vowel_open == 0.0 and frozen.pause_closed == 0.0

    # A renderer that opens well but never seals below the rest gap: vowels fine, closures fail.
    unsealed = phoneme_agreement(speech.phonemes, 0.065 + gap, FPS)
    assert unsealed.vowel_open >= 0.8 and unsealed.bilabial_closed == 0.0
    assert unsealed.closed_gap == CLOSED_GAP

    # Video 4 frames late: closures land on the wrong frames.
    late = np.concatenate([np.full(4, gap[0]), gap[:-4]])
    assert phoneme_agreement(speech.phonemes, late, FPS).bilabial_closed <= 0.6


# -- face measurements on the real portrait --------------------------------------------------------
def _move_lower_lip(img: np.ndarray, lm: np.ndarray, d: float) -> np.ndarray:
    """Move the lower lip and chin down by d px (up if negative), fading to zero at the chin."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yc = 0.5 * (lm[13, 1] + lm[14, 1])
    xl, xr, chin = lm[61, 0], lm[291, 0], lm[152, 1]
    cx, half = 0.5 * (xl + xr), 0.5 * (xr - xl) + 6
    wx = np.clip(1 - np.abs(xx - cx) / half, 0, 1) ** 0.7
    below = np.clip((yy - yc) / 2.0, 0, 1)
    fade = np.where(yy > lm[14, 1], np.clip(1 - (yy - lm[14, 1]) / (chin - lm[14, 1] + 5), 0, 1), 1)
    return cv2.remap(img, xx, yy - d * wx * below * fade, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _lower_lids(img: np.ndarray, lm: np.ndarray, frac: float) -> np.ndarray:
    """Sweep both upper lids down by `frac` of the eye opening."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    my = yy.copy()
    for up, lo, a, b in ((159, 145, 33, 133), (386, 374, 362, 263)):
        gap = lm[lo, 1] - lm[up, 1]
        cx, half = 0.5 * (lm[a, 0] + lm[b, 0]), 0.5 * abs(lm[a, 0] - lm[b, 0]) + 4
        wx = np.clip(1 - np.abs(xx - cx) / half, 0, 1) ** 0.5
        wy = np.clip((yy - (lm[up, 1] - 9)) / 6, 0, 1) * np.clip((lm[lo, 1] + 3 - yy) / 3, 0, 1)
        my -= frac * (gap + 2) * wx * wy
    return cv2.remap(img, xx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def test_measured_gap_follows_a_moved_lower_lip(portrait):
    img, lm = portrait
    shifts = np.array([0, 3, 6, 9, 6, 3, 0, -2, -4, -2, 0, 5, 10, 5, 0], float)
    track = measure_frames([_move_lower_lip(img, lm, d) for d in shifts])
    assert track.found.all()
    px = track.mouth_gap * track.face_height
    assert np.corrcoef(px, shifts)[0, 1] > 0.9
    slope = np.polyfit(shifts, px, 1)[0]
    assert 0.25 < slope < 1.5, slope
    assert track.mouth_gap[shifts == 0].mean() == pytest.approx(0.065, abs=0.015)  # her smile is open at rest
    assert px[shifts == -4].mean() < px[shifts == 0].mean() < px[shifts == 9].mean()
    assert track.landmarks.shape == (len(shifts), 478, 3)
    # No face: NaN, not a crash.
    empty = measure_frames([np.zeros((128, 128, 3), np.uint8)])
    assert not empty.found.any() and np.isnan(empty.mouth_gap).all()


def test_blinks_detected_from_eye_aperture(portrait):
    img, lm = portrait
    lids = [0] * 8 + [0.5, 1, 0.6] + [0] * 12 + [0.4, 1, 1, 0.5] + [0] * 10
    track = measure_frames([_lower_lids(img, lm, f) for f in lids])
    blinks = detect_blinks(track.eye_aperture, FPS)
    assert len(blinks.spans) == 2, (blinks, np.round(track.eye_aperture, 3))
    assert blinks.spans[0][0] in (8, 9, 10) and blinks.spans[1][0] in (23, 24, 25)
    assert blinks.per_minute == pytest.approx(2 / (len(lids) / FPS / 60))
    still = measure_frames([img] * 12)
    assert detect_blinks(still.eye_aperture, FPS).spans == []


def test_shuffled_frames_score_badly_on_stability(portrait):
    img, _ = portrait
    t = np.arange(36) / FPS
    frames = [
        cv2.warpAffine(img, np.float32([[1, 0, 3 * np.sin(2 * np.pi * 0.3 * x)], [0, 1, 2 * np.sin(2 * np.pi * 0.2 * x)]]),
                       (512, 512), borderMode=cv2.BORDER_REFLECT)
        for x in t
    ]
    ordered = landmark_jitter(measure_frames(frames).landmarks, FPS)
    perm = np.random.default_rng(0).permutation(len(frames))
    shuffled = landmark_jitter(measure_frames([frames[i] for i in perm]).landmarks, FPS)
    assert ordered < 0.006, ordered
    assert shuffled > 3 * ordered, (ordered, shuffled)


def _other_face(img: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Her portrait with camera()'s face laid over her face oval: a different person in the same pose."""
    from evaluator.metrics.identity import FACE_OVAL, STABLE_LANDMARKS

    h, w = img.shape[:2]
    cam = cv2.cvtColor(cv2.resize(skimage.data.camera(), None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC),
                       cv2.COLOR_GRAY2RGB)  # MediaPipe finds his small face at 2x
    cam_lm = measure_image(cam).landmarks[0]
    assert np.isfinite(cam_lm).all()
    idx = list(STABLE_LANDMARKS)
    m, _ = cv2.estimateAffinePartial2D(cam_lm[idx, :2].astype(np.float32), lm[idx, :2].astype(np.float32))
    face = cv2.warpAffine(cam, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT).astype(np.float64)
    oval = np.zeros((h, w), np.float32)
    cv2.fillConvexPoly(oval, cv2.convexHull(np.round(lm[list(FACE_OVAL), :2]).astype(np.int32)), 1.0)
    inside = oval > 0.5
    # Her brightness and contrast, so only the face's structure differs.
    mine, his = img.mean(-1)[inside], face.mean(-1)[inside]
    face = (face - his.mean()) * mine.std() / his.std() + mine.mean()
    a = cv2.GaussianBlur(oval, (0, 0), 2)[..., None]
    return np.clip(img * (1 - a) + face * a, 0, 255).astype(np.uint8)


def test_identity_ssim(portrait):
    img, lm = portrait
    h, w = img.shape[:2]
    moved = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 3.0, 1.02) + np.float32([[0, 0, 4], [0, 0, -3]]),
                           (w, h), borderMode=cv2.BORDER_REFLECT)
    mouth = _move_lower_lip(img, lm, 8)
    blurred = img.copy()
    blurred[60:190, 170:280] = cv2.GaussianBlur(img[60:190, 170:280], (0, 0), 4)
    soft = img.copy()
    soft[60:190, 170:280] = cv2.GaussianBlur(img[60:190, 170:280], (0, 0), 1)
    other = img.copy()
    cam = cv2.cvtColor(cv2.resize(skimage.data.camera(), (512, 512)), cv2.COLOR_GRAY2RGB)
    other[55:100, 190:260] = cam[55:100, 190:260]  # the forehead replaced: not her any more
    person = _other_face(img, lm)
    frames = [img, moved, mouth, blurred, soft, other, person]
    track = measure_frames(frames, static_image_mode=True)
    assert track.found.all()
    scores = identity_ssim(frames, track.landmarks, img, lm)
    assert scores[0] > 0.99, scores
    # Head moved: alignment undoes it, and resamples the frame only once.
    assert scores[1] > 0.95, scores
    assert scores[2] > 0.97, scores  # lower lip and chin moved: that is the mouth, masked out
    gate = 0.95  # evaluator/config/quality_gate.yaml
    # A face softened by a 1 px blur fails the gate; heavy blur, a new forehead or another face fail by far.
    assert scores[4] < gate, scores
    assert max(scores[3], scores[5]) < 0.75 and scores[6] < 0.5, scores


def test_identity_ssim_of_a_still_portrait_through_x264(tmp_path, portrait):
    """The ceiling: the unchanged portrait at the service's CRF 16 loses only compression noise."""
    from gpu_service.talking_head.video import encode_mp4

    img, lm = portrait
    data, _ = encode_mp4(iter([img] * 10), FPS, (img.shape[1], img.shape[0]), None, None)
    path = tmp_path / "still.mp4"
    path.write_bytes(data)
    frames, _, _ = read_video(str(path), with_audio=False)
    track = measure_frames(frames)
    scores = identity_ssim(frames, track.landmarks, img, lm)
    assert np.nanmin(scores) > 0.97, scores


def test_read_video_roundtrip(tmp_path, speech, portrait):
    import imageio_ffmpeg
    import soundfile as sf

    img, _ = portrait
    small = cv2.resize(img, (128, 128))
    n = 20
    wav = tmp_path / "a.wav"
    sf.write(wav, speech.audio[: int(n / FPS * speech.sample_rate)], speech.sample_rate)
    path = tmp_path / "clip.mp4"
    writer = imageio_ffmpeg.write_frames(str(path), (128, 128), fps=FPS, codec="libx264", audio_path=str(wav),
                                         audio_codec="aac", macro_block_size=1, quality=8)
    writer.send(None)
    for i in range(n):
        writer.send(np.ascontiguousarray(np.roll(small, i, axis=1)))
    writer.close()
    frames, fps, audio = read_video(str(path), audio_rate=16000)
    assert frames.shape == (n, 128, 128, 3) and frames.dtype == np.uint8 and fps == pytest.approx(FPS)
    assert np.abs(frames[0].astype(int) - small).mean() < 12
    assert audio is not None and audio.dtype == np.float32
    assert abs(len(audio) / 16000 - n / FPS) < 0.1
    ref = speech_envelope(speech.audio[: int(n / FPS * speech.sample_rate)], speech.sample_rate, FPS, n)
    got = speech_envelope(audio, 16000, FPS, n)
    assert np.corrcoef(ref, got)[0, 1] > 0.8
    silent = tmp_path / "silent.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-an", "-c", "copy", str(silent)],
                   check=True)
    assert read_video(str(silent))[2] is None
