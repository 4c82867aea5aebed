"""Identity preservation: SSIM of each frame against the portrait, outside the mouth and eyes.

Each frame is aligned to the portrait by a similarity transform (rotation, uniform scale,
translation) fitted with cv2.estimateAffinePartial2D on rigid landmarks, refined by intensity
(ECC) on the upper face, and resampled once with the composed transform, so head drift is not
counted as identity change and the alignment itself does not blur the face. SSIM is then
averaged over the face-oval hull minus the eyes and the mouth (their hulls dilated by MASK_MARGIN
of the face height): the parts that are meant to move. The mouth is the lips and the chin below
them, which a talking jaw carries along; cheeks, nose, brows and forehead are all measured.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from evaluator.metrics.stability import STABLE_LANDMARKS

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176,
             149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
# The chin's outline between the verticals of the mouth corners: the skin a speaking jaw moves.
CHIN = (150, 149, 176, 148, 152, 377, 400, 378, 379)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (362, 382, 381, 380, 374, 373, 390, 249, 263, 466, 388, 387, 386, 385, 384, 398)
MASK_MARGIN = 0.06
# Landmark fits are off by a pixel or so (MediaPipe's tracking drifts on still frames), which on a
# textured face costs more SSIM than real identity changes; an intensity (ECC) refinement of the
# rigid alignment removes that. It may move the frame at most this share of the face height.
REFINE_MAX_SHIFT = 0.04
REFINE_MAX_LINEAR = 0.06
# Bicubic: a moved head's frame is resampled here, and bilinear's blur alone cost 0.006 SSIM on
# rendered head motion; on a still frame both give the same score.
RESAMPLE = cv2.INTER_CUBIC


def _hull_mask(shape: tuple[int, int], pts: np.ndarray, dilate_px: int = 0) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(pts).astype(np.int32)), 1)
    if dilate_px > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
        mask = cv2.dilate(mask, k)
    return mask.astype(bool)


def margin_px(landmarks: np.ndarray) -> int:
    """MASK_MARGIN of the face height (landmarks 10 to 152), in whole pixels, at least 1."""
    lm = np.asarray(landmarks)[:, :2]
    return max(1, int(round(MASK_MARGIN * float(np.linalg.norm(lm[10] - lm[152])))))


def identity_mask(shape: tuple[int, int], landmarks: np.ndarray) -> np.ndarray:
    """Face oval minus the dilated mouth (lips and chin) and eyes, from one frame's (478, 3) pixel landmarks."""
    lm = np.asarray(landmarks)[:, :2]
    margin = margin_px(landmarks)
    face = _hull_mask(shape, lm[list(FACE_OVAL)])
    moving = _hull_mask(shape, lm[list(LIPS + CHIN)], margin) | _hull_mask(shape, lm[list(RIGHT_EYE)], margin)
    moving |= _hull_mask(shape, lm[list(LEFT_EYE)], margin)
    return face & ~moving


def similarity_to(frame_landmarks: np.ndarray, ref_landmarks: np.ndarray) -> Optional[np.ndarray]:
    """(2, 3) similarity taking the frame's rigid landmarks onto the reference's; None if the fit fails."""
    idx = list(STABLE_LANDMARKS)
    src = np.asarray(frame_landmarks)[idx, :2].astype(np.float32)
    dst = np.asarray(ref_landmarks)[idx, :2].astype(np.float32)
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        return None
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    return m


def refine_warp(ref: np.ndarray, gray: np.ndarray, mask: np.ndarray, max_shift_px: float) -> np.ndarray:
    """(2, 3) affine taking reference-crop pixels to `gray`'s pixels by ECC; identity when it fails.

    Affine because MediaPipe's tracked landmarks are biased in scale as well as position (a few
    per cent on still frames). The linear part must stay within REFINE_MAX_LINEAR of identity, so
    a face that is really stretched or reshaped is not made to match; identity is returned when
    ECC does not converge or would move the crop more than that or further than max_shift_px.
    """
    eye = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-5)
    try:
        _, warp = cv2.findTransformECC(ref.astype(np.float32), gray.astype(np.float32), eye.copy(), cv2.MOTION_AFFINE,
                                       criteria, mask.astype(np.uint8), 3)
    except cv2.error:
        return eye
    if (not np.all(np.isfinite(warp)) or float(np.abs(warp[:, :2] - np.eye(2)).max()) > REFINE_MAX_LINEAR
            or float(np.hypot(warp[0, 2], warp[1, 2])) > max_shift_px):
        return eye
    return warp


def _to3(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]])


def aligned_crop(frame: np.ndarray, frame_landmarks: np.ndarray, ref_gray: np.ndarray, ref_landmarks: np.ndarray,
                 box: tuple[int, int, int, int], ecc_mask: np.ndarray, max_shift_px: float) -> Optional[np.ndarray]:
    """The frame's grey face resampled onto the reference crop `box` (x0, y0, x1, y1); None if no fit.

    The landmark similarity is refined by ECC on a provisional warp, then both are composed and the
    original frame is sampled once: every resampling blurs a textured face, and two of them cost
    more SSIM (about 0.02 on the astronaut) than any real change the metric is meant to catch.
    """
    m = similarity_to(frame_landmarks, ref_landmarks)
    if m is None:
        return None
    x0, y0, x1, y1 = box
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    to_crop = _to3(m)
    to_crop[:2, 2] -= (x0, y0)
    first = cv2.warpAffine(gray, to_crop[:2], (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    refine = refine_warp(ref_gray, first, ecc_mask, max_shift_px)
    # Reference-crop pixel -> provisional crop pixel (ECC) -> frame pixel (inverse of the landmark fit).
    total = np.linalg.inv(to_crop) @ _to3(refine)
    return cv2.warpAffine(gray, total[:2].astype(np.float32), (x1 - x0, y1 - y0),
                         flags=RESAMPLE | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)


def identity_ssim(frames, frame_landmarks: np.ndarray, portrait: np.ndarray, portrait_landmarks: np.ndarray) -> np.ndarray:
    """Per-frame masked SSIM against the portrait after similarity alignment; NaN where no face."""
    ref_lm = np.asarray(portrait_landmarks)
    ref_lm = ref_lm[0] if ref_lm.ndim == 3 else ref_lm
    h, w = portrait.shape[:2]
    mask = identity_mask((h, w), ref_lm)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("the portrait's face mask is empty: no face landmarks on the portrait")
    # Only the face's bounding box matters; SSIM over it is much cheaper than over the image.
    pad = 8
    y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + pad + 1)
    ref = cv2.cvtColor(portrait, cv2.COLOR_RGB2GRAY)[y0:y1, x0:x1].astype(np.float32)
    sub = mask[y0:y1, x0:x1]
    # ECC sees only the face above the upper lip: the jaw and chin move with speech.
    upper = sub.copy()
    upper[max(0, int(ref_lm[0, 1]) - margin_px(ref_lm) - y0):] = False
    max_shift = REFINE_MAX_SHIFT * float(np.linalg.norm(ref_lm[10, :2] - ref_lm[152, :2]))
    scores = []
    for frame, lm in zip(frames, np.asarray(frame_landmarks)):
        gray = aligned_crop(frame, lm, ref, ref_lm, (x0, y0, x1, y1), upper, max_shift)
        if gray is None:
            scores.append(np.nan)
            continue
        _, smap = structural_similarity(ref, gray, data_range=255, full=True)
        scores.append(float(smap[sub].mean()))
    return np.array(scores)
