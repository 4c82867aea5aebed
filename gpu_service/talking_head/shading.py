"""What both render paths share: the mouth-interior and eyelid shading, and the per-encoding layout cache.

Written once over array operations with the clamp passed in (np.clip or torch.clamp), so the
NumPy/OpenCV path (render_cpu.py) and the torch path (render_torch.py) agree. Both import this
module; neither imports renderer.py, which picks between them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from gpu_service.talking_head.encoding import Encoding


def smooth01(e0, e1, x, clamp: Callable):
    """Hermite ramp from 0 at e0 to 1 at e1 with the given clamp (np.clip or torch.clamp)."""
    t = clamp((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def shade_mouth(xs, ys, side, enc: Encoding, lut: Callable, clamp: Callable, mask=None):
    """Mouth-interior alpha and colour (r, g, b) for output pixels that sample source (xs, ys).

    `mask` (the encoding's patch_mask on the caller's device) keeps the interior inside the face.

    A pixel on the jaw side of the lip midline that samples from above the lower inner lip,
    or on the upper side sampling below the upper inner lip, is inside the open mouth: how far
    (its depth) says whether it shows teeth, tongue or the dark cavity.
    """
    geo = enc.geometry
    mx, my, cs, sn = geo.mouth_x, geo.mouth_y, geo.roll_cos, geo.roll_sin
    hw_m, g_max, own = geo.mouth_half_width, geo.max_gap, geo.own_teeth
    dx, dy = xs - mx, ys - my
    u = dx * cs + dy * sn
    v = -dx * sn + dy * cs
    v_up, v_lo = lut(enc.lut_upper, u), lut(enc.lut_lower, u)
    depth = side * (v_lo - v) + (1.0 - side) * (v - v_up)
    # A two-pixel ramp feathers the drawn interior into the inner edge of the lips.
    alpha = smooth01(own + 0.1, own + 2.1, depth, clamp)
    if mask is not None:
        alpha = alpha * mask
    un = u - geo.mouth_u  # across the visible mouth, corners at +-hw_m
    d = depth - own
    r2 = clamp((un / hw_m) ** 2, 0.0, 1.0)
    # The cavity darkens with distance from the lips, so the middle of a wide opening (the back of
    # the mouth) is darkest, and the corners fall into the cheeks' shadow.
    k = smooth01(0.0, 0.3 * g_max, d, clamp)
    lateral = 1.0 - 0.3 * r2
    th_u = max(0.2 * hw_m, own + 1.5)
    th_l = 0.09 * hw_m + own
    # Tongue: a dome resting on the jaw behind the lower teeth, highest in the middle.
    dome = clamp(1.0 - (un / (0.75 * hw_m)) ** 2, 0.0, 1.0)
    top = th_l + 0.5 + 0.13 * g_max * dome
    tongue = side * smooth01(th_l - 0.5, th_l + 0.5, depth, clamp) * (1.0 - smooth01(top - 2.0, top + 0.5, depth, clamp))
    tongue = tongue * clamp(3.0 * dome, 0.0, 1.0) * 0.85
    # Lit on its front, falling into shadow towards its back edge and its sides.
    tongue_shade = (0.7 + 0.3 * dome) * (1.0 - 0.35 * smooth01(th_l, top, depth, clamp))
    teeth_u = (1.0 - side) * (1.0 - smooth01(th_u - 1.5, th_u + 0.3, depth, clamp))
    teeth_l = side * (1.0 - smooth01(th_l - 1.0, th_l, depth, clamp)) * 0.85
    teeth_shade = 1.0 - 0.35 * clamp(depth / th_u, 0.0, 1.0)
    teeth_a = teeth_u + teeth_l
    edge, deep, tongue_rgb = (tuple(float(x) for x in row) for row in enc.palette)
    rgb = []
    for ch in range(3):
        col = edge[ch] * (1.0 - k) + deep[ch] * k
        col = col * (1.0 - tongue) + tongue_rgb[ch] * tongue_shade * tongue
        col = col * (1.0 - teeth_a) + float(enc.teeth_rgb[ch]) * teeth_shade * teeth_a
        rgb.append(col * lateral)
    return alpha, rgb


def shade_eyes(eye_map, lid_left, lid_right, clamp: Callable):
    """Alpha and brightness of the drawn upper lid over the eye patch, for lid closures 0 (open) .. 1 (shut).

    The lid's edge sits `closure x opening` pixels below the rest lid; above it the lid skin
    (Encoding.eye_skin, times the brightness) covers the eye, with a thin dark lash line along the
    edge. Closures are scalars or (B, 1, 1) for a batch; alpha is exactly 0 at closure 0.
    """
    t, g, which = eye_map[0], eye_map[1], eye_map[2]
    b = clamp(lid_left + (lid_right - lid_left) * which, 0.0, 1.0)
    edge = b * g
    alpha = (smooth01(0.0, 0.12, b, clamp) * smooth01(0.0, 0.6, g, clamp)
             * (1.0 - smooth01(edge - 0.6, edge + 0.6, t, clamp)) * smooth01(-3.5, -0.5, t, clamp))
    g_max = float(eye_map[1].max())
    width = min(max(0.15 * g_max, 0.7), 1.4)
    lash = clamp(1.0 - ((t - (edge - 0.6 * width)) / width) ** 2, 0.0, 1.0) * smooth01(0.15, 0.5, b, clamp)
    # The lid curves away from the light towards its edge: a little darker there, darkest at the lashes.
    bright = (1.0 - 0.12 * clamp((t + 1.0) / (edge + 1.0), 0.0, 1.0)) * (1.0 - 0.72 * lash)
    return alpha, bright


class PreparedCache:
    """The per-encoding layout a render path derives once, for the few encodings used most recently.

    Keyed by the encoding object itself (lip-sync makes a new encoding per frame, so the cache
    stays small and identity, not equality, is what matters); thread-safe for the engine slots.
    """

    def __init__(self, build: Callable[[Encoding], object], keep: int = 8) -> None:
        self._build = build
        self._keep = keep
        self._items: "OrderedDict[int, tuple[Encoding, object]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, enc: Encoding):
        """The prepared layout of `enc`, built on first use."""
        with self._lock:
            hit = self._items.get(id(enc))
            if hit is not None and hit[0] is enc:
                self._items.move_to_end(id(enc))
                return hit[1]
            prep = self._build(enc)
            self._items[id(enc)] = (enc, prep)
            while len(self._items) > self._keep:
                self._items.popitem(last=False)
            return prep
