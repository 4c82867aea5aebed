"""A user's portrait as the encoder gets it: decoded, and a transparent one composited on its background.

PNG and WebP store straight (unassociated) alpha: a pixel's colour is the foreground's own, and
`alpha` says how much of it covers the pixel. Compositing is `alpha * F + (1 - alpha) * B`. At a
soft edge the stored colour is rarely the pure foreground: a cut-out made from a photo keeps
the old background mixed into its edge pixels (p09's light window and red curtain), and an
exporter may leave black there. Used as F, those colours draw a light or dark rim around the
head. So the foreground colour of the edge pixels is estimated first (Germer et al. 2020, "Fast
multi-level foreground estimation": each pixel's F and old B explain its stored colour, and both
vary smoothly except across alpha edges), and only then composited.
"""

from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

from avatar_contracts.media import Background, check_image_header, image_has_alpha
from gpu_service.errors import BadMedia


def _sweeps(img: np.ndarray, a: np.ndarray, f: np.ndarray, b: np.ndarray, idx: np.ndarray, eps: float, omega: float,
            iters: int) -> None:
    """Jacobi sweeps of the per-pixel 2x2 least-squares system at the flat pixel indices `idx` (f and b in place).

    Data: a F + (1 - a) B = I; smoothness to the 4 neighbours (edges repeat), weighted by
    eps + omega |a_i - a_j|: weak everywhere, strong across alpha edges, so F and B stay apart there.
    """
    h, w = a.shape
    af, ff, bf = a.reshape(-1), f.reshape(-1, 3), b.reshape(-1, 3)
    ys, xs = np.divmod(idx, w)
    nbrs = (np.maximum(ys - 1, 0) * w + xs, np.minimum(ys + 1, h - 1) * w + xs,
            ys * w + np.maximum(xs - 1, 0), ys * w + np.minimum(xs + 1, w - 1))
    ai = af[idx][:, None]
    ii = img.reshape(-1, 3)[idx]
    weights = [(eps + omega * np.abs(af[idx] - af[n]))[:, None].astype(np.float32) for n in nbrs]
    total = sum(weights)
    a11, a12, a22 = ai * ai + total, ai * (1.0 - ai), (1.0 - ai) ** 2 + total
    det = a11 * a22 - a12 * a12
    for _ in range(iters):
        sf = sum(wk * ff[n] for wk, n in zip(weights, nbrs))
        sb = sum(wk * bf[n] for wk, n in zip(weights, nbrs))
        r1, r2 = ai * ii + sf, (1.0 - ai) * ii + sb
        ff[idx] = np.clip((a22 * r1 - a12 * r2) / det, 0.0, 1.0)
        bf[idx] = np.clip((a11 * r2 - a12 * r1) / det, 0.0, 1.0)


def estimate_foreground(image: np.ndarray, alpha: np.ndarray, eps: float = 5e-3, omega: float = 0.1,
                        small_iters: int = 10, big_iters: int = 2, band: int = 4) -> np.ndarray:
    """(H, W, 3) float32 foreground colours in 0..1 of an image (float 0..1) under a matte (float 0..1).

    Coarse to fine from 1x1 to full size, a few sweeps at each level (`_sweeps`). Levels larger
    than 128x128 are swept only within `band` pixels of the partly transparent ones: elsewhere F
    matters only as those pixels' neighbours, and the coarser level's value serves (a 1 MP
    cut-out's thin edge is a few percent of its pixels). Opaque pixels come out as their own colour.
    """
    h0, w0 = alpha.shape
    levels = max(1, math.ceil(math.log2(max(h0, w0))))
    f = np.broadcast_to(image.reshape(-1, 3).mean(0), (1, 1, 3)).astype(np.float32)
    b = f.copy()
    kernel = np.ones((2 * band + 1, 2 * band + 1), np.uint8)
    for level in range(levels + 1):
        h = max(1, round(h0 ** (level / levels)))
        w = max(1, round(w0 ** (level / levels)))
        full = (h, w) == (h0, w0)
        img = image if full else cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).reshape(h, w, 3)
        a = alpha if full else cv2.resize(alpha, (w, h), interpolation=cv2.INTER_AREA).reshape(h, w)
        f = np.ascontiguousarray(cv2.resize(f, (w, h), interpolation=cv2.INTER_NEAREST).reshape(h, w, 3))
        b = np.ascontiguousarray(cv2.resize(b, (w, h), interpolation=cv2.INTER_NEAREST).reshape(h, w, 3))
        if h * w > 128 * 128:
            edge = ((a > 0.0) & (a < 1.0)).astype(np.uint8)
            idx = np.flatnonzero(cv2.dilate(edge, kernel))
        else:
            idx = np.arange(h * w)
        if len(idx):
            _sweeps(np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(a, dtype=np.float32), f, b, idx,
                    eps, omega, small_iters if min(h, w) <= 32 else big_iters)
    return f


