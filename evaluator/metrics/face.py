"""Face measurements per frame with MediaPipe FaceMesh, and MP4 decoding (frames + audio) via ffmpeg.

Landmark indices (MediaPipe's 478-point mesh, refine_landmarks=True):
- inner-lip gap: mean of the pairs 13/14, 82/87, 312/317, divided by the face height 10<->152;
- mouth width: corners 61<->291, divided by the face height;
- eye aperture: lid distance divided by eye width; the subject's right eye (image left) is
  159/145 over 33<->133, the subject's left eye (image right) 386/374 over 362<->263.
Frames without a detected face are NaN in every array.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

log = logging.getLogger(__name__)

N_LANDMARKS = 478
LIP_PAIRS = ((13, 14), (82, 87), (312, 317))
FACE_TOP, FACE_BOTTOM = 10, 152
MOUTH_CORNERS = (61, 291)
RIGHT_EYE = (159, 145, 33, 133)  # upper lid, lower lid, outer corner, inner corner
LEFT_EYE = (386, 374, 362, 263)


@dataclass
class FaceTrack:
    """Per-frame measurements of one face; NaN where no face was found."""

    mouth_gap: np.ndarray
    """Inner-lip gap / face height."""
    mouth_width: np.ndarray
    """Mouth corner distance / face height."""
    eye_left: np.ndarray
    """Subject's left eye aperture / eye width."""
    eye_right: np.ndarray
    """Subject's right eye aperture / eye width."""
    face_height: np.ndarray
    """Landmark 10 to 152, in pixels."""
    landmarks: np.ndarray
    """(T, 478, 3): x, y in pixels, z in MediaPipe's scale times the image width."""

    @property
    def found(self) -> np.ndarray:
        """Frames with a face."""
        return np.isfinite(self.face_height)

    @property
    def eye_aperture(self) -> np.ndarray:
        """Mean of both eyes' apertures."""
        return 0.5 * (self.eye_left + self.eye_right)

    def __len__(self) -> int:
        return len(self.face_height)


def _dist(lm: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.linalg.norm(lm[..., a, :2] - lm[..., b, :2], axis=-1)


def measures_from_landmarks(landmarks: np.ndarray) -> FaceTrack:
    """Derive gap, width and eye apertures from (T, 478, 3) pixel landmarks."""
    lm = np.asarray(landmarks, dtype=np.float64)
    height = _dist(lm, FACE_TOP, FACE_BOTTOM)
    gap = np.mean([_dist(lm, a, b) for a, b in LIP_PAIRS], axis=0) / height
    width = _dist(lm, *MOUTH_CORNERS) / height
    eye_r = _dist(lm, RIGHT_EYE[0], RIGHT_EYE[1]) / _dist(lm, RIGHT_EYE[2], RIGHT_EYE[3])
    eye_l = _dist(lm, LEFT_EYE[0], LEFT_EYE[1]) / _dist(lm, LEFT_EYE[2], LEFT_EYE[3])
    return FaceTrack(gap, width, eye_l, eye_r, height, lm)


class FaceMeasurer:
    """A reusable FaceMesh (tracking mode by default); use as a context manager or call close()."""

    def __init__(self, static_image_mode: bool = False, min_confidence: float = 0.3, refine: bool = True) -> None:
        import mediapipe as mp

        self.n_landmarks = N_LANDMARKS if refine else 468  # without refinement there are no iris points
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_image_mode,
            max_num_faces=1,
            refine_landmarks=refine,
            min_detection_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
        )

    def landmarks(self, frame: np.ndarray) -> np.ndarray:
        """(n_landmarks, 3) pixel landmarks of one RGB uint8 frame, NaN if no face."""
        img = np.ascontiguousarray(frame)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"frames must be RGB uint8 HxWx3, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        res = self._mesh.process(img)
        if not res.multi_face_landmarks:
            return np.full((self.n_landmarks, 3), np.nan)
        pts = res.multi_face_landmarks[0].landmark
        return np.array([(p.x * w, p.y * h, p.z * w) for p in pts], dtype=np.float64)

    def close(self) -> None:
        """Release the graph."""
        self._mesh.close()

    def __enter__(self) -> "FaceMeasurer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_frames(frames: Iterable[np.ndarray], static_image_mode: bool = False, min_confidence: float = 0.3) -> FaceTrack:
    """Track one face through RGB uint8 frames and measure mouth, eyes and landmarks per frame."""
    with FaceMeasurer(static_image_mode, min_confidence) as fm:
        lms = [fm.landmarks(f) for f in frames]
    lm = np.stack(lms) if lms else np.zeros((0, N_LANDMARKS, 3))
    track = measures_from_landmarks(lm)
    log.info("faces measured", extra={"frames": len(track), "found": int(track.found.sum())})
    return track


def measure_image(image: np.ndarray) -> FaceTrack:
    """Measure a single still (e.g. the portrait) in static-image mode."""
    return measure_frames([image], static_image_mode=True)


def read_video(path: str, audio_rate: int = 16000, with_audio: bool = True) -> tuple[np.ndarray, float, Optional[np.ndarray]]:
    """Decode an MP4 to (frames (T, H, W, 3) RGB uint8, fps, mono float32 audio at audio_rate or None)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    fps = float(meta["fps"])
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    video = np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
    audio = read_audio(path, audio_rate) if with_audio else None
    return video, fps, audio


def read_audio(path: str, rate: int = 16000) -> Optional[np.ndarray]:
    """The file's audio as mono float32 at `rate`, or None when it has no audio stream."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(int(rate)),
           "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        if b"does not contain any stream" in proc.stderr or b"Output file #0 does not contain" in proc.stderr:
            return None
        raise RuntimeError(f"ffmpeg could not decode audio of {path}: {proc.stderr.decode(errors='replace')[-300:]}")
    if not proc.stdout:
        return None
    return np.frombuffer(proc.stdout, np.float32).copy()
