"""Temporal stability: landmark jitter after removing slow motion, and blinks from eye aperture."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

# Rigid, expression-free landmarks: forehead, nose bridge and tip, eye corners, upper face outline.
STABLE_LANDMARKS = (10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 33, 133, 362, 263, 234, 454, 127, 356, 162, 389, 21, 251)


def _lowpass(x: np.ndarray, fps: float, cutoff_hz: float) -> np.ndarray:
    """Zero-phase Butterworth low-pass along axis 0 (edges padded by reflection)."""
    nyq = 0.5 * fps
    if cutoff_hz >= 0.9 * nyq or len(x) < 8:
        return x.copy()
    sos = signal.butter(2, cutoff_hz / nyq, output="sos")
    return signal.sosfiltfilt(sos, x, axis=0, padlen=min(len(x) - 1, 15))


def landmark_jitter(landmarks: np.ndarray, fps: float, slow_hz: float = 3.0, indices=STABLE_LANDMARKS) -> float:
    """Mean frame-to-frame displacement of stable landmarks after removing motion below slow_hz, / face height.

    Head drift and nods are slow and removed by a zero-phase low-pass; what is left between
    consecutive frames is tremble, tracking noise or flicker. Frames without a face are skipped.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    pts = lm[:, list(indices), :2]
    ok = np.all(np.isfinite(pts), axis=(1, 2))
    if ok.sum() < 4:
        return float("nan")
    pts = pts[ok]
    height = np.linalg.norm(lm[ok, 10, :2] - lm[ok, 152, :2], axis=-1)
    resid = pts - _lowpass(pts, fps, slow_hz)
    step = np.linalg.norm(np.diff(resid, axis=0), axis=-1).mean(axis=1)
    return float(np.mean(step) / np.median(height))


@dataclass
class Blinks:
    """Detected blinks: frame spans [start, end) and the rate per minute."""

    spans: list[tuple[int, int]]
    per_minute: float
    open_level: float
    threshold: float


def detect_blinks(eye_aperture: np.ndarray, fps: float, closed_frac: float = 0.6, max_s: float = 0.5) -> Blinks:
    """Blinks: runs where the aperture drops below closed_frac of the open level (its 80th percentile).

    Runs longer than max_s are eye closures, not blinks, and are not counted.
    """
    a = np.asarray(eye_aperture, dtype=np.float64)
    finite = np.isfinite(a)
    if finite.sum() < 2:
        return Blinks([], 0.0, float("nan"), float("nan"))
    level = float(np.percentile(a[finite], 80))
    thr = closed_frac * level
    low = np.where(finite, a < thr, False)
    edges = np.diff(np.concatenate([[0], low.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    spans = [(int(s), int(e)) for s, e in zip(starts, ends) if (e - s) <= max(1, round(max_s * fps))]
    minutes = len(a) / fps / 60.0
    return Blinks(spans, len(spans) / minutes if minutes > 0 else 0.0, level, thr)
