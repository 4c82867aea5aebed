"""Face tracking through a video: MediaPipe FaceMesh in tracking mode, smoothed by a One-Euro filter.

Tracking mode (static_image_mode=False) reuses the previous frame's face region, so it is both
faster than detecting every frame and steadier. The raw mesh still jitters by a pixel or so,
which a per-frame warp would turn into a swimming mouth; a One-Euro filter removes the jitter
while following fast lip motion (its cutoff rises with speed).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
from mediapipe.python.solutions.face_mesh_connections import FACEMESH_LIPS

from gpu_service.talking_head import landmarks as L

log = logging.getLogger(__name__)

LIPS = np.array(sorted({i for pair in FACEMESH_LIPS for i in pair}))
"""Every lip landmark of the mesh (outer and inner contours)."""


class OneEuroFilter:
    """One-Euro filter (Casiez et al. 2012) over an array of points, in units of the face size.

    Velocities are measured in face widths per second, so one set of parameters suits a small
    and a large face alike.
    """

    def __init__(self, min_cutoff_hz: float = 0.8, beta: float = 3.0, d_cutoff_hz: float = 2.0) -> None:
        self.min_cutoff = min_cutoff_hz
        self.beta = beta
        self.d_cutoff = d_cutoff_hz
        self.reset()

    def reset(self) -> None:
        """Forget the past (after a cut or a frame without a face)."""
        self._x: Optional[np.ndarray] = None
        self._dx: Optional[np.ndarray] = None

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, dt: float, scale: float) -> np.ndarray:
        """Filter one observation (N, 2) taken dt seconds after the previous one; `scale` is the face size in pixels."""
        x = np.asarray(x, np.float64)
        if self._x is None:
            self._x = x.copy()
            self._dx = np.zeros(len(x))
            return x.astype(np.float32)
        speed = np.linalg.norm(x - self._x, axis=-1) / dt / max(scale, 1.0)
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * speed + (1.0 - a_d) * self._dx
        cutoff = self.min_cutoff + self.beta * self._dx
        a = self._alpha(cutoff, dt)[:, None]
        self._x = a * x + (1.0 - a) * self._x
        return self._x.astype(np.float32)


class FaceTracker:
    """One face followed through consecutive frames; one instance per video (it holds tracking state).

    With `max_faces` > 1 the mesh tracks that many faces and one is followed: the `face_index`-th
    by size (0, the largest) where the tracker starts or has lost its face, then from frame to
    frame the one nearest to where it was.
    """

    def __init__(self, fps: float, min_confidence: float = 0.5, smooth: bool = True,
                 jump_fraction: float = 0.25, lip_filter: tuple[float, float, float] = (4.0, 20.0, 4.0),
                 max_faces: int = 1, face_index: int = 0) -> None:
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=max(1, max_faces), refine_landmarks=True,
            min_detection_confidence=min_confidence, min_tracking_confidence=min_confidence,
        )
        self.face_index = face_index
        self.dt = 1.0 / float(fps)
        self.filter = OneEuroFilter() if smooth else None
        # The lips get a much lighter filter: their landmarks say how far this frame's mouth must be
        # closed, and a lagging estimate would let the source's own mouth motion leak through.
        self.lip_filter = OneEuroFilter(*lip_filter) if smooth else None
        self.jump_fraction = jump_fraction
        self._last: Optional[np.ndarray] = None

    def close(self) -> None:
        """Release the MediaPipe graph."""
        self._mesh.close()

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def raw(self, frame_rgb: np.ndarray) -> Optional[np.ndarray]:
        """The mesh's (478, 2) pixel landmarks for this frame, unsmoothed, or None without a face."""
        h, w = frame_rgb.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(frame_rgb))
        if not result.multi_face_landmarks:
            return None
        faces = [np.array([[p.x * w, p.y * h] for p in face.landmark], dtype=np.float32)
                 for face in result.multi_face_landmarks]
        if len(faces) == 1 and self.face_index == 0:
            return faces[0]
        if self._last is not None:  # follow the face where it was, unless it is gone (nothing within a face width)
            near = min(faces, key=lambda f: float(np.linalg.norm(f[L.NOSE_TIP] - self._last[L.NOSE_TIP])))
            if np.linalg.norm(near[L.NOSE_TIP] - self._last[L.NOSE_TIP]) <= np.ptp(self._last[L.FACE_OVAL, 0]):
                return near
        ranked = L.by_size(faces)
        return ranked[self.face_index] if self.face_index < len(ranked) else None

    def track(self, frame_rgb: np.ndarray) -> Optional[np.ndarray]:
        """Smoothed landmarks for the next frame of the stream, or None (and the smoother reset) without a face."""
        lm = self.raw(frame_rgb)
        if lm is None:
            self._reset()
            return None
        if self.filter is None:
            self._last = lm
            return lm
        scale = float(np.ptp(lm[L.FACE_OVAL, 0]))
        # A jump of a quarter face (a cut, a loop restart) starts the smoother afresh instead of gliding across.
        if self._last is not None and float(np.abs(lm[L.NOSE_TIP] - self._last[L.NOSE_TIP]).max()) > self.jump_fraction * scale:
            self.filter.reset()
            self.lip_filter.reset()
        self._last = lm
        out = self.filter(lm, self.dt, scale)
        out[LIPS] = self.lip_filter(lm[LIPS], self.dt, scale)
        return out

    def _reset(self) -> None:
        self._last = None
        if self.filter is not None:
            self.filter.reset()
            self.lip_filter.reset()
