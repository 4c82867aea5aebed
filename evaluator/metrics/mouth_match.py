"""An output's mouth against a real clip's mouth, frame by frame (the self-reenactment figures).

Inputs are landmarks from one judge (evaluator.metrics.judges) for the real clip and for the
output, the output already put on the real clip's frame times (resample_landmarks). Figures:

- ``amp``: p95 of the output's inner-lip gap over p95 of the real one (1 is right);
- ``jump``: the largest gap change between consecutive frames, per 40 ms (times fps/25);
- ``r``, ``lag``: Pearson correlation with the real gap at the best lag within +-5 frames
  (positive lag: the output is late); ``r_lag0`` the same without a lag;
- ``lmd``: mean lip-landmark distance to the real frame after a similarity fit on the upper
  face, over the real inter-ocular distance; ``lmd_still`` is the same for the first real
  frame's lips held still, the score of a mouth that does not move at all;
- ``mouth_ssim``: SSIM of the grey mouth crop of the aligned output against the real one;
- ``interior_mae``: what an open mouth shows between the lips, against the real one: the luminance
  down the mouth's midline, from the upper inner lip to the lower (upper teeth, the dark between
  the rows, lower teeth or tongue), frame by frame over the frames open by 0.5-1.1 of the real p95
  gap in both, as 8-bit levels. ``interior_flat_mae`` is the same frames' real profiles against their
  mean (an opening of one colour, the real interior's average, with no teeth or throat), and
  ``interior_over_flat`` their ratio: below 1 the drawn interior has the real one's layout, above 1 a
  flat-coloured opening would match better.
"""

from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from evaluator.metrics.judges import Judge
from evaluator.metrics.sync import av_offset

MAX_LAG_FRAMES = 5
REFERENCE_FPS = 25.0
# The mouth crop: this many mouth widths wide, and high, around the real lips' centre.
CROP_WIDTH, CROP_HEIGHT = 1.7, 1.1


def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def resample_landmarks(lm: np.ndarray, times: np.ndarray, target_times: np.ndarray) -> np.ndarray:
    """(T, N, 2) landmarks at `times` linearly interpolated to `target_times`; NaN outside the output's span.

    Frames without a face are left out of the interpolation; a target more than half a frame
    before the first or after the last output frame has no value.
    """
    lm = np.asarray(lm, np.float64)
    times = np.asarray(times, np.float64)
    target = np.asarray(target_times, np.float64)
    out = np.full((len(target),) + lm.shape[1:], np.nan)
    ok = np.all(np.isfinite(lm.reshape(len(lm), -1)), axis=1)
    if ok.sum() < 1:
        return out
    step = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    inside = (target >= times[0] - 0.5 * step) & (target <= times[-1] + 0.5 * step)
    flat = lm[ok].reshape(int(ok.sum()), -1)
    cols = [np.interp(target[inside], times[ok], flat[:, j]) for j in range(flat.shape[1])]
    out[inside] = np.stack(cols, axis=1).reshape((int(inside.sum()),) + lm.shape[1:])
    return out


def nearest_frames(times: np.ndarray, target_times: np.ndarray) -> np.ndarray:
    """Index of the frame nearest each target time."""
    times = np.asarray(times, np.float64)
    idx = np.clip(np.searchsorted(times, target_times), 1, max(1, len(times) - 1))
    left = np.clip(idx - 1, 0, len(times) - 1)
    right = np.clip(idx, 0, len(times) - 1)
    pick_left = np.abs(np.asarray(target_times) - times[left]) <= np.abs(times[right] - np.asarray(target_times))
    return np.where(pick_left, left, right)


def amplitude(out_gap: np.ndarray, real_gap: np.ndarray) -> float:
    """p95 of the output gap over p95 of the real gap, both over frames with a face."""
    o, r = out_gap[np.isfinite(out_gap)], real_gap[np.isfinite(real_gap)]
    if o.size == 0 or r.size == 0:
        return float("nan")
    ref = float(np.percentile(r, 95))
    return float(np.percentile(o, 95)) / ref if ref > 0 else float("nan")


def max_jump(gap: np.ndarray, fps: float) -> float:
    """Largest |gap change| between consecutive frames, scaled to 40 ms (times fps/25)."""
    d = np.abs(np.diff(np.asarray(gap, np.float64)))
    d = d[np.isfinite(d)]
    return float(d.max() * fps / REFERENCE_FPS) if d.size else float("nan")


