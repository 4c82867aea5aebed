"""Audio-visual synchrony: speech envelope, syllable-rate smoothing, offset and lip-audio correlation.

Sign convention: a positive lag means the video is late (the mouth moves `lag` frames after the
sound that goes with it). Correlations are Pearson correlations of syllable-smoothed series.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import numpy as np
from scipy import signal

log = logging.getLogger(__name__)


def speech_envelope(audio: np.ndarray, sr: int, fps: float, n_frames: Optional[int] = None, floor_db: float = -70.0) -> np.ndarray:
    """Per-frame log energy (dB re full scale) of mono audio, over each frame's span [i/fps, (i+1)/fps).

    Values are clipped below at `floor_db` so digital silence does not dominate correlations.
    """
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim == 2:
        a = a.mean(axis=1) if a.shape[0] >= a.shape[1] else a.mean(axis=0)
    if sr <= 0 or fps <= 0:
        raise ValueError(f"sample rate and fps must be positive, got sr={sr}, fps={fps}")
    if n_frames is None:
        n_frames = int(round(len(a) / sr * fps))
    csum = np.concatenate([[0.0], np.cumsum(a * a)])
    edges = np.clip(np.round(np.arange(n_frames + 1) * sr / fps).astype(np.int64), 0, len(a))
    lo, hi = edges[:-1], edges[1:]
    ms = (csum[hi] - csum[lo]) / np.maximum(hi - lo, 1)
    db = 10.0 * np.log10(ms + 1e-12)
    return np.maximum(db, floor_db)


def _fill_nan(x: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaNs (frames without a face); all-NaN becomes zeros."""
    x = np.asarray(x, dtype=np.float64).copy()
    bad = ~np.isfinite(x)
    if bad.all():
        return np.zeros_like(x)
    if bad.any():
        idx = np.arange(len(x))
        x[bad] = np.interp(idx[bad], idx[~bad], x[~bad])
    return x


def syllable_smooth(x: np.ndarray, fps: float, lo_hz: float = 2.0, hi_hz: float = 8.0) -> np.ndarray:
    """Zero-phase band-pass to the syllable rhythm (default 2-8 Hz); the top edge is kept below Nyquist."""
    x = _fill_nan(x)
    nyq = 0.5 * fps
    hi = min(hi_hz, 0.85 * nyq)
    if len(x) < 16 or lo_hz >= hi:
        return x - x.mean()
    sos = signal.butter(2, [lo_hz / nyq, hi / nyq], btype="band", output="sos")
    return signal.sosfiltfilt(sos, x - x.mean(), padlen=min(len(x) - 1, 3 * 5))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def _shifted(mouth: np.ndarray, env: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (mouth[t + lag], env[t]) over their overlap."""
    n = min(len(mouth), len(env))
    if lag >= 0:
        return mouth[lag:n], env[: n - lag]
    return mouth[: n + lag], env[-lag:n]


class AvOffset(NamedTuple):
    """Best audio-video alignment: positive lag = video late."""

    lag_frames: int
    lag_ms: float
    corr_at_lag: float
    corr_curve: np.ndarray
    """Correlation for lags -max_lag..+max_lag (index i is lag i - max_lag)."""


def av_offset(mouth: np.ndarray, envelope: np.ndarray, fps: float, max_lag_frames: int = 8, smooth: bool = True) -> AvOffset:
    """Lag maximising the normalised cross-correlation of mouth opening and speech envelope."""
    m = syllable_smooth(mouth, fps) if smooth else _fill_nan(mouth)
    e = syllable_smooth(envelope, fps) if smooth else _fill_nan(envelope)
    n = min(len(m), len(e))
    max_lag = int(max(0, min(max_lag_frames, n // 3)))
    lags = np.arange(-max_lag, max_lag + 1)
    curve = np.array([_pearson(*_shifted(m, e, int(k))) for k in lags])
    best = int(np.argmax(curve))
    lag = int(lags[best])
    log.debug("av offset", extra={"lag_frames": lag, "corr": float(curve[best]), "frames": n})
    return AvOffset(lag, 1000.0 * lag / fps, float(curve[best]), curve)


def lip_audio_correlation(mouth: np.ndarray, envelope: np.ndarray, fps: float, lag_frames: int = 0) -> float:
    """Pearson correlation of syllable-smoothed mouth opening and envelope at a given lag (video late > 0)."""
    m = syllable_smooth(mouth, fps)
    e = syllable_smooth(envelope, fps)
    return _pearson(*_shifted(m, e, int(lag_frames)))
