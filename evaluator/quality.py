"""Quality of one output video, measured from the file itself with evaluator.metrics.

The MP4 is decoded (frames and its own audio track), the face is tracked with MediaPipe, and
the mouth, eyes and landmarks are compared with the audio, the phoneme timings (when known)
and the portrait (when known). Every figure that cannot be measured is None with a reason in
``notes``, never a made-up value.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np

from evaluator.metrics.face import measure_frames, measure_image, read_video
from evaluator.metrics.identity import identity_ssim
from evaluator.metrics.phonemes import phoneme_agreement, silences
from evaluator.metrics.stability import detect_blinks, landmark_jitter
from evaluator.metrics.sync import av_offset, lip_audio_correlation, speech_envelope

log = logging.getLogger(__name__)

AUDIO_RATE = 16000
MAX_LAG_FRAMES = 8
# Identity is averaged over at most this many evenly spaced frames: SSIM per frame is the cost.
IDENTITY_FRAMES = 40
# Phoneme timings from a second synthesis are stretched onto the video up to this share of its length.
PHONEME_MAX_STRETCH = 0.08
SILENCE_DB = -45.0
BLINK_MIN_S = 5.0


def _finite(x: float) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def analyse_video(path: str, portrait: Optional[np.ndarray] = None, phonemes: Optional[Sequence] = None,
                  phonemes_duration_s: Optional[float] = None, keep_series: bool = False) -> dict:
    """All quality figures of one MP4 (see the module docstring); series for plots when keep_series."""
    frames, fps, audio = read_video(path, audio_rate=AUDIO_RATE)
    notes: list[str] = []
    out: dict = {"frames": int(len(frames)), "fps": fps, "duration_s": len(frames) / fps if fps else None}
    if len(frames) == 0:
        return {**out, "notes": ["the video has no frames"]}
    track = measure_frames(frames)
    found = track.found
    out["face_found_share"] = float(found.mean())
    if not found.any():
        return {**out, "notes": ["no face found in any frame"]}

    env = None
    if audio is None or len(audio) == 0:
        notes.append("no audio track: sync not measured")
    else:
        env = speech_envelope(audio, AUDIO_RATE, fps, n_frames=len(frames))
        off = av_offset(track.mouth_gap, env, fps, max_lag_frames=MAX_LAG_FRAMES)
        out["av_offset_ms"] = off.lag_ms
        out["av_offset_frames"] = off.lag_frames
        out["lip_audio_corr"] = _finite(lip_audio_correlation(track.mouth_gap, env, fps, off.lag_frames))
        out["lip_audio_corr_at_0"] = _finite(lip_audio_correlation(track.mouth_gap, env, fps, 0))
        if keep_series:
            out["series_corr_curve"] = [float(c) for c in off.corr_curve]

    if phonemes and phonemes_duration_s:
        # Timings come from a second synthesis of the same text; engines with sampling noise (Piper's
        # noise_w) make it a few per cent longer or shorter, so it is stretched onto the video.
        ratio = out["duration_s"] / phonemes_duration_s
        if abs(ratio - 1.0) > PHONEME_MAX_STRETCH:
            notes.append(f"phoneme timings ({phonemes_duration_s:.2f} s) do not match the video "
                         f"({out['duration_s']:.2f} s): phoneme agreement not measured")
            phonemes = None
        elif abs(ratio - 1.0) > 1e-3:
            phonemes = [(p, s * ratio, e * ratio) for p, s, e in phonemes]
            out["phoneme_stretch"] = ratio
    if phonemes:
        agree = phoneme_agreement(phonemes, track.mouth_gap, fps)
        out.update(bilabial_closed=_finite(agree.bilabial_closed), n_bilabial=agree.n_bilabial,
                   vowel_open=_finite(agree.vowel_open), n_vowel=agree.n_vowel,
                   silence_closed=_finite(agree.pause_closed), n_silence_frames=agree.n_pause_frames,
                   rest_gap=_finite(agree.rest_gap))
        still = _still_frames(phonemes, len(frames), fps)
    else:
        notes.append("no phoneme timings: m/b/p and vowel shares not measured")
        still = None
        if env is not None:
            # Without phonemes, silence is where the track's own audio is quiet.
            quiet = env < SILENCE_DB
            gap = track.mouth_gap
            sel = quiet & np.isfinite(gap)
            out["silence_closed"] = float((gap[sel] <= 0.02).mean()) if sel.any() else None
            out["n_silence_frames"] = int(sel.sum())

    out["jitter"] = _finite(landmark_jitter(track.landmarks, fps))
    if still is not None:
        out["jitter_still"] = _still_jitter(track.landmarks, still, fps)
    blinks = detect_blinks(track.eye_aperture, fps)
    out["blinks"] = len(blinks.spans)
    # People blink every 3-6 s: a rate from a shorter clip says nothing.
    if out["duration_s"] >= BLINK_MIN_S:
        out["blink_rate_per_min"] = float(blinks.per_minute)
    else:
        out["blink_rate_per_min"] = None
        notes.append(f"clip shorter than {BLINK_MIN_S:.0f} s: blink rate not measured")

    if portrait is None:
        notes.append("portrait unknown (preset avatar not in --preset-dir): identity not measured")
    else:
        ref = measure_image(portrait)
        if not ref.found[0]:
            notes.append("no face on the portrait: identity not measured")
        else:
            idx = np.flatnonzero(found)
            pick = idx[np.linspace(0, len(idx) - 1, min(IDENTITY_FRAMES, len(idx))).round().astype(int)]
            scores = identity_ssim(frames[pick], track.landmarks[pick], portrait, ref.landmarks[0])
            out["identity_ssim"] = _finite(float(np.nanmean(scores)))
            out["identity_ssim_min"] = _finite(float(np.nanmin(scores)))
            if keep_series:
                out["series_identity"] = {"frames": pick.tolist(), "ssim": [float(s) for s in scores]}
    if keep_series:
        out["series_mouth_gap"] = [_finite(g) for g in track.mouth_gap]
        out["series_envelope_db"] = None if env is None else [float(e) for e in env]
    out["notes"] = notes
    log.info("video analysed", extra={"path": str(path), "frames": len(frames),
                                      "offset_ms": out.get("av_offset_ms"), "corr": out.get("lip_audio_corr")})
    return out


def _still_frames(phonemes: Sequence, n: int, fps: float) -> np.ndarray:
    """Frames inside pauses, where the face should hold still."""
    t = (np.arange(n) + 0.5) / fps
    mask = np.zeros(n, bool)
    for s, e in silences(phonemes):
        mask |= (t >= s) & (t <= e)
    return mask


def _still_jitter(landmarks: np.ndarray, still: np.ndarray, fps: float, min_run: int = 8) -> Optional[float]:
    """Jitter over each contiguous pause of at least min_run frames, weighted by length; None if none."""
    edges = np.diff(np.concatenate([[0], still.astype(int), [0]]))
    values, weights = [], []
    for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        if e - s >= min_run:
            j = landmark_jitter(landmarks[s:e], fps)
            if math.isfinite(j):
                values.append(j)
                weights.append(e - s)
    return float(np.average(values, weights=weights)) if values else None