def lagged_correlation(out_gap: np.ndarray, real_gap: np.ndarray, fps: float,
                       max_lag: int = MAX_LAG_FRAMES) -> tuple[float, int, float]:
    """(Pearson r at the best lag, that lag in frames (positive: the output is late), r at lag 0)."""
    if np.isfinite(out_gap).sum() < 3 or np.isfinite(real_gap).sum() < 3:
        return float("nan"), 0, float("nan")
    off = av_offset(out_gap, real_gap, fps, max_lag_frames=max_lag, smooth=False)
    mid = (len(off.corr_curve) - 1) // 2
    return off.corr_at_lag, off.lag_frames, float(off.corr_curve[mid])


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> Optional[np.ndarray]:
    """(2, 3) rotation + uniform scale + translation taking src points onto dst; None if they are not finite."""
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        return None
    m, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst.astype(np.float32), method=cv2.LMEDS)
    return m


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def lip_distance(out_lm: np.ndarray, real_lm: np.ndarray, judge: Judge) -> np.ndarray:
    """Per frame: mean distance of the output's lips to the real lips after upper-face alignment, / inter-ocular."""
    stable, lips = list(judge.stable), list(judge.lips)
    dist = np.full(len(real_lm), np.nan)
    for t, (o, r) in enumerate(zip(out_lm, real_lm)):
        m = fit_similarity(o[stable], r[stable])
        if m is None or not np.all(np.isfinite(r[lips])):
            continue
        moved = _apply(m, o[lips])
        dist[t] = float(np.linalg.norm(moved - r[lips], axis=1).mean() / judge.inter_ocular(r))
    return dist


