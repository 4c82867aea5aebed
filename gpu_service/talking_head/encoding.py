"""Avatar encoding: everything a frame needs, computed once per portrait.

The face is described in a face-aligned frame (u along the eye line, v down the face,
origin at the mouth centre). Each deformation mode (jaw, upper lip, spread, smile, tuck,
blinks, brows) is a precomputed backward displacement field over the face-region crop, so a
frame is a weighted sum of fields and one remap. The fields are built to be exact where it
matters (rigid lip and jaw translation) and to fade smoothly to zero before the face outline
and the crop border, so pixels outside the animated region are never touched.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Optional

import cv2
import numpy as np

from avatar_contracts.media import Background, check_image_header, image_has_alpha
from gpu_service.errors import BadMedia
from gpu_service.talking_head import landmarks as L
from gpu_service.talking_head.controls import SPEECH_OPEN
from gpu_service.talking_head.portrait import decode_rgb

ENCODING_VERSION = 20
"""Bumped whenever the encoding or its npz layout changes (10: transparent portraits composited on a background,
faces outside WORK_FACE_MIN..MAX animated at a working resolution and pasted back; 11: gaze fields and the
eye width; 12: a mouth interior of deeper, redder shadows, teeth no brighter than a dim face allows, the
rounder jaw field and the lips' seam map; 13: a blink's lid keeps the skin's grain and its lash line is
the portrait's own lashes; a 3/4 turn's full widest opening; 14: the lid as light as the skin around the
eye; 15: the face mask swept by the jaw's share of the widest opening, now less than 0.85 of it, see
UPPER_LIP_SHARE; 16: a black-and-white photo's shut lids grey, not flushed pink, see lid_flush; 17: a shut lid
one colour per eye with the skin's grain copied whole, see LID_GRAIN_BOUND; 18: a shut lid lit across the eye
as the skin below it; 19: a reverted teeth bound, whose caches must not load; 20: the interior's edge reaches
over a portrait's parting lips, see EDGE_OVERLAP); older caches are re-encoded."""
MODES = ("jaw", "upper", "spread", "smile", "tuck", "blink_l", "blink_r", "brow", "gaze_x", "gaze_y")
BLINK_SKIN_SHARE = 0.3
"""Share of a blink's lid travel done by warping the skin; the rest is the drawn lid (see shading.shade_eyes)."""
EDGE_OVERLAP = 0.35
"""How far a portrait's drawn interior straddles its lips as they part (FaceGeometry.edge_overlap, in shares of
the interior's edge width). At 0 the edge ramp started just inside both lips, so its middle sat half a ramp
(1.1-1.9 px on the kit's GRID faces) inside each: a 5-9 px conversational opening showed mostly lip colour
smeared inwards and hid the lower teeth. 0.5 centres the ramp on the lips, as a blurred photo's edge is, but
moves the lips' darker inner margin into the first rows of teeth (test_an_opened_closed_mouth_has_no_dark_ring,
p01 wide open: 14.6 grey levels, the bound 13); 0.35 reads at most 12.6 on p01, p05 and p06 and keeps most
of the gain (head amp 0.78/0.88/0.84 -> 0.85/0.89/0.93 on v01-v03 with the teeth changes of that round,
shading.LOWER_SHARE and TEETH_LIT_SHUT; test_a_narrow_opening_shows_its_interior_across_its_height).
Lip-sync's frames keep 0: their lips are the filmed ones, and there (at 0.5) it brought the re-voiced mouth
further from the real one (r 0.75/0.82/0.90 -> 0.67/0.79/0.87)."""
UPPER_LIP_SHARE = 0.3
"""Share of a conversational opening (past the rest gap, at the midline) taken by the upper lip rising; the jaw takes the rest.

Measured on the kit's GRID talkers by `evaluator reenact`'s upper_share (v01-v03, the frames open by
0.05 face heights or more, MediaPipe): at the middle of the mouth 0.42, 0.18 and 0.37 of the opening lies
above the line between the mouth corners. With 0.15 here (and no knee) their self-reenacted heads read
0.31, -0.03 and 0.26 (an opening that was nearly all jaw, a sliver of upper teeth over a dark hole);
with 0.3, 0.41, 0.09 and 0.35.
"""
WIDE_UPPER_SHARE = 0.1
"""The upper lip's share of an opening past conversational width (controls.SPEECH_OPEN): a yawn or a shout
opens with the jaw, and the lip's rise stays short of the upper teeth's height."""
JAW_LAG = 0.2
"""Share of the widest opening below the lips at which the jaw's moving region starts to widen (see encode_from_landmarks)."""
LAT_START = 0.25
"""Where across the mouth (half-widths from its middle) the jaw's drop starts to fall off at the lips."""
MIN_FACE_PX = 40
"""Faces narrower than this have too few pixels for a mouth to be drawn."""
WORK_FACE_MIN = 64
"""A face shorter than this (forehead to chin, pixels) is animated upscaled to it: the drawn mouth gets enough pixels.

The renderer's calibration holds at the kit's smaller faces (skimage's cameraman is 76 px, the astronaut 106 px)."""
WORK_FACE_MAX = 512
"""A face taller than this is animated downscaled to it, then pasted back: its fields stay within ~60 MB and its
render time bounded (a 2000 px selfie face would need 1 GB of fields). Such a face comes out softer."""


def upper_lip_rise(delta, g_max: float, g0: float, lift=0.0):
    """Pixels the upper lip rises (at the midline) for an opening `delta` px past the rest gap `g0` (array; 0 where it closes).

    UPPER_LIP_SHARE of the opening up to conversational width (SPEECH_OPEN of the widest, `g_max`),
    WIDE_UPPER_SHARE past it; `lift` is added to both (a turned face keeps its chin still).
    """
    d = np.maximum(delta, 0.0)
    knee = max(SPEECH_OPEN * g_max - g0, 0.0)
    return (UPPER_LIP_SHARE + lift) * np.minimum(d, knee) + (WIDE_UPPER_SHARE + lift) * np.maximum(d - knee, 0.0)


def smoothstep(e0: float, e1, x):
    """Hermite ramp from 0 at e0 to 1 at e1 (works on arrays and broadcasts)."""
    t = np.clip((x - e0) / np.maximum(np.asarray(e1, np.float32) - e0, 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class Box(NamedTuple):
    """A pixel rectangle [x0, x1) x [y0, y1)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        """x1 - x0."""
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        """y1 - y0."""
        return self.y1 - self.y0

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices that cut this box out of an image."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True)
class FaceGeometry:
    """The measured scalars of a face an encoding was built for (pixels unless noted).

    Every value is held at float32 precision, as it is stored, so a fresh encoding and the same
    encoding read back from the cache render identical frames.
    """

    face_width: float
    """Width of the face oval along the eye line."""
    face_height: float
    """Forehead to chin, down the face."""
    mouth_half_width: float
    """Half the visible mouth's width (the corners' span clipped to the face oval)."""
    rest_gap: float
    """Inner-lip gap of the portrait at rest."""
    max_gap: float
    """Inner-lip gap at mouth_open=1."""
    lower_lip_height: float
    """Height of the lower lip below its inner edge."""
    own_teeth: float
    """Depth of the portrait's own visible teeth strip inside the lips (0 when none is visible)."""
    brow_travel: float
    """Brow lift at brow=1."""
    mouth_x: float
    """Mouth centre x, crop coordinates (origin of the face-aligned frame)."""
    mouth_y: float
    """Mouth centre y, crop coordinates."""
    roll_cos: float
    """Cosine of the face's roll (u runs along the eye line)."""
    roll_sin: float
    """Sine of the face's roll."""
    lut_u0: float
    """u of the first entry of the lip LUTs."""
    lut_step: float
    """u step between LUT entries."""
    mouth_u: float
    """u of the visible mouth's middle."""
    yaw: float
    """Head yaw: 0 frontal .. 1 profile (unitless)."""
    frontal: float
    """Frontalness: 1 frontal .. 0 turned (unitless)."""
    landmark_mouth_half_width: float
    """Half the distance between the landmark mouth corners (may reach past a turned face's outline)."""
    teeth_mid_u: float
    """u of the teeth's midline (the upper lip's middle; off the visible mouth's middle on a turned face)."""
    grain: float
    """The portrait's fine texture around the mouth (grey levels, robust std of its high-pass): the interior gets as much."""
    blur: float
    """The portrait's edge blur around the mouth (Gaussian sigma, pixels): the interior's edges are as soft."""
    dark_floor: float
    """Luminance of the portrait's own darkest (pupils, lashes): no pixel of the interior is darker."""
    eye_width: float = 0.0
    """Mean corner-to-corner width of the eyes along the eye line: the gaze controls are in these units."""
    edge_overlap: float = 0.0
    """How far the drawn interior's edge reaches over the lips as they part, in shares of its width
    (shading.mouth_alpha): EDGE_OVERLAP for a portrait, 0 for lip-sync's filmed frames."""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, float(np.float32(getattr(self, f.name))))


@dataclass
class Encoding:
    """One portrait ready to animate; every array is float32 unless noted."""

    image: np.ndarray
    """(H, W, 3) uint8 RGB portrait."""
    landmarks: np.ndarray
    """(478, 2) pixel coordinates."""
    crop: Box
    """The animated region of the portrait."""
    bases: np.ndarray
    """(K, h, w, 2) backward displacement per unit amount of each mode in MODES, in pixels."""
    head_mask: np.ndarray
    """(h, w) weight of the head's similarity transform (1 on the face, 0 at the crop border)."""
    head_center: np.ndarray
    """(2,) centre of head rotation, crop coordinates."""
    patch: Box
    """The mouth patch, inside the crop."""
    patch_side: np.ndarray
    """(ph, pw) 1 where a pixel belongs to the jaw side of the lip midline, 0 on the upper-lip side."""
    lut_upper: np.ndarray
    """(N,) v of the upper inner lip as a function of u (LUT)."""
    lut_lower: np.ndarray
    """(N,) v of the lower inner lip as a function of u (LUT)."""
    teeth_rgb: np.ndarray
    """(3,) teeth colour in 0..255 (the portrait's own when visible)."""
    palette: np.ndarray
    """(3, 3) mouth-interior colours in 0..255: cavity at the lips, cavity at the back, tongue (from the portrait's lips)."""
    geometry: FaceGeometry
    """The face's measured sizes, its face-aligned frame and the LUTs' sampling."""
    patch_mask: np.ndarray
    """(ph, pw) 1 inside the face (its oval and lips, swept by the jaw), 0 outside, over the mouth patch."""
    eye_patch: Box
    """The patch over both eyes, inside the crop."""
    eye_map: np.ndarray
    """(3, eh, ew) per eye-patch pixel: pixels below the rest upper lid, that column's eye opening, 1 for the image-right eye."""
    eye_skin: np.ndarray
    """(eh, ew, 3) the upper lid's skin (sampled above the lid, with that skin's grain) for each eye-patch pixel."""
    eye_lash: np.ndarray
    """(eh, ew, 3) the portrait's own upper lashes (its rest lid line) for each eye-patch pixel's column."""
    frame: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3), np.uint8))
    """(H, W, 3) uint8 full-resolution portrait when `image` is a working-resolution cut of it; empty when
    `image` is the portrait itself (the face's size was within WORK_FACE_MIN..WORK_FACE_MAX)."""
    region: Box = Box(0, 0, 0, 0)
    """The part of `frame` that `image` shows, resized (full-resolution pixels); empty without a frame."""
    blend: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    """(rh, rw) weight of the animated `image` over `frame` in `region`: 1 inside the crop, feathered to 0 at its border."""
    patch_seam: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    """(ph, pw) each mouth-patch pixel's distance below the seam where the jaw's pixels begin (patch_side is
    where it is positive), clipped to +-1: the pixels within half a pixel of it are drawn from both sides,
    so a pressed or barely parted lip line is smooth rather than a staircase (empty: no anti-aliasing)."""

    @property
    def placed(self) -> bool:
        """Whether this encoding animates a working-resolution cut that is pasted back into `frame`."""
        return self.frame.size > 0

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frames rendered from this encoding: the portrait's own size."""
        h, w = (self.frame if self.placed else self.image).shape[:2]
        return w, h

    @property
    def frame_landmarks(self) -> np.ndarray:
        """(478, 2) landmarks in the full-resolution portrait's pixels."""
        if not self.placed:
            return self.landmarks
        r = self.region
        h, w = self.image.shape[:2]
        scale = np.array([w / r.width, h / r.height], np.float32)
        return (self.landmarks + 0.5) / scale - 0.5 + np.array([r.x0, r.y0], np.float32)

    @property
    def face_box(self) -> tuple[int, int, int, int]:
        """x, y, width, height of the face in the full-resolution portrait."""
        return L.face_box(self.frame_landmarks)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays of this encoding."""
        return int(sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray)))

    def save(self, path: Path) -> None:
        """Write the encoding as an uncompressed npz (fast to reload); boxes and geometry are stored by name."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own: two replicas encoding one new upload at once must not write into one file
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npz")
        arrays: dict[str, np.ndarray] = {"version": np.int32(ENCODING_VERSION)}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Box):
                arrays[f.name] = np.array(value, np.int32)
            elif isinstance(value, FaceGeometry):
                arrays.update({f"geometry.{k}": np.float32(v) for k, v in asdict(value).items()})
            else:
                arrays[f.name] = value
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Optional["Encoding"]:
        """Read an encoding written by save(); None when missing, stale or unreadable."""
        try:
            with np.load(path) as data:
                if int(data["version"]) != ENCODING_VERSION:
                    return None
                values: dict[str, object] = {}
                for f in fields(cls):
                    if f.name == "geometry":
                        values[f.name] = FaceGeometry(**{g.name: float(data[f"geometry.{g.name}"])
                                                         for g in fields(FaceGeometry)})
                    elif f.name in ("crop", "patch", "eye_patch", "region"):
                        values[f.name] = Box(*(int(v) for v in data[f.name]))
                    else:
                        values[f.name] = data[f.name]
                return cls(**values)
        except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile):
            return None


