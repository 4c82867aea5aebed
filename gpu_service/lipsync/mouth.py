"""The source's real mouth opening, read from the pixels between the lips.

Face meshes place the inner lips inside an open mouth: on rendered and compressed video MediaPipe
reports about 0.7 px of inner-lip gap per pixel of real opening (0.66 after tracking smoothing).
Closing a frame's mouth by that gap leaves the rest of the source's opening, and the old speech
leaks into the re-voiced video. Here each pair of inner-lip landmarks is checked against the image:
along the face's vertical through the pair, the run of pixels around the pair's midpoint that
look like neither lip (teeth, tongue, the dark cavity) is the visible opening; where it reaches
past a landmark, the landmark is moved out to its edge. Landmarks are only ever moved outwards
(a mesh that already spans the opening is left alone), so a closed mouth is unchanged.
"""

from __future__ import annotations

import cv2
import numpy as np

from gpu_service.talking_head import landmarks as L

_UPPER = np.array(L.INNER_UPPER[1:-1])
_LOWER = np.array(L.INNER_LOWER[1:-1])
_OUT_UP = np.array(L.OUTER_UPPER[1:-1])
_OUT_LO = np.array(L.OUTER_LOWER[1:-1])
"""Aligned columns across the mouth, corners excluded: inner upper, inner lower, outer upper, outer lower."""
STEP = 0.5
"""Sampling step along each column, in pixels."""
COLOUR_DISTANCE = 30.0
"""RGB distance from both lip colours beyond which a pixel is taken for the mouth's interior."""


def _lip_colour(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Mean colour at pts (N, 2) of a float32 image, bilinear."""
    mx = pts[:, 0].astype(np.float32)[None, :]
    my = pts[:, 1].astype(np.float32)[None, :]
    return cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]


def _down_the_face(lm: np.ndarray) -> np.ndarray:
    """Unit vector down the face: the eye line turned a quarter clockwise."""
    eye_l, eye_r = L.eye_centres(lm)
    axis = (eye_r - eye_l) / max(float(np.linalg.norm(eye_r - eye_l)), 1e-6)
    return np.array([-axis[1], axis[0]], np.float32)


def visible_opening(frame: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per inner-lip column (corners excluded): how far (px, >= 0) the visible opening reaches past the upper and the lower landmark."""
    e_v = _down_the_face(lm)
    pu, pl, ou, ol = lm[_UPPER], lm[_LOWER], lm[_OUT_UP], lm[_OUT_LO]
    mid = (pu + pl) / 2

    def along(p: np.ndarray) -> np.ndarray:
        return ((p - mid) @ e_v).astype(np.float32)

    t_pu, t_pl, t_ou, t_ol = along(pu), along(pl), along(ou), along(ol)
    # Lip colours halfway through each lip (outer to inner contour), where neither skin nor interior reaches.
    t_cu = np.minimum((t_ou + t_pu) / 2, t_pu - 1.0)
    t_cl = np.maximum((t_ol + t_pl) / 2, t_pl + 1.0)
    reach = float(max(np.max(t_pl - t_cu), np.max(t_cl - t_pu), 2.0)) + 1.0
    ts = np.arange(-reach, reach + STEP, STEP, dtype=np.float32)
    # One small blurred crop around the mouth: compression noise must not break a run of interior pixels.
    pts = np.concatenate([ou, ol])
    x0, y0 = np.floor(pts.min(0) - reach - 2).astype(int)
    x1, y1 = np.ceil(pts.max(0) + reach + 3).astype(int)
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return np.zeros(len(_UPPER), np.float32), np.zeros(len(_UPPER), np.float32)
    img = cv2.GaussianBlur(frame[y0:y1, x0:x1].astype(np.float32), (0, 0), 0.6)
    off = np.array([x0, y0], np.float32)
    grid = mid[:, None, :] - off + ts[None, :, None] * e_v  # (columns, samples, 2)
    prof = cv2.remap(img, grid[..., 0], grid[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    c_up = _lip_colour(img, mid - off + t_cu[:, None] * e_v)
    c_lo = _lip_colour(img, mid - off + t_cl[:, None] * e_v)
    dist = np.minimum(np.linalg.norm(prof - c_up[:, None], axis=-1), np.linalg.norm(prof - c_lo[:, None], axis=-1))
    inside = dist > COLOUR_DISTANCE
    # A dark cavity meets bright teeth through in-between, lip-like shades: bridge such gaps of up to 2 px.
    inside = cv2.morphologyEx(inside.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((1, 5), np.uint8)).astype(bool)
    # Keep only the run through the midpoint, and never past the lip colour samples.
    inside &= (ts[None, :] > t_cu[:, None]) & (ts[None, :] < t_cl[:, None])
    centre = len(ts) // 2
    up = np.zeros(len(_UPPER), np.float32)
    lo = np.zeros(len(_UPPER), np.float32)
    for k in range(len(_UPPER)):
        row = inside[k]
        if not row[centre]:
            continue
        a = centre
        while a > 0 and row[a - 1]:
            a -= 1
        b = centre
        while b < len(ts) - 1 and row[b + 1]:
            b += 1
        up[k] = max(0.0, float(t_pu[k] - (ts[a] - STEP / 2)))
        lo[k] = max(0.0, float((ts[b] + STEP / 2) - t_pl[k]))
    return up, lo


def inner_gap(lm: np.ndarray) -> float:
    """The inner-lip gap in pixels as the encoding measures it (pairs 13/14, 82/87, 312/317 down the face)."""
    e_v = _down_the_face(lm)
    return max(0.0, float(np.mean((lm[L.INNER_LOWER_MID] - lm[L.INNER_UPPER_MID]) @ e_v)))


def refine_inner_lips(frame: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Landmarks with the inner lips moved out to the edges of the mouth opening visible in `frame`."""
    up, lo = visible_opening(frame, lm)
    if not (up.any() or lo.any()):
        return lm
    e_v = _down_the_face(lm)
    out = lm.copy()
    out[_UPPER] -= up[:, None] * e_v
    out[_LOWER] += lo[:, None] * e_v
    return out
