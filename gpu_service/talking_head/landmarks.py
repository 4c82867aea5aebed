"""Face landmarks: MediaPipe face mesh (478 points, refined lips/irises), found once per portrait.

Every MediaPipe landmark id the service uses is named here, once.
"""

from __future__ import annotations

import logging
import threading

import cv2
import numpy as np

from gpu_service.errors import BadMedia

log = logging.getLogger(__name__)

# MediaPipe face-mesh indices, ordered from the image-left corner to the image-right corner.
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
INNER_UPPER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
INNER_LOWER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
# The middle of the inner lips: the centre point and one to either side, upper and lower in facing pairs.
INNER_UPPER_MID = [13, 312, 82]
INNER_LOWER_MID = [14, 317, 87]
OUTER_UPPER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
OUTER_LOWER = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
# Eyes as they appear in the image: "left" is the image-left eye (the subject's right).
EYE_LEFT_UPPER = [33, 246, 161, 160, 159, 158, 157, 173, 133]
EYE_LEFT_LOWER = [33, 7, 163, 144, 145, 153, 154, 155, 133]
EYE_RIGHT_UPPER = [362, 398, 384, 385, 386, 387, 388, 466, 263]
EYE_RIGHT_LOWER = [362, 382, 381, 380, 374, 373, 390, 249, 263]
# The middle of each eyelid (upper, lower), for measuring an eye's opening.
LID_MID_LEFT = (159, 145)
LID_MID_RIGHT = (386, 374)
BROW_LEFT = [70, 63, 105, 66, 107, 46, 53, 52, 65, 55]
BROW_RIGHT = [300, 293, 334, 296, 336, 276, 283, 282, 295, 285]
CHIN = 152
FOREHEAD = 10
NOSE_TIP = 1
SUBNASALE = 2
MOUTH_LEFT, MOUTH_RIGHT = 61, 291

_LOCK = threading.Lock()  # MediaPipe graphs are not safe to share between threads


def _run_mesh(image_rgb: np.ndarray, max_faces: int, confidence: float) -> list[np.ndarray]:
    import mediapipe as mp

    h, w = image_rgb.shape[:2]
    with _LOCK, mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True, max_num_faces=max_faces, refine_landmarks=True, min_detection_confidence=confidence
    ) as mesh:
        result = mesh.process(np.ascontiguousarray(image_rgb))
    faces = []
    for face in result.multi_face_landmarks or []:
        faces.append(np.array([[p.x * w, p.y * h] for p in face.landmark], dtype=np.float32))
    return faces


def _in_windows(image_rgb: np.ndarray, max_faces: int) -> list[np.ndarray]:
    """Faces found in square windows along the long side of a wide or tall image (overlapping by half)."""
    h, w = image_rgb.shape[:2]
    side = min(h, w)
    faces: list[np.ndarray] = []
    for start in range(0, max(h, w) - side + 1, max(1, side // 2)):
        window = image_rgb[:, start:start + side] if w > h else image_rgb[start:start + side]
        offset = np.array([start, 0] if w > h else [0, start], np.float32)
        for face in _run_mesh(np.ascontiguousarray(window), max_faces, 0.5):
            face = face + offset
            if not any(_same_face(face, seen) for seen in faces):  # the windows overlap: a face may be seen twice
                faces.append(face)
    return faces


def _same_face(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two landmark sets are one face (nose tips closer than a quarter of the face width)."""
    width = float(np.ptp(a[FACE_OVAL, 0]))
    return float(np.linalg.norm(a[NOSE_TIP] - b[NOSE_TIP])) < 0.25 * width


def detect_faces(image_rgb: np.ndarray, max_faces: int = 8) -> list[np.ndarray]:
    """Every face's 478 landmarks (x, y in pixels), largest first.

    The mesh's detector sees the image shrunk to 128 px, so it misses faces that are small in
    the frame: when none is found, a wide (or tall) image is searched in square windows (two
    portraits side by side are found so), then the image is tried upscaled (the cameraman of
    skimage is found at 2x).
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise BadMedia("the image must be RGB")
    faces = _run_mesh(image_rgb, max_faces, 0.5)
    h, w = image_rgb.shape[:2]
    if not faces and max(h, w) >= 1.5 * min(h, w):
        faces = _in_windows(image_rgb, max_faces)
        if faces:
            log.info("faces found in windows", extra={"faces": len(faces)})
    if not faces and max(image_rgb.shape[:2]) <= 1600:
        for scale in (2.0, 3.0):
            big = cv2.resize(image_rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
            faces = [f / scale for f in _run_mesh(big, max_faces, 0.4)]
            if faces:
                log.info("face found after upscaling", extra={"scale": scale})
                break
    faces.sort(key=lambda f: -float(np.prod(f.max(0) - f.min(0))))
    return faces


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image-left and image-right eye centres (the mean of each eye's lid points)."""
    return (landmarks[EYE_LEFT_UPPER + EYE_LEFT_LOWER].mean(0), landmarks[EYE_RIGHT_UPPER + EYE_RIGHT_LOWER].mean(0))


def face_box(landmarks: np.ndarray) -> tuple[int, int, int, int]:
    """x, y, width, height of the face oval's bounding box, in whole pixels."""
    oval = landmarks[FACE_OVAL]
    x0, y0 = np.floor(oval.min(0)).astype(int)
    x1, y1 = np.ceil(oval.max(0)).astype(int)
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def face_hull(landmarks: np.ndarray) -> np.ndarray:
    """(N, 2) convex hull of the face oval: nothing outside it moves when the face is animated."""
    return cv2.convexHull(landmarks[FACE_OVAL].astype(np.float32))[:, 0]