def image_key(raw: bytes, face_index: Optional[int] = None, background: Optional[Background] = None) -> str:
    """Cache key of an uploaded image: its content hash, the face chosen in it (none said: the largest, face 0),
    the background it is composited on when it can be transparent (None: the default) and the encoding version.

    The background is part of what is encoded, so two backgrounds are two encodings; an opaque image
    ignores it and keeps one key whatever background is asked for.
    """
    digest = hashlib.sha256(raw)
    if image_has_alpha(raw):
        digest.update(b"\0background:" + (background or default_background()).key.encode())
    face = "" if not face_index else f"-f{face_index}"
    return f"{digest.hexdigest()[:40]}{face}-v{ENCODING_VERSION}"


def default_background() -> Background:
    """The background of a transparent portrait whose request names none (avatar_contracts' DEFAULT_BACKGROUND)."""
    from avatar_contracts.media import DEFAULT_BACKGROUND, parse_background

    return parse_background(DEFAULT_BACKGROUND, 1, 1)


def check_image(raw: bytes, max_bytes: int, max_pixels: int, field: str = "image") -> tuple[int, int]:
    """(width, height) of JPEG/PNG/WebP bytes from the header alone, or BadMedia: empty, too many bytes,
    too many pixels (a decompression bomb is refused before anything decodes it) or a side out of bounds."""
    if not raw:
        raise BadMedia(f"{field} is empty")
    if len(raw) > max_bytes:
        raise BadMedia(f"{field} is {len(raw)} bytes; the limit is {max_bytes} bytes")
    w, h, _ = check_image_header(raw, max_pixels, field)
    _check_sides(w, h, field)
    return w, h


def _check_sides(w: int, h: int, field: str) -> None:
    if min(h, w) < 64 or max(h, w) > 4096:
        raise BadMedia(f"{field} is {w}x{h}; each side must be between 64 and 4096 pixels")


def decode_image(raw: bytes, max_bytes: int, field: str = "image", max_pixels: int = 40_000_000,
                 background: Optional[Background] = None) -> np.ndarray:
    """JPEG/PNG/WebP bytes to an RGB uint8 array (checked by check_image first), or BadMedia saying what is wrong.

    A transparent PNG or WebP is composited on `background` (None: the default colour); see portrait.py.
    """
    check_image(raw, max_bytes, max_pixels, field)
    arr = decode_rgb(raw, field, background or default_background(), max_bytes, max_pixels)
    if arr is None:
        raise BadMedia(f"{field} could not be decoded: its image data is damaged or cut short")
    h, w = arr.shape[:2]
    _check_sides(w, h, field)
    # Output video is yuv420p, which needs even sides.
    return np.ascontiguousarray(arr[: h - h % 2, : w - w % 2])


def choose_face(faces: list[np.ndarray], face_index: Optional[int], where: str = "the image") -> np.ndarray:
    """The `face_index`-th of `faces` by size, largest first (None: 0, the largest); BadMedia saying how many
    faces there are when there is none or the index is past the last."""
    if not faces:
        raise BadMedia(f"no face found in {where}; use a frontal, well-lit portrait")
    index = face_index or 0
    if index >= len(faces):
        found = "1 face was" if len(faces) == 1 else f"{len(faces)} faces were"
        raise BadMedia(f"face_index={index} but {found} found in {where}; face_index counts from 0, the largest face, "
                       f"by size (0 to {len(faces) - 1})")
    return L.by_size(faces)[index]


def find_landmarks(image: np.ndarray, face_index: Optional[int] = None) -> np.ndarray:
    """The face of a portrait: the `face_index`-th by size, largest first (None: the largest); see choose_face."""
    return choose_face(L.detect_faces(image), face_index)


def _pixel_grid(x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) float32 pixel coordinates of the box [x0, x1) x [y0, y1), as np.mgrid gives them."""
    xs = np.arange(x0, x1, dtype=np.float32)
    ys = np.arange(y0, y1, dtype=np.float32)
    return np.repeat(ys[:, None], len(xs), 1), np.repeat(xs[None, :], len(ys), 0)


def _curve(points: np.ndarray, lo: float, hi: float, step: float) -> np.ndarray:
    """v(u) through points sorted by u, flat beyond the ends, sampled on [lo, hi)."""
    order = np.argsort(points[:, 0])
    us = np.arange(lo, hi, step, dtype=np.float32)
    return np.interp(us, points[order, 0], points[order, 1]).astype(np.float32)


def _polygon_mask(shape: tuple[int, int], pts: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Boolean mask of a closed polygon given in (x, y) pixel coordinates, shifted by `offset` pixels after rounding."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1, offset=tuple(int(v) for v in offset))
    return mask.astype(bool)


def hull_distance(hull: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance of points from a convex polygon (positive outside): the largest over its edge lines.

    Exact inside and along edges, a slight underestimate beside vertices; smooth, unlike a
    distance transform of a rasterised mask.
    """
    a = hull.astype(np.float32)
    b = np.roll(a, -1, axis=0)
    n = np.stack([b[:, 1] - a[:, 1], a[:, 0] - b[:, 0]], 1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-6)
    if float(((a.mean(0) - a) * n).sum(1).mean()) > 0:  # make the normals point outwards
        n = -n
    c = (n * a).sum(1)
    out = np.full(xs.shape, -np.inf, np.float32)
    for k in range(len(a)):
        np.maximum(out, xs * n[k, 0] + ys * n[k, 1] - c[k], out=out)
    return out


