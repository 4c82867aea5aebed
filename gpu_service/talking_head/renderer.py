"""Controls to frames: maps face controls onto an avatar's deformation modes and picks the render path.

The paths (NumPy/OpenCV on the CPU in render_cpu.py, batched torch on CUDA/MPS in render_torch.py)
share the control mapping here and the shading in shading.py; they never import this module.
"""

from __future__ import annotations

import logging
from typing import Iterator

import cv2
import numpy as np

from gpu_service.device import device_kind
from gpu_service.engine import EngineHealth
from gpu_service.talking_head.controls import Controls
from gpu_service.talking_head.encoding import BLINK_SKIN_SHARE, MODES, Encoding, upper_lip_rise
from gpu_service.talking_head.shading import PreparedCache

log = logging.getLogger(__name__)


EYE_NARROW = 0.5
"""Share of the eye's opening the upper lid comes down at eye_open=-1 (drawn, like a blink)."""
EYE_WIDEN = 0.3
"""Share of the eye's opening the upper lid goes up at eye_open=1 (warped).

The lid's field moves what lies below the lid with it, so a wider eye is a taller iris: beyond
about a third of the opening it reads as stretched (and on p05 bends the glasses' rim)."""


GAZE_MAX = 0.1
"""The largest iris shift (eye widths, about 14 degrees of eye turn) the gaze fields are asked for: between the
iris and the eye's corner the white is squeezed by up to 1.5 x this over the fall-off (a fifth of the eye)."""


def mode_weights(enc: Encoding, c: Controls, close_upper: float = 0.4) -> np.ndarray:
    """(T, K) amounts of each deformation mode in MODES for the controls, in the avatar's own pixels.

    `close_upper` is the upper lip's share of a closing (the jaw takes the rest); see the seam of
    `encode_from_landmarks`.
    """
    geo = enc.geometry
    fh, hw_m, g0, g_max = geo.face_height, geo.mouth_half_width, geo.rest_gap, geo.max_gap
    # Rounding opens a little more, in proportion to the opening: a seal (m, b, p before a rounded
    # vowel, as in "moon") stays sealed and a /w/'s nearly closed lips stay nearly closed while they round.
    round_open = 1.0 + 0.15 * np.clip(c.mouth_round, 0.0, 1.0)
    open_ = np.clip(c.mouth_open * round_open, 0.0, 1.2) * (1.0 - 0.9 * np.clip(c.lip_tuck, 0, 1))
    # Closed lips press together a little (as on m, b, p) so the seam reads as closed after video
    # compression too, instead of stopping exactly at the landmark gap.
    press = 0.012 * fh * np.clip(1.0 - open_ / 0.12, 0.0, 1.0)
    delta = g_max * open_ - g0 - press  # positive opens past the rest gap, negative closes it
    # A turned face keeps its chin still, so its upper lip takes a larger share of the opening.
    lift = 0.15 * (1.0 - geo.frontal)
    rise = upper_lip_rise(delta, g_max, g0, lift)
    jaw = np.where(delta > 0, delta - rise, (1.0 - close_upper) * delta)
    upper = np.where(delta > 0, -rise, -close_upper * delta)  # forward-down pixels of the upper lip
    spread = hw_m * (0.12 * c.mouth_spread - 0.2 * c.mouth_round + 0.04 * c.smile)
    smile = hw_m * 0.12 * c.smile
    tuck = np.clip(c.lip_tuck, 0, 1) * 0.6 * geo.lower_lip_height
    # Narrowed eyes (eye_open < 0) lower the upper lid by up to EYE_NARROW of the eye's opening, widened
    # ones raise it by up to EYE_WIDEN (the white shows above the iris in surprise and fear).
    lid = np.clip(c.blink - EYE_NARROW * np.clip(c.eye_open, -1.0, 0.0) - EYE_WIDEN * np.clip(c.eye_open, 0.0, 1.0),
                  -EYE_WIDEN, 1.0)
    # Closing (positive) is the lid's travel, drawn by shade_eyes; widening is all warp, at full strength.
    lid = np.where(lid > 0, lid, lid / BLINK_SKIN_SHARE)
    brow = c.brow * geo.brow_travel
    # Gaze in eye widths, held where the eye's field can slide the iris without folding the white.
    gaze_x = np.clip(c.gaze_x, -GAZE_MAX, GAZE_MAX) * geo.eye_width
    gaze_y = np.clip(c.gaze_y, -GAZE_MAX, GAZE_MAX) * geo.eye_width
    out = np.stack([jaw, upper, spread, smile, tuck, lid, lid, brow, gaze_x, gaze_y], axis=1).astype(np.float32)
    assert out.shape[1] == len(MODES)
    return out


HEAD_STILL = 1e-4
"""A frame whose head roll (radians) and shifts (pixels) are all below this gets no head warp."""


