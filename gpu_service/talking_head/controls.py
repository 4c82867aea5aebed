"""Per-frame face controls: the seam between driving (speech -> controls) and rendering (controls -> frames).

Every field is a float32 array of shape (T,), one value per video frame. Values are absolute
targets, independent of the portrait: the renderer maps them onto each avatar's own rest state
(a portrait whose mouth is open at rest is closed by mouth_open=0, opened further by 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

SPEECH_OPEN = 0.0865 / 0.22
"""mouth_open at the widest opening of conversational speech: an inner-lip gap of 0.0865 face heights.

mouth_open=1 is the renderer's widest opening, 0.22 face heights on a frontal face (less on a turned
one: encoding.FaceGeometry.max_gap), which real speakers do not use when they talk: the kit's GRID
talkers peak at 0.065-0.12 (p95 0.064-0.113) and conversational speech stays within 0.035-0.11.
Driving works in units of this opening (visemes.py) and scales them by it. It was 0.08 until the
talking head's self-reenactment amplitude on the kit's clips sat at 0.72-0.89 of the real talkers' (a
mouth that opens a little less than the person's at every peak); 0.0865 puts it at 0.76-0.97, with the
jaw's top speed (driving._JAW_SPEED) lowered in proportion so no frame moves further than before.
"""


@dataclass
class Controls:
    """Face controls for T frames at `fps`."""

    fps: float
    mouth_open: np.ndarray
    """Inner-lip gap: 0 lips sealed, 1 the widest the face opens (0.22 face heights); speech peaks at SPEECH_OPEN."""
    mouth_round: np.ndarray
    """Rounding/protrusion for o, u, w: 0 none, 1 fully rounded (corners drawn in)."""
    mouth_spread: np.ndarray
    """Spreading for i, e: 0 none, 1 fully spread (corners pulled out)."""
    lip_tuck: np.ndarray
    """Lower lip tucked under the upper teeth for f, v: 0 none, 1 full."""
    smile: np.ndarray
    """Mouth corners: -1 down (sad), 0 neutral, 1 up (happy)."""
    brow: np.ndarray
    """Brows: -1 lowered/furrowed (angry), 0 neutral, 1 raised (surprised)."""
    eye_open: np.ndarray
    """Extra eye opening from emotion: -1 narrowed, 0 neutral, 1 wide (surprised, fearful)."""
    blink: np.ndarray
    """Eyelid closure: 0 open, 1 closed."""
    gaze_x: np.ndarray
    """Where the eyes look: the irises' shift to the image's right, in eye widths (0 at the camera; |x| < 0.1)."""
    gaze_y: np.ndarray
    """The irises' shift down, in eye widths (small: |y| < 0.05)."""
    head_yaw: np.ndarray
    """Head turn, radians (small: |x| < 0.1)."""
    head_pitch: np.ndarray
    """Head nod, radians (small)."""
    head_roll: np.ndarray
    """Head tilt, radians (small)."""
    head_dx: np.ndarray
    """Head shift right, as a fraction of the face width."""
    head_dy: np.ndarray
    """Head shift down, as a fraction of the face height."""

    @property
    def n_frames(self) -> int:
        """Number of frames T."""
        return int(len(self.mouth_open))

    @classmethod
    def neutral(cls, n_frames: int, fps: float) -> "Controls":
        """A still, closed-mouthed, open-eyed face for n_frames."""
        zeros = {f.name: np.zeros(n_frames, np.float32) for f in fields(cls) if f.name != "fps"}
        return cls(fps=fps, **zeros)

    def as_matrix(self) -> np.ndarray:
        """All controls stacked as (T, C) in field order (for batched renderers)."""
        return np.stack([getattr(self, n) for n in self.names()], axis=1).astype(np.float32)

    @classmethod
    def names(cls) -> list[str]:
        """Control names in field order, without fps."""
        return [f.name for f in fields(cls) if f.name != "fps"]

    def slice(self, start: int, stop: int) -> "Controls":
        """Frames [start, stop) as a new Controls."""
        return Controls(fps=self.fps, **{n: getattr(self, n)[start:stop] for n in self.names()})