def face_mask(xs: np.ndarray, ys: np.ndarray, lm: np.ndarray, sweep: np.ndarray, feather: float) -> np.ndarray:
    """1 inside the face oval's hull swept by `sweep` pixels, falling smoothly to 0 at `feather` pixels outside it.

    `xs`, `ys` are a pixel grid (as _pixel_grid makes). Only the band along the hull's outline is
    computed pixel by pixel: the distance is convex, so a block whose corners are all inside is
    inside everywhere (1), and it changes by at most a pixel per pixel, so a block whose middle is
    far enough outside is 0 everywhere. The values are the ones the whole grid would get.
    """
    hull = L.face_hull(lm)
    swept = cv2.convexHull(np.concatenate([hull, hull + sweep[None, :]]).astype(np.float32))[:, 0]

    def mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (1.0 - smoothstep(0.0, feather, hull_distance(swept, x, y))).astype(np.float32)

    h, w = xs.shape
    B = 8
    if h < 2 * B or w < 2 * B:
        return mask(xs, ys)
    rows, cols = np.arange(0, h, B), np.arange(0, w, B)
    r1, c1 = np.minimum(rows + B - 1, h - 1), np.minimum(cols + B - 1, w - 1)
    # Distances at every block's corners (the grid's pixels at those rows and columns) and middle.
    corner_r, corner_c = np.unique(np.concatenate([rows, r1])), np.unique(np.concatenate([cols, c1]))
    at = hull_distance(swept, xs[np.ix_(corner_r, corner_c)], ys[np.ix_(corner_r, corner_c)])
    ri, ci = np.searchsorted(corner_r, rows), np.searchsorted(corner_c, cols)
    ri1, ci1 = np.searchsorted(corner_r, r1), np.searchsorted(corner_c, c1)
    worst = np.maximum(np.maximum(at[np.ix_(ri, ci)], at[np.ix_(ri, ci1)]),
                       np.maximum(at[np.ix_(ri1, ci)], at[np.ix_(ri1, ci1)]))
    mid_x = (xs[0, cols] + xs[0, c1]) / 2
    mid_y = (ys[rows, 0] + ys[r1, 0]) / 2
    middle = hull_distance(swept, np.repeat(mid_x[None, :], len(rows), 0), np.repeat(mid_y[:, None], len(cols), 1))
    # 1: all inside, 0: all outside (the farthest pixel of a block is under B from its middle), 2: compute.
    state = np.where(worst < -0.5, 1, np.where(middle > feather + B + 0.5, 0, 2)).astype(np.uint8)
    state = np.repeat(np.repeat(state, B, 0), B, 1)[:h, :w]
    out = (state == 1).astype(np.float32)
    todo = state == 2
    out[todo] = mask(xs[todo], ys[todo])
    return out


def _eye_layers(crop: np.ndarray, lm: np.ndarray, eye_t: np.ndarray, eye_g: np.ndarray, which: np.ndarray,
                e_v: np.ndarray) -> tuple[Box, np.ndarray, np.ndarray, np.ndarray]:
    """The eye patch, its per-pixel lid geometry, and the lid skin and lash colours a blink draws (crop coordinates).

    The lid skin of a column blends the blurred samples 0.4-1.2 eye openings above its upper lid that
    are most like the face's skin (clear of the lashes, the crease, the brow and glasses), with the fine
    texture of the skin one eye opening above added back: a flat, grainless lid read as a sticker on a
    photo's skin or a painting's craquelure. The lash colour is the darkest of the portrait's own pixels along the rest
    lid line, so a closed eye's lash line is as dark and as soft as this picture's lashes (a fixed
    near-black line was crisp on a blurred photo and on a painting).
    """
    h, w = eye_t.shape
    pts = lm[L.EYE_LEFT_UPPER + L.EYE_LEFT_LOWER + L.EYE_RIGHT_UPPER + L.EYE_RIGHT_LOWER]
    g_max = max(1.0, float(eye_g.max()))
    pad = 2.0 + 0.6 * g_max
    ex0, ey0 = np.floor(pts.min(0) - pad).astype(int)
    ex1, ey1 = np.ceil(pts.max(0) + pad).astype(int)
    ex0, ey0, ex1, ey1 = max(ex0, 0), max(ey0, 0), min(ex1, w), min(ey1, h)
    t = eye_t[ey0:ey1, ex0:ex1]
    g = eye_g[ey0:ey1, ex0:ex1]
    eye_map = np.ascontiguousarray(np.stack([t, g, which[ey0:ey1, ex0:ex1]]), dtype=np.float32)
    sharp = crop.astype(np.float32)
    blurred = cv2.GaussianBlur(sharp, (0, 0), max(0.7, 0.2 * g_max))
    ys, xs = np.mgrid[ey0:ey1, ex0:ex1].astype(np.float32)

    def above(lift: np.ndarray, image: np.ndarray) -> np.ndarray:
        """`image` sampled `lift` pixels up from each patch pixel, along -e_v."""
        mx = (xs - lift * e_v[0]).astype(np.float32)
        my = (ys - lift * e_v[1]).astype(np.float32)
        return cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    lifts = [t + k * g_max + 1.0 for k in (0.4, 0.6, 0.8, 1.0, 1.2)]  # distances back up to the sample points
    samples = np.stack([above(lift, blurred) for lift in lifts])
    # The samples most like the face's skin, blended softly: the lid skin, not a lash, a crease, a brow
    # or a spectacle rim (a median of three took the rim's brown-black on p05's glasses).
    _, face_pix = _lips_and_skin(crop, lm)
    face = _median_colour(face_pix) if len(face_pix) else np.median(samples.reshape(-1, 3), axis=0)
    far = np.linalg.norm(samples - face, axis=-1)
    near = np.exp(-0.5 * ((far - far.min(axis=0)) / 12.0) ** 2)
    skin = (samples * near[..., None]).sum(axis=0) / near.sum(axis=0)[..., None]
    skin = _lit_like_the_ring(skin, blurred[ey0:ey1, ex0:ex1], t, g, eye_map[2], g_max)
    # One colour per eye, its lid's mean: the samples of each column carried the socket's crease and shade
    # into the lid as dark bands, where v03's shut lids are even (rows 92-102 and 104-109 from top to lashes).
    lid = _lid_bands(t, g, g_max)[0]
    for eye in (0.0, 1.0):
        mine = eye_map[2] == eye
        if (lid & mine).sum() >= 4:
            skin[mine] = skin[lid & mine].mean(axis=0)
    skin = _lit_across(skin, blurred[ey0:ey1, ex0:ex1], t, g, eye_map[2], g_max)
    # Its grain: the fine detail of the skin one eye opening above, moved down whole (the samples above
    # are one point per column, whose detail would streak) by whole pixels, so it is copied, not
    # interpolated (a fractional shift halved it), and bounded so a hair or a crease stays faint.
    step_x, step_y = (int(round(-(g_max + 2.0) * float(c))) for c in e_v)
    detail = (sharp - blurred)[np.clip(ys + step_y, 0, h - 1).astype(np.int64), np.clip(xs + step_x, 0, w - 1).astype(np.int64)]
    bound = LID_GRAIN_BOUND * float(np.median(np.abs(detail))) + 1.0
    skin = np.clip(skin + np.clip(detail, -bound, bound), 0.0, 255.0)
    # The lashes: the darkest of the rest lid line and the pixel on either side of it.
    line = np.stack([above(t + k, sharp) for k in (-1.0, 0.0, 1.0)])
    lash = np.take_along_axis(line, np.argmin(line @ LUMA, axis=0)[None, ..., None], axis=0)[0]
    # At least as dark as a shut lid's lashes against its skin: a faint lid line (a small, soft face)
    # would leave the closed eye's lower rim showing as a light crescent under it.
    lash = np.minimum(lash, 0.6 * skin)
    return (Box(int(ex0), int(ey0), int(ex1), int(ey1)), eye_map, np.ascontiguousarray(skin, dtype=np.float32),
            np.ascontiguousarray(lash, dtype=np.float32))


LUMA = np.array([0.299, 0.587, 0.114], np.float32)
"""RGB weights of luminance (Rec. 601)."""
LID_GRAIN_BOUND = 3.0
"""The shut lid's grain is clipped at this many times its median magnitude (plus one level). With the grain
interpolated and clipped at 2, the kit's drawn lids had 0.37-0.68 of the fine texture (high-pass at 1.5 px) of
the skin above their eyes, a smooth sticker on a grainy photo (p02); copied and clipped at 3, 0.53-0.88."""
LID_FLUSH = np.array([1.03, 0.985, 0.995], np.float32)
"""A shut lid's thin skin is redder than the skin around the eye (v03's talker: a* +4.6 in OpenCV's Lab)."""


