"""Phoneme timings of a video's speech: the runtime's own (timing.json), else mapped by DTW.

A runtime that serves ``timing_url`` gives the exact phoneme timings of the speech in its video;
``runtime_phonemes`` reads and checks them. An older runtime does not, so the evaluator asks the
GPU service to speak the same text again. Engines with sampling noise (Piper's noise_w) then say
it up to ~10% faster or slower, and not uniformly; a dynamic time warping of the two recordings'
band energies maps every phoneme boundary onto the video's own audio (``warp_phonemes``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import signal

HOP_S = 0.01
WIN_S = 0.025
BANDS_HZ = ((80, 500), (500, 1500), (1500, 3500), (3500, 7500))
FLOOR_DB = -80.0
# timing.json must cover the video's audio to within this: AAC pads its last frame by up to ~0.05 s.
TIMING_TOLERANCE_S = 0.1


def runtime_phonemes(timing: dict, media_s: float, tolerance_s: float = TIMING_TOLERANCE_S) -> list[tuple[str, float, float]]:
    """Phoneme spans (symbol, start_s, end_s) from a runtime's timing.json, checked against the media's length."""
    items = timing.get("phonemes") if isinstance(timing, dict) else None
    if not isinstance(items, list):
        raise ValueError("timing.json has no phonemes list")
    try:
        spans = [(str(p["phoneme"]), float(p["start_s"]), float(p["end_s"])) for p in items]
    except (KeyError, TypeError, ValueError):
        raise ValueError("timing.json has a phoneme without phoneme/start_s/end_s") from None
    if not spans:
        raise ValueError("timing.json has no phonemes (the speech engine gives no timings)")
    if any(e < s for _, s, e in spans) or any(b[1] < a[1] - 1e-6 for a, b in zip(spans, spans[1:])):
        raise ValueError("timing.json's phonemes are not in time order")
    covered = float(timing.get("duration_s") or spans[-1][2])
    if abs(covered - media_s) > tolerance_s or spans[-1][2] > media_s + tolerance_s:
        raise ValueError(f"timing.json covers {covered:.2f} s but the video's audio lasts {media_s:.2f} s")
    return spans


def band_features(audio: np.ndarray, sr: int) -> np.ndarray:
    """(frames, bands) log band energies every HOP_S, each band standardised over the clip."""
    a = np.asarray(audio, dtype=np.float64)
    hop, win = int(round(HOP_S * sr)), int(round(WIN_S * sr))
    if len(a) < win:
        a = np.pad(a, (0, win - len(a)))
    f, _, z = signal.stft(a, sr, nperseg=win, noverlap=win - hop, boundary=None, padded=False)
    power = np.abs(z) ** 2
    cols = []
    for lo, hi in BANDS_HZ:
        sel = (f >= lo) & (f < hi)
        cols.append(np.maximum(10 * np.log10(power[sel].sum(axis=0) + 1e-12), FLOOR_DB))
    feats = np.stack(cols, axis=1)
    return (feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-6)


def dtw_path(a: np.ndarray, b: np.ndarray, band: int) -> np.ndarray:
    """Monotone alignment path (k, 2) of feature rows a[i] <-> b[j] within |i*len(b)/len(a) - j| <= band."""
    n, m = len(a), len(b)
    inf = np.inf
    cost = np.full((n, m), inf)
    acc = np.full((n, m), inf)
    diag = np.arange(n) * (m / max(n, 1))
    lo = np.clip(np.floor(diag - band).astype(int), 0, m - 1)
    hi = np.clip(np.ceil(diag + band).astype(int) + 1, 1, m)
    for i in range(n):
        cost[i, lo[i]:hi[i]] = np.linalg.norm(b[lo[i]:hi[i]] - a[i], axis=1)
    acc[0, 0] = cost[0, 0]
    for j in range(1, hi[0]):
        acc[0, j] = acc[0, j - 1] + cost[0, j]
    for i in range(1, n):
        prev = acc[i - 1]
        row = acc[i]
        for j in range(lo[i], hi[i]):
            best = prev[j]
            if j > 0:
                best = min(best, prev[j - 1], row[j - 1])
            row[j] = cost[i, j] + best
    if not np.isfinite(acc[-1, -1]):
        raise ValueError("the recordings are too different in length to align within the band")
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        options = []
        if i > 0 and j > 0:
            options.append((acc[i - 1, j - 1], i - 1, j - 1))
        if i > 0:
            options.append((acc[i - 1, j], i - 1, j))
        if j > 0:
            options.append((acc[i, j - 1], i, j - 1))
        _, i, j = min(options)
        path.append((i, j))
    return np.array(path[::-1])


def time_map(reference: np.ndarray, target: np.ndarray, sr: int, slack_s: float = 0.4):
    """A function mapping seconds in `reference` audio to seconds in `target` audio (same text spoken)."""
    a, b = band_features(reference, sr), band_features(target, sr)
    band = int(abs(len(a) - len(b)) + slack_s / HOP_S)
    path = dtw_path(a, b, band)
    # Average the target frames matched to each reference frame: a strictly usable, monotone map.
    ref_idx = np.unique(path[:, 0])
    tgt_mean = np.array([path[path[:, 0] == i, 1].mean() for i in ref_idx])
    tgt_mean = np.maximum.accumulate(tgt_mean)
    ref_t = (ref_idx + 0.5) * HOP_S
    tgt_t = (tgt_mean + 0.5) * HOP_S
    end_ref, end_tgt = len(reference) / sr, len(target) / sr

    def mapping(t):
        return np.interp(t, np.concatenate([[0.0], ref_t, [end_ref]]), np.concatenate([[0.0], tgt_t, [end_tgt]]))

    return mapping


def warp_phonemes(phonemes: Sequence, reference: np.ndarray, target: np.ndarray, sr: int) -> list[tuple[str, float, float]]:
    """Phoneme spans (symbol, start_s, end_s) of `reference` moved onto `target` by DTW."""
    mapping = time_map(reference, target, sr)
    out = []
    for p in phonemes:
        sym, s, e = (p["phoneme"], p["start_s"], p["end_s"]) if isinstance(p, dict) else p
        out.append((sym, float(mapping(s)), float(mapping(e))))
    return out