def head_params(enc: Encoding, c: Controls, head_motion: bool) -> np.ndarray | None:
    """(T, 3) roll (radians), dx, dy (pixels) of the head, or None when the head stays still.

    Decided frame by frame, so a clip rendered in blocks gets the frames it gets whole: a still
    frame's row is exactly zero, which the render paths take as "no head warp".
    """
    if not head_motion:
        return None
    fw, fh = enc.geometry.face_width, enc.geometry.face_height
    dx = c.head_dx * fw + c.head_yaw * 0.6 * fw
    dy = c.head_dy * fh + c.head_pitch * 0.6 * fh
    params = np.stack([c.head_roll, dx, dy], axis=1).astype(np.float32)
    still = ~np.any(np.abs(params) > HEAD_STILL, axis=1)
    if still.all():
        return None
    params[still] = 0.0
    return params


class _Paste:
    """How an encoding made at a working resolution goes back into its full portrait (see encode_portrait)."""

    def __init__(self, enc: Encoding) -> None:
        r = enc.region
        self.size = (r.width, r.height)
        # Back to the region's size: averaged down from an upscaled face, bicubic up for a downscaled one.
        self.interp = cv2.INTER_AREA if enc.image.shape[1] > r.width else cv2.INTER_CUBIC
        rows, cols = np.nonzero(enc.blend.any(1))[0], np.nonzero(enc.blend.any(0))[0]
        self.window = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        self.target = (slice(r.y0 + self.window[0].start, r.y0 + self.window[0].stop),
                       slice(r.x0 + self.window[1].start, r.x0 + self.window[1].stop))
        self.weight = np.ascontiguousarray(enc.blend[self.window][..., None])
        self.original = enc.frame[self.target].astype(np.float32)


class Renderer:
    """Renders controls on encodings with the path the device calls for (torch off the CPU)."""

    def __init__(self, device: str = "cpu", backend: str = "auto", batch: int = 16, dtype: str = "auto") -> None:
        """`device` is a device name (cuda:1, cpu:0, ...); `dtype` the torch path's RENDER_DTYPE (the CPU path is 8-bit/float32)."""
        self.device = device
        self.backend = ("cv2" if device_kind(device) == "cpu" else "torch") if backend == "auto" else backend
        if self.backend == "torch":
            from gpu_service.talking_head.render_torch import TorchRenderer

            self._impl = TorchRenderer(device, batch=batch, dtype=dtype)
            self.block_frames = batch
            self.precision = self._impl.precision
        elif self.backend == "cv2":
            from gpu_service.talking_head.render_cpu import CpuRenderer

            self._impl = CpuRenderer()
            self.block_frames = 1
            self.precision = "float32"
        else:
            raise ValueError(f"unknown render backend {backend!r}; use auto, cv2 or torch")
        self._pastes = PreparedCache(_Paste, keep=8)
        log.info("renderer ready", extra={"device": device, "backend": self.backend, "precision": self.precision})

    def health(self) -> EngineHealth:
        """The report of an engine whose work is this renderer: available, on its device and path, at its precision."""
        return EngineHealth(available=True, loaded=True, device=self.device, providers=(self.backend,),
                            precision=self.precision)

    def forget(self, enc: Encoding) -> None:
        """Drop what was prepared for `enc` on this renderer's device (its avatar left the device's cache)."""
        self._impl.forget(enc)
        self._pastes.forget(enc)

    def frames(self, enc: Encoding, controls: Controls, head_motion: bool = True,
               close_upper: float = 0.4) -> Iterator[np.ndarray]:
        """Yield (H, W, 3) uint8 RGB frames, one per control frame (close_upper: see mode_weights)."""
        weights = mode_weights(enc, controls, close_upper)
        head = head_params(enc, controls, head_motion)
        if not enc.placed:
            yield from self._impl.frames(enc, weights, head)
            return
        for work in self._impl.frames(enc, weights, head):
            yield self.paste(enc, work)

    def paste(self, enc: Encoding, work: np.ndarray) -> np.ndarray:
        """The full portrait with a working-resolution frame of `enc` scaled back and blended in (Encoding.blend):
        the portrait's size, and its own pixels wherever the blend weight is 0."""
        p = self._pastes.get(enc)
        back = cv2.resize(work, p.size, interpolation=p.interp)[p.window].astype(np.float32)
        frame = enc.frame.copy()
        mixed = p.original + p.weight * (back - p.original)
        frame[p.target] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        return frame

    def render(self, enc: Encoding, controls: Controls, head_motion: bool = True, close_upper: float = 0.4) -> np.ndarray:
        """All frames as one (T, H, W, 3) uint8 array (T may be 0)."""
        frames = list(self.frames(enc, controls, head_motion, close_upper))
        if not frames:
            w, h = enc.frame_size
            return np.zeros((0, h, w, 3), np.uint8)
        return np.stack(frames)