def _lid_bands(t: np.ndarray, g: np.ndarray, g_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the lid, the skin a quarter to 0.6 of an eye opening above it, the skin from a quarter of one below the
    lower lid) over the eye patch, from its lid geometry (t below the rest lid line, g the column's opening)."""
    eye = g > 0.0
    return (eye & (t >= 0.0) & (t <= g), eye & (t < -0.25 * g_max) & (t > -0.6 * g_max - 2.0),
            eye & (t > g + 0.25 * g_max))


def _lit_like_the_ring(skin: np.ndarray, blurred: np.ndarray, t: np.ndarray, g: np.ndarray, which: np.ndarray,
                       g_max: float) -> np.ndarray:
    """The lid skin coloured as the skin around its eye, and a little redder (LID_FLUSH).

    A shut upper lid faces the light as the skin around the eye does. On v03, the kit's GRID talker
    who blinks (frames 27-29, 43-46), the shut lid inside the open eye's outline reads L* 109.7 (OpenCV's
    8-bit Lab) where the 3 px ring around the eye reads 108.3; the skin above the eye that the lid is
    sampled from lies in the socket's shadow, and the drawn lid read 92.2, a dark patch. Each eye's
    lid takes, channel by channel, the median colour of the skin a quarter to 0.6 of an eye opening
    above and below it (a gain on its samples: their texture stays; scaling lightness alone turned a
    painting's brown socket shade into a saturated orange lid).
    """
    lid, above, below = _lid_bands(t, g, g_max)
    ring = above | below
    out = skin.copy()
    for eye in (0.0, 1.0):
        mine = which == eye
        around, own = blurred[ring & mine], skin[lid & mine]
        if len(around) >= 8 and len(own) >= 4:
            gain = np.clip(_median_colour(around) / np.maximum(own.mean(axis=0), 1.0), 0.8, 1.4)
            out[mine] *= gain.astype(np.float32)
    return np.clip(out * lid_flush(blurred[ring]), 0.0, 255.0)


LID_ACROSS = 0.85
"""How far a shut lid follows, column by column, the light on the skin under its eye (an exponent on the ratio:
1 in proportion, 0 one colour per lid). v03's lids vary 1.7 and 1.2 times as much as the skin under them, so any
value up to 1 errs flat; at 1 the astronaut's shut eyes, their inner corners darkened like her skin by the nose,
read 0.51 of their opening to MediaPipe (test_blink_closes_the_eyes holds them under 0.5)."""


def _lit_across(skin: np.ndarray, blurred: np.ndarray, t: np.ndarray, g: np.ndarray, which: np.ndarray,
                g_max: float) -> np.ndarray:
    """The lid skin brightened and darkened across the eye as the skin under it is lit, column by column.

    A shut lid is lit as the face around it is: on v03, the kit's GRID talker who blinks (frame 44),
    his shut lids run from 135-139 at the outer corners to 67-75 by the nose (8-bit luma, half way
    down the lid), and that profile follows the skin 0.3-0.8 openings under the open eye column by
    column (r 0.93 and 0.89). One colour per eye drew them flat at 98-107 from corner to corner, a pale
    almond on a side-lit face (p04, p07): across his lids at 0.3, 0.5 and 0.7 of the way down, the drawn
    ones correlated with his by 0.17-0.88 and missed by 19.5 levels on average; now 0.90-0.98 and 15.6
    (most of what is left is the whole lid 7-20 levels darker than his; his frame 44 is also a little
    brighter than the open frame 20 drawn from).
    The ratio is the luminance per column of the skin under the eye (from a quarter of its opening below
    the lower lid to the patch's edge; above the eye the crease and the lashes are darkest at the middle
    and bent the lid with them), smoothed across the eye, over its mean along the lid, to the power
    LID_ACROSS, clipped to 0.6-1.4.
    """
    lid, _, below = _lid_bands(t, g, g_max)
    lum = blurred @ LUMA
    out = skin.copy()
    cols = np.arange(skin.shape[1])
    for eye in (0.0, 1.0):
        mine = which == eye
        on_below, on_lid = below & mine, lid & mine
        lid_cols = np.flatnonzero(on_lid.any(axis=0))
        have = np.flatnonzero(on_below.sum(axis=0) >= 2)
        if len(lid_cols) < 3 or len(have) < 3:
            continue
        prof = np.array([np.median(lum[on_below[:, c], c]) for c in have], np.float32)
        across = np.interp(cols, have, prof).astype(np.float32)
        across = cv2.GaussianBlur(across[None, :], (0, 0), max(1.0, 0.12 * len(lid_cols)), borderType=cv2.BORDER_REPLICATE)[0]
        ratio = across / max(float(np.mean(across[lid_cols])), 1.0)
        ratio = np.clip(ratio ** LID_ACROSS, 0.6, 1.4)
        out[mine] *= np.broadcast_to(ratio, mine.shape)[mine][:, None]
    return np.clip(out, 0.0, 255.0)


def lid_flush(around: np.ndarray) -> np.ndarray:
    """LID_FLUSH as strong as the skin around the eyes is colourful: none on a black-and-white photo (whose
    lids were drawn pink), all of it once the skin's channels differ by FLUSH_CHROMA or more."""
    if len(around) == 0:
        return np.ones(3, np.float32)
    colour = _median_colour(np.asarray(around, np.float32).reshape(-1, 3))
    share = float(np.clip((colour.max() - colour.min()) / FLUSH_CHROMA, 0.0, 1.0))
    return (1.0 + share * (LID_FLUSH - 1.0)).astype(np.float32)


FLUSH_CHROMA = 20.0
"""The skin colourfulness (largest channel minus smallest, 8-bit) from which a shut lid gets all of LID_FLUSH."""


def dark_floor(image: np.ndarray, lm: np.ndarray) -> float:
    """The portrait's own black: the 1st-percentile luminance of the box over its eyes and brows (pupils, lashes, brows).

    A video frame's black level is often lifted (GRID's is about 45): an interior darker than
    the darkest the face shows reads as a hole cut out of the picture.
    """
    pts = lm[L.EYE_LEFT_UPPER + L.EYE_RIGHT_UPPER + L.EYE_LEFT_LOWER + L.EYE_RIGHT_LOWER + L.BROW_LEFT + L.BROW_RIGHT]
    x0, y0 = np.maximum(np.floor(pts.min(0)).astype(int), 0)
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
    box = image[y0:y1, x0:x1].reshape(-1, 3).astype(np.float32)
    return float(np.percentile(box @ LUMA, 1)) if len(box) >= 16 else 0.0


def _box_around(image: np.ndarray, pts: np.ndarray, pad: int = 2) -> tuple[np.ndarray, tuple[int, int]]:
    """The part of `image` around points `pts` (x, y), `pad` pixels wider (contiguous), and the offset that maps
    image coordinates into it (for _polygon_mask): polygons of those points drawn in it cover the same pixels
    as over the whole image, for a fraction of the work on a large video frame."""
    x0, y0 = np.maximum(np.floor(pts.min(0)).astype(int) - pad, 0)
    x1, y1 = np.minimum(np.ceil(pts.max(0)).astype(int) + pad + 1, image.shape[1::-1])
    return np.ascontiguousarray(image[y0:y1, x0:x1]), (-int(x0), -int(y0))


def _median_colour(pix: np.ndarray) -> np.ndarray:
    """Per-channel median of (N, 3) pixels (channel by channel over contiguous rows: the same values, faster)."""
    return np.median(np.ascontiguousarray(pix.T), 1)


def _lip_pixels(image: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(N, 3) float32 pixels of the lips: inside the outer contour, outside the (dilated) inner one."""
    outer_pts, inner_pts = lm[L.OUTER_UPPER + L.OUTER_LOWER[::-1]], lm[L.INNER_UPPER + L.INNER_LOWER[::-1]]
    box, off = _box_around(image, np.concatenate([outer_pts, inner_pts]))
    outer = _polygon_mask(box.shape[:2], outer_pts, off)
    inner = _polygon_mask(box.shape[:2], inner_pts, off)
    inner = cv2.dilate(inner.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return box[outer & ~inner].astype(np.float32)


def lip_colour(image: np.ndarray, lm: np.ndarray) -> Optional[np.ndarray]:
    """The lips' median colour in `image` (landmarks `lm` in its pixels), or None when too few lip pixels show.

    Cheap (the lips only): lip-sync measures it on every frame, where the rest of the appearance is reused,
    since it decides whether the frame's own teeth show (a wide-open mouth's lips change colour quickly).
    """
    pix = _lip_pixels(image, lm)
    return _median_colour(pix) if len(pix) >= 8 else None


def _lips_and_skin(crop: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the lips' median colour, the face's pixels) of a crop with its landmarks."""
    hull = cv2.convexHull(lm[L.FACE_OVAL].astype(np.float32))[:, 0]
    box, off = _box_around(crop, hull)
    skin_pix = box[_polygon_mask(box.shape[:2], hull, off)].astype(np.float32)
    lip = lip_colour(crop, lm)
    # Too few lip pixels (a tiny or profile face): the skin, slightly darker, stands in for the lips.
    if lip is not None:
        return lip, skin_pix
    return 0.85 * (_median_colour(skin_pix) if len(skin_pix) else np.full(3, 160.0, np.float32)), skin_pix


def interior_palette(crop: np.ndarray, lm: np.ndarray, grain: float = 0.0,
                     lips_and_skin: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Mouth-interior colours (cavity at the lips, throat, tongue), drawn-teeth colour and dark floor, from the portrait.

    The cavity, throat and tongue are copies of the portrait's own lip colour at levels between
    its own black (dark_floor) and its lips, so the interior has the photo's hue and
    colourfulness: a grey photo gets a grey mouth, a warm one a warm one. The throat sits above
    the floor by enough that its `grain` (interior_texture) does not pile up there. The teeth are
    an off-white as bright as the face's lit highlights, with the colour cast of the eye whites
    (the white balance) or, when the eyes show none, of the skin. `lm` are the landmarks in
    `crop`'s pixel coordinates; `lips_and_skin` is `_lips_and_skin(crop, lm)` when the caller has it.
    """
    lip, skin_pix = _lips_and_skin(crop, lm) if lips_and_skin is None else lips_and_skin
    skin = _median_colour(skin_pix) if len(skin_pix) else np.full(3, 160.0, np.float32)
    eye_l, eye_r = lm[L.EYE_LEFT_UPPER + L.EYE_LEFT_LOWER[::-1]], lm[L.EYE_RIGHT_UPPER + L.EYE_RIGHT_LOWER[::-1]]
    box, off = _box_around(crop, np.concatenate([eye_l, eye_r]))
    eye_pix = box[_polygon_mask(box.shape[:2], eye_l, off) | _polygon_mask(box.shape[:2], eye_r, off)].astype(np.float32)
    skin_lum = skin_pix @ LUMA if len(skin_pix) else np.array([160.0], np.float32)
    floor = dark_floor(crop, lm)

    def tinted(base: np.ndarray, level: float, gain: float) -> np.ndarray:
        """`base`'s hue at luminance `level`, its tint (the deviation from grey) raised by `gain`; grey stays grey."""
        c = base * (level / max(float(base @ LUMA), 1.0))
        return np.clip(c.mean() + gain * (c - c.mean()), 0, 255)

    lip_l = float(lip @ LUMA)
    # Shadowed flesh reads richer than lit lips: the cavity, throat and tongue are copies of the lips
    # with a stronger tint, at levels between the portrait's own black and its lips (a lifted black
    # lifts them all, so the throat stays darker than the lips even where the black is grey).
    span = max(lip_l - floor, 10.0)
    cavity = tinted(lip, floor + 0.38 * span, 1.45)
    throat = tinted(lip, floor + max(0.04 * span, 3.0 + 1.2 * grain), 1.15)
    tongue = tinted(lip, floor + 0.85 * span, 1.35)
    palette = np.stack([cavity, throat, tongue]).astype(np.float32)
    # Drawn teeth: as bright as the face's lit highlights (teeth catch the light the face does; the eye
    # whites sit in the brows' shadow, so only their colour is used: the portrait's white balance, when
    # the eyes show whites at all, else the skin's hue, mostly washed out).
    white = _whitest(eye_pix, 0.2) if len(eye_pix) >= 12 else None
    # On a dim face (a dark room, darker skin lit softly) no brighter than 1.6x the skin's median: a
    # paper-white strip in a dim face reads as pasted on.
    level = float(np.clip(0.95 * np.percentile(skin_lum, 99.5), 1.1 * lip_l,
                          min(238.0, max(1.6 * float(np.median(skin_lum)), 1.1 * lip_l))))
    if white is not None and _chroma(white) < 0.3:
        cast = white
    else:
        cast = skin.mean() + 0.25 * (skin - skin.mean())
    # Teeth are yellower than eye whites (and never pink): a shift towards yellow as strong as the
    # skin is colourful, so a grey portrait stays grey.
    cast = cast * (level / max(float(cast @ LUMA), 1.0))
    tint = cast - level + float(skin.max() - skin.min()) * np.array([0.08, 0.04, -0.14], np.float32)
    teeth = np.clip(level + tint, 0, 255).astype(np.float32)
    return palette, teeth, floor


def _chroma(rgb: np.ndarray) -> float:
    """Colourfulness of one colour: (max - min) over its luminance."""
    return float((rgb.max() - rgb.min()) / max(float(rgb @ LUMA), 1.0))


def _whitest(pix: np.ndarray, share: float) -> Optional[np.ndarray]:
    """Median colour of the `share` of pixels that are brightest and least coloured, or None when there are none."""
    if len(pix) == 0:
        return None
    lum = pix @ LUMA
    score = lum - 1.5 * (pix.max(1) - pix.min(1))
    cut = np.percentile(score, 100.0 * (1.0 - share))
    top = pix[score >= cut]
    # Not the very brightest (a catchlight, a clipped highlight).
    top = top[(top @ LUMA) <= np.percentile(top @ LUMA, 95)] if len(top) >= 20 else top
    return np.median(top, 0).astype(np.float32) if len(top) else None


def _gradient(lum: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(lum, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lum, cv2.CV_32F, 0, 1, ksize=3)
    return np.hypot(gx, gy) / 8.0


def interior_texture(crop: np.ndarray, lm: np.ndarray) -> tuple[float, float]:
    """(grain, blur) of the portrait around the mouth: what the drawn interior must carry to look of a piece.

    Grain is the robust std (1.4826 MAD) of the luminance minus its Gaussian blur at 1 px, over the
    skin around the lips away from strong edges: sensor noise and pores in a photo, craquelure and
    brushwork in a painting. Blur is the Gaussian sigma of the strong edges there (lip outline,
    shadows), measured by how much a known re-blur lowers their gradient (the re-blur estimator;
    calibrated so a sharp step reads 0). `lm` are the landmarks in `crop`'s pixel coordinates.
    """
    pts = lm[L.OUTER_UPPER + L.OUTER_LOWER]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    w = max(float(x1 - x0), 4.0)
    h_img, w_img = crop.shape[:2]
    bx0, by0 = int(max(0, x0 - 0.35 * w)), int(max(0, y0 - 0.35 * w))
    bx1, by1 = int(min(w_img, x1 + 0.35 * w)), int(min(h_img, y1 + 0.5 * w))
    lum = crop[by0:by1, bx0:bx1].astype(np.float32) @ LUMA
    if min(lum.shape) < 8:
        return 2.0, 0.5
    # Blur: the fine texture is smoothed away first (sigma 0.7) so it is the forms' edges that are measured.
    pre, s0 = 0.7, 1.5
    soft = cv2.GaussianBlur(lum, (0, 0), pre)
    g0 = _gradient(soft)
    g1 = _gradient(cv2.GaussianBlur(soft, (0, 0), s0))
    strong = g0 >= np.percentile(g0, 90)
    r = float(g0[strong].sum() / max(float(g1[strong].sum()), 1e-6))
    est = s0 / np.sqrt(max(r * r - 1.0, 1e-3))
    # 0.68: what a perfect step sampled on pixels reads (Sobel's own smoothing), with the pre-smoothing.
    blur = float(np.clip(np.sqrt(max(est * est - 0.68 - pre * pre, 0.0)), 0.0, 4.0))
    lips = _polygon_mask(crop.shape[:2], pts)[by0:by1, bx0:bx1]
    lips = cv2.dilate(lips.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    g = _gradient(lum)
    keep = ~lips & (g < np.percentile(g, 80))
    res = (lum - cv2.GaussianBlur(lum, (0, 0), 1.0))[keep]
    grain = float(1.4826 * np.median(np.abs(res - np.median(res)))) if res.size >= 16 else 2.0
    return float(np.clip(grain, 0.0, 12.0)), blur


class Appearance(NamedTuple):
    """What a drawn mouth interior takes from the picture around the face (see measure_appearance)."""

    lip: np.ndarray
    """(3,) the lips' median colour."""
    grain: float
    """Fine texture around the mouth (interior_texture)."""
    blur: float
    """Edge blur around the mouth (interior_texture)."""
    palette: np.ndarray
    """(3, 3) cavity, throat and tongue colours (interior_palette)."""
    teeth: np.ndarray
    """(3,) drawn-teeth colour (interior_palette)."""
    dark_floor: float
    """The picture's own black (dark_floor)."""


def measure_appearance(image: np.ndarray, lm: np.ndarray) -> Appearance:
    """The interior's colours and texture, measured on `image` around the face whose landmarks `lm` are in its pixels.

    Only the face and the boxes around its eyes and mouth are read, so a whole video frame and an
    encoding's crop of it give the same figures. Lip-sync measures them on one frame and reuses
    them for the next few (a person's colouring and the picture's grain change slowly; the
    face's fields, rebuilt every frame, do not).
    """
    lip, skin = _lips_and_skin(image, lm)
    grain, blur = interior_texture(image, lm)
    palette, teeth, floor = interior_palette(image, lm, grain, (lip, skin))
    return Appearance(lip=lip, grain=grain, blur=blur, palette=palette, teeth=teeth, dark_floor=floor)


MOUTH_MODES = ("jaw", "upper", "spread", "tuck")
"""The modes a `mouth_only` encoding builds; the others stay zero."""


def encode_from_landmarks(image: np.ndarray, lm: np.ndarray, seam: float = 0.5, follow_gap: bool = False, *,
                          mouth_only: bool = False, appearance: Optional[Appearance] = None,
                          edge_overlap: Optional[float] = None) -> Encoding:
    """Build the encoding of `image` for face landmarks `lm` (478x2), e.g. for one video frame.

    `seam` is where the jaw's pixels begin, as a fraction of the inner-lip gap down from the upper
    lip (0.5: the midline). Closing a gap, the lips meet exactly at the seam only when the upper
    lip's share of the closing (`mode_weights(close_upper=...)`) equals it. `follow_gap` (for a
    video frame whose mouth may be wide open) makes the lips' lateral fall-off at least this
    frame's own inner-lip gap profile, so closing shuts every column, not just the middle.
    `mouth_only` (for re-voicing, where eyes, brows and smile stay as filmed) builds only
    MOUTH_MODES, over the part of the crop they can reach, and crops the encoding to that window
    (nothing outside it moves); their fields equal the full encoding's there. The smile, blink
    and brow fields are zero, so is the head mask (the head moves as filmed), and the eye patch is
    an empty 1x1, so blinks draw no lid on such an encoding. `appearance` (measure_appearance of
    this or a recent frame) is used instead of measuring the interior's colours and texture again.
    `edge_overlap` is FaceGeometry.edge_overlap (EDGE_OVERLAP unless given; lip-sync gives 0).
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    lm = np.asarray(lm, np.float32)
    H, W = image.shape[:2]
    bx, by, bw, bh = L.face_box(lm)
    if bw < MIN_FACE_PX:
        raise BadMedia(f"the face is too small to animate ({bw} px wide; at least {MIN_FACE_PX} px needed)")

    # Face-aligned frame: u along the eye line, v downwards; origin at the mouth centre.
    eye_l, eye_r = L.eye_centres(lm)
    axis = eye_r - eye_l
    roll = float(np.arctan2(axis[1], axis[0]))
    cs, sn = np.cos(roll), np.sin(roll)
    mouth = (lm[L.INNER_UPPER].mean(0) + lm[L.INNER_LOWER].mean(0)) / 2

    def to_uv(p: np.ndarray) -> np.ndarray:
        d = p - mouth
        return np.stack([d[..., 0] * cs + d[..., 1] * sn, -d[..., 0] * sn + d[..., 1] * cs], -1)

    uv = to_uv(lm)
    oval = uv[L.FACE_OVAL]
    fw = float(oval[:, 0].max() - oval[:, 0].min())
    fh = float(uv[L.CHIN, 1] - uv[L.FOREHEAD, 1])
    hw_lm = float(abs(uv[L.MOUTH_RIGHT, 0] - uv[L.MOUTH_LEFT, 0]) / 2)
    # The visible mouth: the corners' span clipped to the face oval. On a turned face MediaPipe puts
    # the far corner out in the background; the oval's far side follows the silhouette instead.
    # Everything lateral (jaw profile, corners, interior) is centred on this span, so a profile's
    # opening tapers to nothing at the silhouette instead of ending in a wall.
    hull_uv = L.face_hull(uv)
    us = np.arange(float(uv[L.MOUTH_LEFT, 0]), float(uv[L.MOUTH_RIGHT, 0]) + 0.25, 0.25, dtype=np.float32)
    seen = us[hull_distance(hull_uv, us, np.zeros_like(us)) < -1.0]
    c_left, c_right = (float(seen.min()), float(seen.max())) if len(seen) >= 8 else (-1.0, 1.0)
    u_mid = (c_left + c_right) / 2
    hw_m = max(1.5, (c_right - c_left) / 2)
    # Yaw from how far the nose tip sits from the middle of the face oval: 0 frontal, 1 profile.
    yaw = float(np.clip(abs(uv[L.NOSE_TIP, 0] - (oval[:, 0].max() + oval[:, 0].min()) / 2) / max(fw / 2, 1.0), 0.0, 1.0))
    frontal = float(1.0 - smoothstep(0.3, 0.7, yaw))
    v_chin = float(uv[L.CHIN, 1])

    g0 = float(max(0.0, np.mean(uv[L.INNER_LOWER_MID, 1]) - np.mean(uv[L.INNER_UPPER_MID, 1])))
    v_uo = float(uv[L.OUTER_UPPER, 1].min())
    v_lo = float(uv[L.OUTER_LOWER, 1].max())
    v_li0 = float(np.mean(uv[L.INNER_LOWER_MID, 1]))
    lip_lo_h = max(2.0, v_lo - v_li0)
    # The widest opening shrinks as the face turns towards profile and is bounded by the visible mouth
    # width, so a profile opens a little rather than swinging a jaw the photo cannot show. A 3/4 view
    # shows a jaw drop in full: the shrinking starts past yaw 0.4 (it started at 0.15, and p08's 3/4
    # turn opened for speech no wider than her parted lips at rest).
    g_max = 0.22 * fh * (1.0 - 0.6 * float(smoothstep(0.4, 0.95, yaw)))
    g_max = max(min(g_max, 2.8 * hw_m), 1.25 * g0, 2.0)

    # The crop holds the head mask and the jaw's fade below the chin.
    center = lm[L.FACE_OVAL].mean(0)
    x0 = int(max(0, np.floor(center[0] - 0.9 * fw)))
    x1 = int(min(W, np.ceil(center[0] + 0.9 * fw)))
    y0 = int(max(0, np.floor(center[1] - 0.95 * fh)))
    y1 = int(min(H, np.ceil(center[1] + 0.95 * fh)))
    h, w = y1 - y0, x1 - x0
    off = np.array([x0, y0], np.float32)
    mouth_c = mouth - off

    # The LUTs span the whole crop whatever part of it the fields are built over (U is linear: its extremes are corners).
    cx = np.array([0, w - 1, 0, w - 1], np.float32)
    cy = np.array([0, 0, h - 1, h - 1], np.float32)
    u_corners = (cx - mouth_c[0]) * cs + (cy - mouth_c[1]) * sn
    step = 0.25
    u_lo, u_hi = float(u_corners.min()) - 4, float(u_corners.max()) + 4
    lut_up = _curve(uv[L.INNER_UPPER], u_lo, u_hi, step)
    lut_lo = _curve(uv[L.INNER_LOWER], u_lo, u_hi, step)
    e_u = np.array([cs, sn], np.float32)
    e_v = np.array([-sn, cs], np.float32)
    # Mouth patch: everything the opened mouth can cover.
    corners = []
    for uu in (u_mid - 1.25 * hw_m, u_mid + 1.25 * hw_m):
        for vv in (v_uo - 0.15 * g_max - 3, v_li0 + 1.1 * g_max + 4):
            corners.append(mouth_c + uu * e_u + vv * e_v)
    corners = np.array(corners)
    px0, py0 = np.floor(corners.min(0)).astype(int)
    px1, py1 = np.ceil(corners.max(0)).astype(int) + 1
    px0, py0, px1, py1 = max(px0, 0), max(py0, 0), min(px1, w), min(py1, h)

    # The eyes' mean corner-to-corner width: the unit of the gaze controls.
    eye_width = float(np.mean([max(float(np.ptp(uv[upper, 0])), 2.0) for upper in (L.EYE_LEFT_UPPER, L.EYE_RIGHT_UPPER)]))

    sx0, sy0, sx1, sy1 = 0, 0, w, h
    if mouth_only:
        # The mouth modes vanish beyond these bounds (u: the jaw's widest reach and the corners' fall-off;
        # v: from the nose, where the upper lip's pull ends, to the jaw's fade below the chin).
        d_reach = max(1.0, -v_uo) + 2.0 - float(uv[L.SUBNASALE, 1]) + max(2.0, (v_lo - v_uo) / 2) * 2.2
        v_top = float(min(lut_up.min(), lut_lo.min())) - d_reach - 2.0
        lip_v = float(max(lut_up.max(), lut_lo.max()))
        v_bot = max(v_chin + 0.2 * fh, lip_v + 1.8 * lip_lo_h, lip_v + 2.2 * max(2.0, (v_lo - v_uo) / 2)) + 2.0
        u_half = max(0.4 * fw, 2.2 * hw_m, 1.25 * hw_m) + 2.0
        box = np.array([[u_mid + a * u_half, b] for a in (-1, 1) for b in (v_top, v_bot)], np.float32)
        pts = mouth_c + box[:, :1] * e_u + box[:, 1:] * e_v
        sx0, sy0 = (int(v) for v in np.maximum(np.floor(pts.min(0)).astype(int) - 1, 0))
        sx1, sy1 = (int(v) for v in np.minimum(np.ceil(pts.max(0)).astype(int) + 2, [w, h]))
        # The patch's own arrays (side, face mask) are cut from these fields.
        sx0, sy0, sx1, sy1 = min(sx0, px0), min(sy0, py0), max(sx1, px1), max(sy1, py1)
        # A still rim of 3 px: where a field ends, the remap samples the frame's own pixels, not a repeated edge.
        sx0, sy0, sx1, sy1 = max(sx0 - 3, 0), max(sy0 - 3, 0), min(sx1 + 3, w), min(sy1 + 3, h)
    ys, xs = _pixel_grid(sx0, sy0, sx1, sy1)
    U = (xs - mouth_c[0]) * cs + (ys - mouth_c[1]) * sn
    V = -(xs - mouth_c[0]) * sn + (ys - mouth_c[1]) * cs
    AU = np.abs(U - u_mid)  # lateral distance from the visible mouth's middle

    def at(lut: np.ndarray, u: np.ndarray) -> np.ndarray:
        return np.interp(u, np.arange(len(lut)) * step + u_lo, lut).astype(np.float32)

    v_ui, v_li = at(lut_up, U), at(lut_lo, U)
    v_mid = (v_ui + v_li) / 2
    seam_d = V - (v_ui + seam * (v_li - v_ui))
    below = (seam_d > 0).astype(np.float32)
    above = 1.0 - below

    # A mouth-only encoding is cropped to the window its fields are built over: nothing outside it moves.
    bases = np.zeros((len(MODES), sy1 - sy0, sx1 - sx0, 2) if mouth_only else (len(MODES), h, w, 2), np.float32)
    sub = bases if mouth_only else bases[:, sy0:sy1, sx0:sx1]

    def put(k: int, weight: np.ndarray, direction: np.ndarray, where: tuple = (slice(None), slice(None))) -> None:
        np.multiply(weight[..., None], direction, out=sub[k][where])
        reached[k] = where

    reached: dict[int, tuple] = {}
    v_lips = (float(min(lut_up.min(), lut_lo.min())), float(max(lut_up.max(), lut_lo.max())))

    def within(u_half: float, v0: float, v1: float) -> tuple:
        """Slices of the fields' window holding every pixel with |U - u_mid| < u_half and v0 < V < v1; the whole
        window unless mouth_only (where these modes' small reach is worth cutting out; the full path checks it)."""
        if not mouth_only:
            return slice(None), slice(None)
        pts = np.array([mouth_c + uu * e_u + vv * e_v for uu in (u_mid - u_half, u_mid + u_half) for vv in (v0, v1)])
        (bx0, by0), (bx1, by1) = np.floor(pts.min(0)).astype(int) - 2, np.ceil(pts.max(0)).astype(int) + 3
        return (slice(max(by0 - sy0, 0), max(min(by1 - sy0, sy1 - sy0), 0)),
                slice(max(bx0 - sx0, 0), max(min(bx1 - sx0, sx1 - sx0), 0)))

    # Jaw: lower lip, chin and lower cheeks move down as one piece; the moving region widens
    # from the mouth corners to the jaw and fades out below the chin.
    dv_mid = V - v_mid
    # The fields are backward (sampled at the output pixel), so an opened lower lip's corners sit where
    # the region has already widened: its whole width drops, and a wide opening becomes a box with
    # vertical sides and cheeks streaked down them. The widening is measured from where the lower lip
    # lands at a mid opening instead (JAW_LAG of the widest opening's travel), so it keeps a lens shape.
    lag = 0.0 if follow_gap else JAW_LAG * g_max
    ramp = smoothstep(0.0, max(v_chin - v_li0, 1.0), dv_mid - lag)
    # On a turned face the side the nose points to is the silhouette, with background just past it:
    # there the moving region stays as narrow as the mouth instead of widening to the jaw.
    far = np.sign(uv[L.NOSE_TIP, 0] - (oval[:, 0].max() + oval[:, 0].min()) / 2) * (U - u_mid) > 0
    hw = hw_m + (0.40 * fw - hw_m) * ramp * np.where(far, np.float32(frontal), np.float32(1.0))
    # A wide fall-off at the lips gives an oval opening rather than a box.
    lat = 1.0 - smoothstep((LAT_START + (0.5 - LAT_START) * ramp) * hw, hw, AU)
    if follow_gap:  # the oval fall-off left an open frame's sides open (0.10 of the face height at full opening)
        gap_profile = np.clip((v_li - v_ui) / max(g0, 1.0), 0.0, 1.0) * (1.0 - smoothstep(0.9 * hw_m, 1.1 * hw_m, AU))
        lat = np.maximum(lat, gap_profile * (1.0 - ramp))
    # A frontal chin drops below its outline; a turned face keeps its chin and silhouette, and the
    # lower lip's travel is taken up by the skin between lip and chin.
    fade_from = v_chin - (1.0 - frontal) * 0.6 * max(v_chin - v_li0, 1.0)
    vfade = 1.0 - smoothstep(fade_from, v_chin + frontal * 0.2 * fh, V)
    put(0, -(below * lat * vfade), e_v)
    # Upper lip: rigid near the mouth, fading out at the nose.
    d_lip = max(1.0, -v_uo)
    d_nose = max(d_lip + 2.0, -float(uv[L.SUBNASALE, 1]))
    # Its reach: above the seam, within the lips' width (1.1 of it following the gap), up to the nose.
    r = within(1.1 * hw_m + 1.0, v_lips[0] - d_nose - 1.0, v_lips[1] + 1.0)
    lat_up = 1.0 - smoothstep(0.2 * hw_m, hw_m, AU[r])
    if follow_gap:
        lat_up = np.maximum(lat_up, gap_profile[r])
    put(1, -(above[r] * lat_up * (1.0 - smoothstep(d_lip, d_nose, -dv_mid[r]))), e_v, r)
    # Corners: spread (outwards along u) and smile (up); both fade away from the lips.
    lip_h = max(2.0, (v_lo - v_uo) / 2)
    r = within(2.2 * hw_m + 1.0, v_lips[0] - 2.2 * lip_h - 1.0, v_lips[1] + 2.2 * lip_h + 1.0)
    vband = 1.0 - smoothstep(0.8 * lip_h, 2.2 * lip_h, np.abs(dv_mid[r]))
    f_spread = np.clip((U[r] - u_mid) / hw_m, -1.0, 1.0) * (1.0 - smoothstep(hw_m, 2.2 * hw_m, AU[r]))
    put(2, -(f_spread * vband), e_u, r)
    if not mouth_only:
        f_smile = np.clip(AU / hw_m, 0.0, 1.2) ** 2 * (1.0 - smoothstep(1.1 * hw_m, 2.2 * hw_m, AU))
        put(3, f_smile * (1.0 - smoothstep(1.0 * lip_h, 3.0 * lip_h, np.abs(dv_mid))), e_v)
    # Tuck (f, v): the lower lip slides up under the upper teeth.
    r = within(1.1 * hw_m + 1.0, v_lips[0] - 1.0, v_lips[1] + 1.8 * lip_lo_h + 1.0)
    lat_t = 1.0 - smoothstep(0.6 * hw_m, 1.1 * hw_m, AU[r])
    put(4, below[r] * lat_t * (1.0 - smoothstep(0.8 * lip_lo_h, 1.8 * lip_lo_h, V[r] - v_li[r])), e_v, r)
    if not mouth_only:
        # Blinks: the upper lid sweeps down by the eye's own opening. The warp moves the skin only part
        # of the way (BLINK_SKIN_SHARE; at full strength the lashes and crease smear); the renderer draws
        # the lid over the rest from the columns below.
        eye_t = np.zeros((h, w), np.float32)
        eye_g = np.zeros((h, w), np.float32)
        eye_which = (U > (uv[L.EYE_LEFT_UPPER, 0].max() + uv[L.EYE_RIGHT_UPPER, 0].min()) / 2).astype(np.float32)
        for k, (upper, lower, brow) in ((5, (L.EYE_LEFT_UPPER, L.EYE_LEFT_LOWER, L.BROW_LEFT)),
                                        (6, (L.EYE_RIGHT_UPPER, L.EYE_RIGHT_LOWER, L.BROW_RIGHT))):
            up_pts, lo_pts = uv[upper], uv[lower]
            eu0, eu1 = float(up_pts[:, 0].min()), float(up_pts[:, 0].max())
            e_lut_up = _curve(up_pts, u_lo, u_hi, step)
            e_lut_lo = _curve(lo_pts, u_lo, u_hi, step)
            v_ul, v_ll = at(e_lut_up, U), at(e_lut_lo, U)
            inside = ((U > eu0) & (U < eu1)).astype(np.float32)
            gap = np.maximum(v_ll - v_ul, 0.0) * inside
            mine = eye_which == (k - 5)
            eye_t[mine], eye_g[mine] = (V - v_ul)[mine], gap[mine]
            lid_to_brow = max(3.0, float(up_pts[:, 1].min() - uv[brow, 1].mean()))
            # The stretch above the lid must stay gentle (slope < 1) or the skin folds over itself.
            reach = max(0.8 * lid_to_brow, 2.2 * float(gap.max()))
            # Above the lid the lens-shaped sweep widens into a broad, flat pull, so creases stay straight.
            ew = eu1 - eu0
            broad = float(gap.max()) * (1.0 - smoothstep(0.5 * ew, 0.9 * ew, np.abs(U - (eu0 + eu1) / 2)))
            t_up = smoothstep(0.0, 0.5 * reach, v_ul - V)
            amount = np.where(V < v_ul, gap * (1.0 - t_up) + broad * t_up, gap)
            vprof = np.where(
                V < v_ul,
                1.0 - smoothstep(0.0, reach, v_ul - V),
                1.0 - smoothstep(0.0, 1.5, V - v_ll),
            )
            gap = amount
            # A softer lateral edge so the lid corners do not crease.
            soft = smoothstep(eu0, eu0 + 0.15 * (eu1 - eu0), U) * (1.0 - smoothstep(eu1 - 0.15 * (eu1 - eu0), eu1, U))
            put(k, -BLINK_SKIN_SHARE * (gap * vprof * np.maximum(soft, 0.6 * inside * (V >= v_ul) + (V < v_ul))), e_v)
        # Brows: raised (positive) with the forehead above them, fading to the upper lids.
        brow_w = np.zeros((h, w), np.float32)
        for brow, upper in ((L.BROW_LEFT, L.EYE_LEFT_UPPER), (L.BROW_RIGHT, L.EYE_RIGHT_UPPER)):
            pts = uv[brow]
            bu, bv = pts[:, 0].mean(), pts[:, 1].mean()
            half = (pts[:, 0].max() - pts[:, 0].min()) / 2 * 1.3
            lid_v = float(uv[upper, 1].min())
            lat_b = 1.0 - smoothstep(0.6 * half, half, np.abs(U - bu))
            down = 1.0 - smoothstep(bv, lid_v, V)
            up = 1.0 - smoothstep(0.0, 1.6 * (lid_v - bv), bv - V)
            brow_w = np.maximum(brow_w, lat_b * np.where(V > bv, down, up))
        put(7, brow_w, e_v)
        # Gaze: the iris and the white around it slide inside the eye's opening, the lids and corners stay.
        # One pixel of each mode moves the iris by one pixel (along u, then v): a plateau of the iris's
        # width around it, falling off to nothing at the corners and at the lid edges.
        gaze_w = np.zeros((h, w), np.float32)
        for upper, lower in ((L.EYE_LEFT_UPPER, L.EYE_LEFT_LOWER), (L.EYE_RIGHT_UPPER, L.EYE_RIGHT_LOWER)):
            up_pts, lo_pts = uv[upper], uv[lower]
            eu0, eu1 = float(up_pts[:, 0].min()), float(up_pts[:, 0].max())
            ew = max(eu1 - eu0, 2.0)
            cu, ri = (eu0 + eu1) / 2, 0.2 * ew
            if len(uv) > max(L.IRIS_CENTRES):
                for centre, rim in zip(L.IRIS_CENTRES, L.IRIS_RIMS):
                    if eu0 + 0.15 * ew < uv[centre, 0] < eu1 - 0.15 * ew:
                        cu = float(uv[centre, 0])
                        ri = float(np.clip(np.linalg.norm(uv[list(rim)] - uv[centre], axis=1).mean(), 0.12 * ew, 0.3 * ew))
            # The fall-off to the nearer corner is at least a quarter of the eye wide (see renderer.GAZE_MAX).
            plat = min(1.15 * ri, max(0.0, min(cu - eu0, eu1 - cu) - 0.25 * ew))
            left = smoothstep(eu0 + 1.0, cu - plat, U)
            right = 1.0 - smoothstep(cu + plat, eu1 - 1.0, U)
            v_ul = at(_curve(up_pts, u_lo, u_hi, step), U)
            v_ll = at(_curve(lo_pts, u_lo, u_hi, step), U)
            opening = smoothstep(v_ul - 0.5, v_ul + 1.0, V) * (1.0 - smoothstep(v_ll - 1.0, v_ll + 0.5, V))
            inside = ((U > eu0) & (U < eu1)).astype(np.float32)
            gaze_w = np.maximum(gaze_w, left * right * opening * inside)
        put(8, -gaze_w, e_u)
        put(9, -gaze_w, e_v)

    # Nothing moves at the crop border, so the pasted crop meets the portrait seamlessly.
    margin = 4.0
    border = smoothstep(0, margin, np.minimum(np.minimum(xs, w - 1 - xs), np.minimum(ys, h - 1 - ys)))
    # Nor outside the face oval, which on a frontal face is swept down by the chin's travel.
    widest = max(0.0, 1.2 * g_max - g0)
    jaw_travel = (widest - float(upper_lip_rise(widest, g_max, g0))) * frontal
    face = face_mask(xs, ys, lm - off, jaw_travel * e_v, max(2.0, 0.035 * fw))
    keep = (border * face)[..., None]
    for k, r in reached.items():
        sub[k][r] *= keep[r]  # in place, mode by mode and only where it reaches: no copy of the fields

    # Head: an ellipse over face and hair, feathered out well inside the crop. A re-voiced head moves as
    # filmed: a mouth-only encoding has none (zero, so a head pose asked of it warps nothing).
    hc = center - off
    if mouth_only:
        head_mask = np.zeros(xs.shape, np.float32)
    else:
        rx, ry = 0.62 * fw, 0.62 * fh
        r = np.sqrt(((xs - hc[0]) / rx) ** 2 + ((ys - hc[1]) / ry) ** 2)
        head_mask = ((1.0 - smoothstep(0.85, 1.4, r)) * border).astype(np.float32)

    if mouth_only:
        eye_patch = Box(0, 0, 1, 1)
        eye_map = np.zeros((3, 1, 1), np.float32)
        eye_skin = eye_lash = np.zeros((1, 1, 3), np.float32)
    else:
        eye_patch, eye_map, eye_skin, eye_lash = _eye_layers(image[y0:y1, x0:x1], lm - off, eye_t, eye_g, eye_which,
                                                             e_v)

    # The portrait's own teeth: a bright band between the inner lips, unsaturated or (under a warm
    # light, as GRID's yellow teeth) much brighter than the lips.
    own = 0.0
    look = measure_appearance(image[y0:y1, x0:x1], lm - off) if appearance is None else appearance
    grain, blur, palette, teeth, dark_floor = look.grain, look.blur, look.palette, look.teeth, look.dark_floor
    if g0 >= 2.5:
        band = (V > v_ui + 0.5) & (V < v_li - 0.5) & (AU < 0.6 * hw_m)
        pix = image[y0 + sy0:y0 + sy1, x0 + sx0:x0 + sx1][band].astype(np.float32)
        if len(pix) >= 6:
            lum = pix @ LUMA
            sat = pix.max(1) - pix.min(1)
            bright = pix[lum >= np.median(lum)]
            lip_l = float(look.lip @ LUMA)
            if (np.median(lum) > 100 and np.median(sat) < 90) or np.percentile(lum, 75) > max(120.0, 1.35 * lip_l):
                own = g0 / 2
                teeth = np.clip(bright.mean(0) * 1.02, 0, 255).astype(np.float32)

    # Crop coordinates of a mouth-only encoding count from its window (an integer shift: exact in float32).
    ox, oy = (sx0, sy0) if mouth_only else (0, 0)
    return Encoding(
        image=image,
        landmarks=lm,
        crop=Box(x0 + ox, y0 + oy, x0 + sx1, y0 + sy1) if mouth_only else Box(x0, y0, x1, y1),
        bases=bases,
        head_mask=head_mask,
        head_center=(hc - [ox, oy]).astype(np.float32),
        patch=Box(int(px0) - ox, int(py0) - oy, int(px1) - ox, int(py1) - oy),
        patch_side=np.ascontiguousarray(below[py0 - sy0:py1 - sy0, px0 - sx0:px1 - sx0]),
        patch_seam=np.ascontiguousarray(np.clip(seam_d[py0 - sy0:py1 - sy0, px0 - sx0:px1 - sx0], -1.0, 1.0), dtype=np.float32),
        lut_upper=lut_up,
        lut_lower=lut_lo,
        teeth_rgb=teeth,
        palette=palette,
        geometry=FaceGeometry(
            face_width=fw, face_height=fh, mouth_half_width=hw_m, rest_gap=g0, max_gap=g_max,
            lower_lip_height=lip_lo_h, own_teeth=own, brow_travel=0.035 * fh,
            mouth_x=mouth_c[0] - ox, mouth_y=mouth_c[1] - oy, roll_cos=cs, roll_sin=sn, lut_u0=u_lo, lut_step=step,
            mouth_u=u_mid, yaw=yaw, frontal=frontal, landmark_mouth_half_width=hw_lm,
            teeth_mid_u=float(np.clip(uv[L.INNER_UPPER_MID[0], 0], c_left + 0.3 * hw_m, c_right - 0.3 * hw_m)),
            grain=grain, blur=blur, dark_floor=dark_floor,
            eye_width=eye_width, edge_overlap=EDGE_OVERLAP if edge_overlap is None else edge_overlap,
        ),
        patch_mask=np.ascontiguousarray(face[py0 - sy0:py1 - sy0, px0 - sx0:px1 - sx0], dtype=np.float32),
        eye_patch=eye_patch,
        eye_map=eye_map,
        eye_skin=eye_skin,
        eye_lash=eye_lash,
    )


def encode_image(image: np.ndarray, face_index: Optional[int] = None) -> Encoding:
    """Find the face once with MediaPipe (see find_landmarks for the choice) and build its encoding (encode_portrait)."""
    return encode_portrait(image, find_landmarks(image, face_index))


def working_scale(lm: np.ndarray) -> float:
    """How much a face is scaled to be animated: 1 within WORK_FACE_MIN..WORK_FACE_MAX, else to the nearer bound."""
    fh = float(np.linalg.norm(lm[L.CHIN] - lm[L.FOREHEAD]))
    if fh > WORK_FACE_MAX:
        return WORK_FACE_MAX / fh
    if fh < WORK_FACE_MIN:
        return WORK_FACE_MIN / max(fh, 1.0)
    return 1.0


def encode_portrait(image: np.ndarray, lm: np.ndarray) -> Encoding:
    """The encoding of a portrait's face (landmarks `lm`), at the working resolution the face's size calls for.

    Within WORK_FACE_MIN..WORK_FACE_MAX the portrait is encoded as it is: only the face's crop is
    animated and pasted back, and every other pixel is the portrait's. Outside, a region around
    the face (the crop and a margin) is cut out and scaled so the face has the bound's height,
    encoded there, and each rendered frame of it is scaled back and blended into the full
    portrait with a feather inside the crop's border (`Encoding.blend`): the frame keeps the
    portrait's size, and every pixel outside the feathered crop is the portrait's own.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    lm = np.asarray(lm, np.float32)
    bx, by, bw, bh = L.face_box(lm)
    if bw < MIN_FACE_PX:
        raise BadMedia(f"the face is too small to animate ({bw} px wide; at least {MIN_FACE_PX} px needed)")
    scale = working_scale(lm)
    if scale == 1.0:
        return encode_from_landmarks(image, lm)
    H, W = image.shape[:2]
    # The encoder's crop reaches 0.9 face widths and 0.95 face heights from the oval's centre; the region
    # holds it and a margin, so the crop (and its feather) lies inside the region wherever the portrait allows.
    cx, cy = lm[L.FACE_OVAL].mean(0)
    size = float(max(bw, bh))
    half_w, half_h = 1.0 * size + 0.1 * size, 1.05 * size + 0.1 * size
    x0, x1 = int(max(0, np.floor(cx - half_w))), int(min(W, np.ceil(cx + half_w)))
    y0, y1 = int(max(0, np.floor(cy - half_h))), int(min(H, np.ceil(cy + half_h)))
    rw, rh = x1 - x0, y1 - y0
    ww, wh = max(2, int(round(rw * scale))), max(2, int(round(rh * scale)))
    cut = image[y0:y1, x0:x1]
    work = cv2.resize(cut, (ww, wh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    sx, sy = ww / rw, wh / rh
    lm_work = (lm - np.array([x0, y0], np.float32) + 0.5) * np.array([sx, sy], np.float32) - 0.5
    enc = encode_from_landmarks(work, lm_work)
    enc.frame = image
    enc.region = Box(x0, y0, x1, y1)
    enc.blend = _paste_weight(enc.crop, (ww, wh), enc.region, (W, H), feather=max(2.0, 0.04 * bw))
    return enc


def _paste_weight(crop: Box, work_size: tuple[int, int], region: Box, portrait_size: tuple[int, int],
                  feather: float) -> np.ndarray:
    """(rh, rw) weight of the animated cut in its region: 1 inside the crop (scaled back to the region), falling
    smoothly to 0 over `feather` pixels at the crop's border. Where the crop reaches the portrait's own edge
    there is nothing beyond it to blend with, and the weight stays 1 up to that edge."""
    (ww, wh), (W, H) = work_size, portrait_size
    rw, rh = region.width, region.height
    sx, sy = ww / rw, wh / rh
    far = np.float32(1e6)
    xs = np.arange(rw, dtype=np.float32)
    ys = np.arange(rh, dtype=np.float32)
    # The crop's edges in region pixels (a work pixel edge e lies at e / s in the region).
    dl = xs + 0.5 - crop.x0 / sx if not (crop.x0 == 0 and region.x0 == 0) else np.full_like(xs, far)
    dr = crop.x1 / sx - (xs + 0.5) if not (crop.x1 >= ww and region.x1 >= W) else np.full_like(xs, far)
    dt = ys + 0.5 - crop.y0 / sy if not (crop.y0 == 0 and region.y0 == 0) else np.full_like(ys, far)
    db = crop.y1 / sy - (ys + 0.5) if not (crop.y1 >= wh and region.y1 >= H) else np.full_like(ys, far)
    d = np.minimum(np.minimum(dt, db)[:, None], np.minimum(dl, dr)[None, :])
    return np.ascontiguousarray(smoothstep(0.0, feather, d), dtype=np.float32)
