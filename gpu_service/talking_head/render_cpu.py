"""CPU render path: one cv2.remap of the face crop per frame, then the mouth interior and the head."""

from __future__ import annotations

from typing import Iterator, Optional

import cv2
import numpy as np

from gpu_service.talking_head.encoding import MODES, Encoding
from gpu_service.talking_head.shading import (PreparedCache, jaw_motion, lip_depths, mouth_alpha, mouth_colour,
                                              mouth_layout, other_map, seam_band, seam_shift, shade_eyes)

BLINK_L, BLINK_R = MODES.index("blink_l"), MODES.index("blink_r")


def lut_np(table: np.ndarray, u: np.ndarray, u0: float, step: float) -> np.ndarray:
    """Linear interpolation in a LUT sampled every `step` from u0 (clamped at the ends)."""
    idx = np.clip((u - u0) / step, 0.0, len(table) - 1.001)
    i0 = idx.astype(np.int32)
    f = idx - i0
    return table[i0] * (1.0 - f) + table[i0 + 1] * f


class _Prepared:
    """Per-encoding arrays laid out for fast per-frame work."""

    def __init__(self, enc: Encoding) -> None:
        h, w = enc.crop.height, enc.crop.width
        self.grid = np.empty((h, w, 2), np.float32)
        self.grid[..., 0] = np.arange(w, dtype=np.float32)[None, :]
        self.grid[..., 1] = np.arange(h, dtype=np.float32)[:, None]
        self.bases = np.ascontiguousarray(enc.bases.reshape(len(enc.bases), -1))
        self.crop_img = np.ascontiguousarray(enc.image[enc.crop.slices])
        self._head_center = enc.head_center
        self._rel: Optional[np.ndarray] = None
        self.head_mask = enc.head_mask
        u0, step = enc.geometry.lut_u0, enc.geometry.lut_step
        self.lut = lambda table, u: lut_np(table, u, u0, step)
        self.mouth = mouth_layout(enc)
        self.band_rows, self.band_cols, own = seam_band(enc)
        self.band_own = own[:, None]
        self.shape = (h, w)

    @property
    def rel(self) -> np.ndarray:
        """(h, w, 2) each pixel's offset from the head's centre, made on the first frame with head motion
        (lip-sync, an encoding per frame, never needs it)."""
        if self._rel is None:
            self._rel = self.grid - self._head_center[None, None, :]
        return self._rel


class CpuRenderer:
    """NumPy/OpenCV renderer; keeps the prepared layout of recently used encodings."""

    def __init__(self, keep: int = 8) -> None:
        self._prepared = PreparedCache(_Prepared, keep)

    def _prep(self, enc: Encoding) -> _Prepared:
        return self._prepared.get(enc)

    def forget(self, enc: Encoding) -> None:
        """Drop the layout prepared for `enc` (its avatar left this device's cache)."""
        self._prepared.forget(enc)

    def render_crop(self, enc: Encoding, weights: np.ndarray, head: Optional[np.ndarray]) -> np.ndarray:
        """The animated face crop (h, w, 3) uint8 for one frame's mode weights and head pose."""
        p = self._prep(enc)
        h, w = p.shape
        smap = (weights @ p.bases).reshape(h, w, 2)
        smap += p.grid
        patch = enc.patch.slices
        sub = smap[patch]
        o = other_map(p.mouth, weights)
        below_up, above_lo = lip_depths(sub[..., 0], sub[..., 1], enc.patch_side, enc, p.mouth, weights, p.lut, o)
        alpha = mouth_alpha(below_up, above_lo, enc, np.clip, enc.patch_mask)
        motion = jaw_motion(p.mouth, weights)
        g = float(motion[0].max())
        shift = seam_shift(below_up, above_lo, enc.patch_side, motion[0], enc, np.clip, opening=g > 0.0, closing=g < 0.0)
        if shift is not None:
            sub[..., 0] += shift[0]
            sub[..., 1] += shift[1]
        out = cv2.remap(p.crop_img, smap, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if len(p.band_rows):  # the seam's pixels, drawn from both lips (see seam_band)
            r, c = p.band_rows, p.band_cols
            ox = np.ascontiguousarray(o[0][r, c][None, :])
            oy = np.ascontiguousarray(o[1][r, c][None, :])
            other = cv2.remap(p.crop_img, ox, oy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0].astype(np.float32)
            view = out[patch]
            mixed = view[r, c].astype(np.float32) * p.band_own + other * (1.0 - p.band_own)
            view[r, c] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        if float(alpha.max()) > 0.0:
            # The colour only where the interior shows: the window of the patch its alpha covers.
            rows, cols = np.nonzero(alpha.any(1))[0], np.nonzero(alpha.any(0))[0]
            win = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
            rgb = mouth_colour(p.mouth.window(*win), below_up[win], above_lo[win], *motion, enc, np.clip)
            a = alpha[win][..., None]
            view = out[patch][win]
            mixed = view.astype(np.float32) * (1.0 - a) + np.stack(rgb, -1) * a
            view[...] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        lid_l, lid_r = float(weights[BLINK_L]), float(weights[BLINK_R])
        if lid_l > 0.0 or lid_r > 0.0:
            eyes = enc.eye_patch.slices
            alpha, bright, lash = shade_eyes(enc.eye_map, lid_l, lid_r, np.clip)
            a, lw = alpha[..., None], lash[..., None]
            region = out[eyes].astype(np.float32)
            lid = enc.eye_skin * bright[..., None] * (1.0 - lw) + enc.eye_lash * lw
            mixed = region * (1.0 - a) + lid * a
            out[eyes] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        if head is not None and np.any(head != 0.0):  # a still frame's row is exactly zero
            roll, tx, ty = (float(v) for v in head)
            c, s = np.cos(roll), np.sin(roll)
            rx = p.rel[..., 0] - tx
            ry = p.rel[..., 1] - ty
            m = p.head_mask
            hmap = np.empty_like(p.grid)
            hmap[..., 0] = p.grid[..., 0] + m * (c * rx + s * ry - p.rel[..., 0])
            hmap[..., 1] = p.grid[..., 1] + m * (-s * rx + c * ry - p.rel[..., 1])
            # Bicubic: this second resampling of the face would otherwise blur it (identity SSIM -0.007).
            out = cv2.remap(out, hmap, None, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        return out

    def frames(self, enc: Encoding, weights: np.ndarray, head: Optional[np.ndarray]) -> Iterator[np.ndarray]:
        """Full frames: the portrait with the animated crop pasted back (everything else untouched)."""
        for t in range(len(weights)):
            frame = enc.image.copy()
            frame[enc.crop.slices] = self.render_crop(enc, weights[t], None if head is None else head[t])
            yield frame