def kept_old_background(rgb: np.ndarray, alpha: np.ndarray) -> bool:
    """Whether the fully clear pixels still hold a picture (a cut-out made from a photo, whose edge colours are
    mixed with it) rather than one fill colour (an exporter's black or white, which the edges never saw)."""
    clear = rgb[alpha <= 0.0]
    return len(clear) >= 64 and float(clear.std(0).max()) > 2.0 / 255.0


def composite(rgb: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: straight-alpha `rgb` (float 0..1) over `background` (uint8, same size).

    When the clear pixels still hold the photo the matte was cut from, the edge pixels' colours
    are that photo's mix of person and old background: their foreground colour is estimated
    first. Otherwise the stored colours are the foreground's, as the format defines them (taking
    them for a mix with a black fill would brighten the rim). Fully opaque pixels keep their
    colour exactly; fully clear ones are the background.
    """
    edge = (alpha > 0.0) & (alpha < 1.0)
    fg = rgb
    if edge.any() and kept_old_background(rgb, alpha):
        # Only the edge's neighbourhood needs the estimate: its bounding box, with room for the smoothing.
        rows, cols = np.nonzero(edge)
        pad = 16
        y0, y1 = max(0, rows.min() - pad), min(alpha.shape[0], rows.max() + pad + 1)
        x0, x1 = max(0, cols.min() - pad), min(alpha.shape[1], cols.max() + pad + 1)
        est = estimate_foreground(np.ascontiguousarray(rgb[y0:y1, x0:x1]), np.ascontiguousarray(alpha[y0:y1, x0:x1]))
        fg = rgb.copy()
        sub = edge[y0:y1, x0:x1]
        fg[y0:y1, x0:x1][sub] = est[sub]
    a = alpha[..., None]
    out = a * fg * 255.0 + (1.0 - a) * background.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def background_pixels(background: Background, size: tuple[int, int], max_bytes: int, max_pixels: int,
                      field: str = "background") -> np.ndarray:
    """(H, W, 3) uint8 RGB background for a portrait of `size` (width, height): the colour, or the image scaled
    to cover the portrait and cut to it around its middle; BadMedia naming `field` when the image does not decode."""
    w, h = size
    if background.image is None:
        return np.broadcast_to(np.array(background.colour, np.uint8), (h, w, 3))
    raw = background.image
    if len(raw) > max_bytes:
        raise BadMedia(f"{field} is {len(raw)} bytes; the limit is {max_bytes} bytes")
    check_image_header(raw, max_pixels, field)
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadMedia(f"{field} could not be decoded: its image data is damaged or cut short")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    bh, bw = img.shape[:2]
    scale = max(w / bw, h / bh)
    sw, sh = max(w, round(bw * scale)), max(h, round(bh * scale))
    img = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    x0, y0 = (sw - w) // 2, (sh - h) // 2
    return np.ascontiguousarray(img[y0:y0 + h, x0:x0 + w])


def decode_rgb(raw: bytes, field: str, background: Optional[Background] = None, max_bytes: int = 10 * 1024 * 1024,
               max_pixels: int = 40_000_000) -> Optional[np.ndarray]:
    """JPEG/PNG/WebP bytes to (H, W, 3) uint8 RGB, a transparent image composited on `background` (the
    default colour when None); None when OpenCV cannot decode the bytes. A JPEG's EXIF orientation is applied."""
    if not image_has_alpha(raw):
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        return None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.shape[2] == 3:  # a tRNS colour OpenCV did not expand: nothing transparent to composite
        return cv2.cvtColor((img / scale * 255.0 + 0.5).astype(np.uint8) if scale != 255.0 else img, cv2.COLOR_BGR2RGB)
    rgb = (img[..., 2::-1].astype(np.float32) / scale)
    alpha = img[..., 3].astype(np.float32) / scale
    if float(alpha.min()) >= 1.0:
        return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    from avatar_contracts.media import parse_background

    bg = background if background is not None else parse_background(None, max_bytes, max_pixels)
    h, w = alpha.shape
    return composite(rgb, alpha, background_pixels(bg, (w, h), max_bytes, max_pixels))