PROFILE_T = tuple(float(t) for t in np.round(np.linspace(-0.4, 1.4, 19), 2))
"""Where the interior profile samples the midline: 0 at the upper inner lip, 1 at the lower, past both into the lips."""
PROFILE_OPEN = (0.5, 1.1)
"""A frame counts for the profile when its gap is within these shares of the real clip's p95 gap."""
PROFILE_BAND = 0.12
"""Each sample is the mean over +-this many mouth widths across the mouth (the incisors, not the corners)."""
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def interior_profiles(frames, lm: np.ndarray, judge: Judge, lo: float, hi: float) -> np.ndarray:
    """(T, len(PROFILE_T)) luminance at PROFILE_T down each frame's midline; NaN rows where the gap is not in [lo, hi].

    `frames` are RGB (T, H, W, 3) and `lm` their own landmarks (an output's native ones, not resampled).
    """
    gap = judge.mouth_gap(lm)
    ts = np.asarray(PROFILE_T, np.float32)
    across = np.linspace(-1.0, 1.0, 5, dtype=np.float32)
    out = np.full((len(gap), len(ts)), np.nan)
    for t in np.flatnonzero(np.isfinite(gap) & (gap >= lo) & (gap <= hi)):
        pts = lm[t]
        up, low = pts[judge.gap[0]], pts[judge.gap[1]]
        a, b = pts[judge.corners[0]], pts[judge.corners[1]]
        width = float(np.linalg.norm(b - a))
        e_u = (b - a) / max(width, 1e-6)
        line = up[None, :] + ts[:, None] * (low - up)[None, :]  # (S, 2) down the midline
        grid = line[:, None, :] + (PROFILE_BAND * width * across)[None, :, None] * e_u[None, None, :]
        grey = (frames[t].astype(np.float32) @ _LUMA).astype(np.float32)
        val = cv2.remap(grey, grid[..., 0].astype(np.float32), grid[..., 1].astype(np.float32), cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
        out[t] = val.mean(1)
    return out


MIN_INTERIOR_FRAMES = 3


def interior_figures(out_rows: np.ndarray, real_rows: np.ndarray) -> dict:
    """interior_mae, interior_flat_mae, interior_over_flat and interior_frames (module docstring).

    Rows are per-frame profiles (interior_profiles), the output's already paired with the real frames;
    only the frames open in both count, and only the samples between the lips. The flat baseline is one
    colour for every frame, the mean of those real samples: the right colour and no layout (a colour per
    frame would also know how each real frame's light changed, which no renderer does).
    """
    o, r = np.atleast_2d(np.asarray(out_rows, np.float64)), np.atleast_2d(np.asarray(real_rows, np.float64))
    both = np.isfinite(o).all(1) & np.isfinite(r).all(1)
    none = {"interior_mae": None, "interior_flat_mae": None, "interior_over_flat": None, "interior_frames": int(both.sum())}
    if both.sum() < MIN_INTERIOR_FRAMES:
        return none
    inside = (np.asarray(PROFILE_T) >= 0.0) & (np.asarray(PROFILE_T) <= 1.0)
    o, r = o[both][:, inside], r[both][:, inside]
    mae = float(np.abs(o - r).mean())
    flat = float(np.abs(r - r.mean()).mean())
    return {"interior_mae": mae, "interior_flat_mae": flat, "interior_over_flat": mae / flat if flat > 0 else None,
            "interior_frames": int(both.sum())}


def mean_profile(rows: np.ndarray) -> Optional[np.ndarray]:
    """The mean of the finite rows (for the contact sheet's plot), None when there are none."""
    rows = np.asarray(rows, np.float64)
    ok = np.isfinite(rows).all(1)
    return rows[ok].mean(0) if ok.any() else None


OPEN_GAP = 0.05
"""Inner-lip gap (face heights) from which a frame counts as open for upper_share."""


def upper_share(lm: np.ndarray, judge: Judge, min_gap: float = OPEN_GAP) -> Optional[float]:
    """How much of an open mouth is above the line between its corners: the upper lip's share of the opening.

    Per frame whose gap is at least `min_gap`: at the midline (the judge's gap landmarks), the upper
    inner lip's height above the corner line over the opening there; the median over those frames
    (None with fewer than 3). A mouth that opens by its jaw alone reads near 0 (its seam already lies
    about on the corner line); the kit's talkers read 0.18-0.42 (MediaPipe).
    """
    gap = judge.mouth_gap(lm)
    use = np.isfinite(gap) & (gap >= min_gap)
    if use.sum() < 3:
        return None
    pts = lm[use]
    a, b = pts[:, judge.corners[0]], pts[:, judge.corners[1]]
    e_u = (b - a) / np.maximum(np.linalg.norm(b - a, axis=-1, keepdims=True), 1e-6)
    e_v = np.stack([-e_u[:, 1], e_u[:, 0]], -1)  # down the face (image y grows downwards)
    mid = (a + b) / 2
    up = -np.sum((pts[:, judge.gap[0]] - mid) * e_v, -1)
    lo = np.sum((pts[:, judge.gap[1]] - mid) * e_v, -1)
    return float(np.median(up / np.maximum(up + lo, 1e-6)))


def still_lip_distance(real_lm: np.ndarray, judge: Judge, frame: int = 0) -> np.ndarray:
    """lip_distance of one real frame's face held still for every frame (a mouth that never moves)."""
    held = np.repeat(np.asarray(real_lm)[frame:frame + 1], len(real_lm), axis=0)
    return lip_distance(held, real_lm, judge)


def mouth_box(real_lm: np.ndarray, judge: Judge, shape: tuple[int, int], width_px: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a crop width_px * CROP_WIDTH by width_px * CROP_HEIGHT centred on this frame's lips."""
    lips = real_lm[list(judge.lips)]
    cx, cy = np.nanmean(lips, axis=0)
    w, h = int(round(width_px * CROP_WIDTH)), int(round(width_px * CROP_HEIGHT))
    x0 = int(np.clip(round(cx - w / 2), 0, max(0, shape[1] - w)))
    y0 = int(np.clip(round(cy - h / 2), 0, max(0, shape[0] - h)))
    return x0, y0, x0 + w, y0 + h


def mouth_width(real_lm: np.ndarray, judge: Judge) -> float:
    """Median mouth-corner distance over the clip, in pixels: one crop size for every frame."""
    a, b = judge.corners
    w = np.linalg.norm(real_lm[:, a] - real_lm[:, b], axis=-1)
    return float(np.nanmedian(w))


def aligned_mouth(frame: np.ndarray, out_lm: np.ndarray, real_lm: np.ndarray, judge: Judge,
                  box: tuple[int, int, int, int]) -> Optional[np.ndarray]:
    """The output frame warped onto the real frame by the upper-face similarity, cropped to `box` (RGB)."""
    stable = list(judge.stable)
    m = fit_similarity(out_lm[stable], real_lm[stable])
    if m is None:
        return None
    x0, y0, x1, y1 = box
    m = m.copy()
    m[:, 2] -= (x0, y0)
    return cv2.warpAffine(frame, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def crop_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two RGB crops in grey."""
    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    return float(structural_similarity(ga, gb, data_range=255))


def figures(out_gap_native: np.ndarray, out_fps: float, out_gap: np.ndarray, real_gap: np.ndarray, real_fps: float,
            lmd: np.ndarray, lmd_still: np.ndarray, ssim: np.ndarray, ssim_still: np.ndarray) -> dict:
    """The per-mode figures from the series (the output's on the real frame times, except out_gap_native)."""
    r, lag, r0 = lagged_correlation(out_gap, real_gap, real_fps)
    lmd_m, still_m = np.nanmean(lmd) if np.isfinite(lmd).any() else np.nan, np.nanmean(lmd_still)
    both = np.isfinite(out_gap) & np.isfinite(real_gap)
    return {
        "amp": _finite_or_none(amplitude(out_gap, real_gap)),
        "jump": _finite_or_none(max_jump(out_gap_native, out_fps)),
        "r": _finite_or_none(r),
        "lag_frames": int(lag),
        "r_lag0": _finite_or_none(r0),
        "lmd": _finite_or_none(lmd_m),
        "lmd_still": _finite_or_none(still_m),
        "lmd_over_still": _finite_or_none(lmd_m / still_m if still_m > 0 else float("nan")),
        "mouth_ssim": _finite_or_none(np.nanmean(ssim) if np.isfinite(ssim).any() else np.nan),
        "mouth_ssim_still": _finite_or_none(np.nanmean(ssim_still) if np.isfinite(ssim_still).any() else np.nan),
        "p95_gap": _finite_or_none(np.percentile(out_gap[np.isfinite(out_gap)], 95) if np.isfinite(out_gap).any() else np.nan),
        "frames_compared": int(both.sum()),
    }
