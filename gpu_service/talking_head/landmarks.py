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
# The refined irises: each a centre and four points on its rim (which eye is which is found by position).
IRIS_CENTRES = (468, 473)
IRIS_RIMS = ((469, 470, 471, 472), (474, 475, 476, 477))
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


def _search(image_rgb: np.ndarray, windows: list[tuple[int, int, int]], max_faces: int) -> list[np.ndarray]:
    """Faces found in square windows (x, y, side) of the image, each face once: the windows overlap, and of two
    sightings of one face the one lying farther inside its window is kept (a face cut by a window's edge is
    found with a bent mesh)."""
    h, w = image_rgb.shape[:2]
    found: list[tuple[np.ndarray, float]] = []
    for x, y, side in windows:
        window = np.ascontiguousarray(image_rgb[y:y + side, x:x + side])
        wh, ww = window.shape[:2]
        for face in _run_mesh(window, max_faces, 0.5):
            (fx0, fy0), (fx1, fy1) = face.min(0), face.max(0)
            # Room to the window's edges, where they are not the image's.
            room = min(fx0 if x > 0 else np.inf, ww - fx1 if x + ww < w else np.inf,
                       fy0 if y > 0 else np.inf, wh - fy1 if y + wh < h else np.inf)
            face = face + np.array([x, y], np.float32)
            same = [k for k, (seen, _) in enumerate(found) if _same_face(face, seen)]
            if not same:
                found.append((face, room))
            elif room > found[same[0]][1]:
                found[same[0]] = (face, room)
    return [face for face, _ in found]


def _in_windows(image_rgb: np.ndarray, max_faces: int) -> list[np.ndarray]:
    """Faces found in square windows along the long side of a wide or tall image (overlapping by half)."""
    h, w = image_rgb.shape[:2]
    side = min(h, w)
    starts = range(0, max(h, w) - side + 1, max(1, side // 2))
    return _search(image_rgb, [(s, 0, side) if w > h else (0, s, side) for s in starts], max_faces)


TILE_MIN = 256
"""Smallest window of the tiled search for a face small in a large frame."""


def _in_tiles(image_rgb: np.ndarray, max_faces: int) -> list[np.ndarray]:
    """Faces found in a grid of square tiles overlapping by half: tiles of half the short side, then a quarter.

    A face a tenth of a large frame's side is a dozen pixels at the detector's 128 px; in a tile of
    half or a quarter of the frame it is two or four times that. Tiles stop at TILE_MIN pixels, and
    at 58 tiles (the two sizes on a square frame), so an image with no face is given up in about a second.
    """
    h, w = image_rgb.shape[:2]
    side = min(h, w) // 2
    for _ in range(2):
        if side < TILE_MIN:
            break
        step = side // 2
        xs = sorted({*range(0, w - side + 1, step), w - side})
        ys = sorted({*range(0, h - side + 1, step), h - side})
        faces = _search(image_rgb, [(x, y, side) for y in ys for x in xs], max_faces)
        if faces:
            return faces
        side //= 2
    return []


def _same_face(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two landmark sets are one face (nose tips closer than a quarter of the face width)."""
    width = float(np.ptp(a[FACE_OVAL, 0]))
    return float(np.linalg.norm(a[NOSE_TIP] - b[NOSE_TIP])) < 0.25 * width


def detect_faces(image_rgb: np.ndarray, max_faces: int = 8) -> list[np.ndarray]:
    """Every face's 478 landmarks (x, y in pixels), largest first (`by_size`).

    The mesh's detector sees the image shrunk to 128 px, so it misses faces that are small in
    the frame: when none is found, a wide (or tall) image is searched in square windows (two
    portraits side by side are found so), then the image is tried upscaled (the cameraman of
    skimage is found at 2x), then a large one is searched in a grid of smaller tiles (a face a
    tenth of the frame's side, which upscaling does not help: the detector still sees it small).
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
    if not faces and min(h, w) >= 2 * TILE_MIN:
        faces = _in_tiles(image_rgb, max_faces)
        if faces:
            log.info("faces found in tiles", extra={"faces": len(faces)})
    return by_size(faces)


def by_size(faces: list[np.ndarray]) -> list[np.ndarray]:
    """Faces ordered largest first (by the area of their landmarks' bounding box), equal sizes left to right."""
    return sorted(faces, key=lambda f: (-round(float(np.prod(f.max(0) - f.min(0))), 1), float(f[FACE_OVAL, 0].mean())))


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
