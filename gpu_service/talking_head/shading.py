"""What both render paths share: the mouth-interior and eyelid shading, and the per-encoding layout cache.

Written once over array operations with the clamp passed in (np.clip or torch.clamp), so the
NumPy/OpenCV path (render_cpu.py) and the torch path (render_torch.py) agree. Both import this
module; neither imports renderer.py, which picks between them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, NamedTuple

import cv2
import numpy as np

from gpu_service.talking_head.encoding import LUMA, Encoding, smoothstep


def smooth01(e0, e1, x, clamp: Callable):
    """Hermite ramp from 0 at e0 to 1 at e1 with the given clamp (np.clip or torch.clamp)."""
    t = clamp((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class MouthLayout(NamedTuple):
    """What the drawn mouth interior needs of an encoding, per mouth-patch pixel, derived once (see mouth_layout).

    A pixel is inside the open mouth when it is below the upper inner lip and above the lower
    one. Its own side of the lip midline is read from the frame's sampling map; for the other
    lip the layout keeps that lip's motion fields, read just outside it. The teeth are fixed in
    the face (the upper row to the skull, the lower row to the jaw) and the tongue lies on the
    jaw, so everything else about them (their colours, the gaps between teeth, the grain) is
    where it is in the output, computed here once. Arrays are (ph, pw) unless noted, NumPy here
    and tensors on a torch path's device (`convert`).
    """

    other: object
    """(K, 2 * ph * pw) the other lip's backward field per unit of each mode (x then y), for weights @ other."""
    gap_rate: object
    """(K,) the inner-lip gap at the teeth's midline grows by weights @ gap_rate."""
    drop_rate: object
    """(K,) the jaw (the lower lip at the midline) drops by weights @ drop_rate."""
    out_xy: object
    """(2, ph, pw) each pixel's own crop coordinates."""
    upper_cover: object
    """Opacity of the upper teeth (the skull's): 1 above their edge, 0 below it and out past the canines."""
    upper_rgb: object
    """(3, ph, pw) their colour, shaded for the arch's curve, each tooth's bulge and the gaps between teeth."""
    below_contact: object
    """Output distance below where the lips meet at rest: the lower teeth and tongue lie at fixed depths below it on the jaw."""
    lower_cover: object
    """Opacity of the lower teeth across the mouth (0 past them)."""
    lower_notch: object
    """How far below the lower teeth's top each pixel's tooth edge sits (rounded tooth corners)."""
    lower_rgb: object
    """(3, ph, pw) their colour."""
    dome: object
    """The tongue's height profile across the mouth, 1 in the middle, 0 at its sides."""
    tongue_rgb: object
    """(3, ph, pw) its colour, lit across its middle, with the median groove."""
    throat: object
    """How much of the throat's darkness a cavity pixel can take (less towards the corners)."""
    grain: object
    """Grey levels of texture added to the drawn interior, as much as the portrait carries."""

    def window(self, rows: slice, cols: slice) -> "MouthLayout":
        """The same layout over a window of the patch (the motion tables, not per pixel, stay whole)."""
        return self._replace(**{name: getattr(self, name)[..., rows, cols] for name in self._fields[3:]})

    def convert(self, to: Callable) -> "MouthLayout":
        """Every array passed through `to` (e.g. onto a torch device)."""
        return MouthLayout(*(to(a) for a in self))


def _soft(width: float, blur: float) -> float:
    """Width of a smoothstep edge as soft as the portrait's (a Gaussian of sigma `blur`, plus resampling)."""
    return max(width, 3.2 * float(np.sqrt(blur * blur + 0.3)))


def grain_texture(shape: tuple[int, int], grain: float, blur: float, seed: int = 0) -> np.ndarray:
    """Fixed noise whose high-pass reads `grain` grey levels by interior_texture's measure, as soft as `blur`."""
    n = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if blur > 0.3:
        n = cv2.GaussianBlur(n, (0, 0), 0.6 * blur)
    res = n - cv2.GaussianBlur(n, (0, 0), 1.0)
    gain = grain / max(1.4826 * float(np.median(np.abs(res - np.median(res)))), 1e-6)
    return np.clip(n, -3.0, 3.0) * np.float32(gain)


def _teeth_row(at: np.ndarray, half: np.ndarray, edges: tuple[float, ...], blur: float,
               depth: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(shade, distance to the nearest gap over the tooth's width) across a row of teeth with gaps at |u| = `edges`."""
    knots = np.asarray(edges, np.float32)
    tau = np.interp(at, knots, np.arange(len(knots), dtype=np.float32)).astype(np.float32)
    frac = tau - np.floor(tau)
    width = np.interp(tau, np.arange(len(knots) - 1) + 0.5, np.diff(knots)).astype(np.float32) * half
    to_gap = np.minimum(frac, 1.0 - frac) * width
    # The join between two teeth is a soft valley a fifth of a tooth wide, not a dark line: teeth read as
    # separate from their shading, as they do in a photo, never as a comb of outlined blocks.
    valley = np.maximum(_soft(0.8, 0.5 * blur), 0.2 * width)
    gap = 1.0 - depth * (0.05 + 0.1 * np.clip(at, 0, 1)) * (1.0 - smoothstep(0.0, valley, to_gap))
    bulge = 1.0 - 0.1 * (2.0 * frac - 1.0) ** 2  # each tooth's face curves away from the light at its sides
    return (gap * bulge).astype(np.float32), (to_gap / np.maximum(width, 1e-3)).astype(np.float32)


OVERBITE = 0.016
"""How far the upper teeth reach below where the lips meet at rest, in face heights (at the midline)."""
UPPER_GAPS = (0.0, 0.30, 0.53, 0.72, 0.86, 0.97, 1.08)
"""Where the gaps between upper teeth sit across the mouth (half-widths from the midline): incisors, canine, premolars."""
LOWER_GAPS = (0.0, 0.19, 0.38, 0.56, 0.72, 0.86, 0.98)
"""The same for the narrower lower teeth."""
TEETH_BOUNCE = 0.5
"""How far a fully shadowed tooth takes the cavity's hue (scaled by how dark it is): light bounced inside the mouth."""


def bounce_colour(enc: Encoding) -> np.ndarray:
    """(3,) the light bounced inside the mouth as it falls on the teeth: the cavity's hue at the drawn teeth's luminance."""
    cavity = np.asarray(enc.palette[0], np.float32)
    teeth = np.asarray(enc.teeth_rgb, np.float32)
    return cavity * (float(teeth @ LUMA) / max(float(cavity @ LUMA), 1.0))


def mouth_layout(enc: Encoding) -> MouthLayout:
    """The interior's per-pixel layout of an encoding's mouth patch (NumPy; see MouthLayout)."""
    geo = enc.geometry
    px0, py0, px1, py1 = enc.patch
    ys, xs = np.mgrid[py0:py1, px0:px1].astype(np.float32)
    cs, sn = geo.roll_cos, geo.roll_sin
    u = (xs - geo.mouth_x) * cs + (ys - geo.mouth_y) * sn
    v = -(xs - geo.mouth_x) * sn + (ys - geo.mouth_y) * cs
    lut_u = np.arange(len(enc.lut_upper), dtype=np.float32) * geo.lut_step + geo.lut_u0
    v_up = np.interp(u, lut_u, enc.lut_upper).astype(np.float32)
    v_lo = np.interp(u, lut_u, enc.lut_lower).astype(np.float32)
    k = len(enc.bases)
    # The fields are read only near the lips: a window of them around the patch, only the modes that move it.
    wy0, wx0 = max(py0 - 3, 0), max(px0 - 3, 0)
    window = enc.bases[:, wy0:py1 + 3, wx0:px1 + 3]
    moving = [m for m in range(k) if window[m].any()]

    def fields_at(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        """(K, 2, ...) every mode's backward field at face-frame points (bilinear)."""
        mx = np.ascontiguousarray(geo.mouth_x + uu * cs - vv * sn - wx0, dtype=np.float32)
        my = np.ascontiguousarray(geo.mouth_y + uu * sn + vv * cs - wy0, dtype=np.float32)
        out = np.zeros((k, 2) + uu.shape, np.float32)
        for m in moving:  # both components in one remap (the same weights as one plane at a time)
            both = cv2.remap(window[m], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            out[m] = np.moveaxis(both.reshape(uu.shape + (2,)), -1, 0)
        return out

    # The other lip's field just outside it: for a pixel on the jaw side, the upper lip's field
    # 1.5 px above the upper inner lip; on the upper side, the jaw's 1.5 px below the lower one.
    side = enc.patch_side > 0.5
    other = fields_at(u, np.where(side, v_up - 1.5, v_lo + 1.5))
    # How the gap and the jaw move at the teeth's midline (backward fields: the lips move by minus the field).
    mid_u = geo.teeth_mid_u
    e_v = np.array([-sn, cs], np.float32)
    mid = np.full((1, 1), mid_u, np.float32)
    at_lip = lambda lut, dv: -np.tensordot(  # noqa: E731
        fields_at(mid, np.full((1, 1), float(np.interp(mid_u, lut_u, lut)) + dv, np.float32))[..., 0, 0], e_v, 1)
    drop_rate = at_lip(enc.lut_lower, 1.5)
    gap_rate = drop_rate - at_lip(enc.lut_upper, -1.5)

    # Across the mouth from the teeth's midline: -1 and 1 at the visible corners (a turned face's far side is narrower).
    c_left, c_right = geo.mouth_u - geo.mouth_half_width, geo.mouth_u + geo.mouth_half_width
    half = np.where(u < mid_u, mid_u - c_left, c_right - mid_u).astype(np.float32)
    at = np.abs(u - mid_u) / np.maximum(half, 1.0)
    blur, fh = geo.blur, geo.face_height
    edge_w = _soft(1.0, blur)
    teeth = np.asarray(enc.teeth_rgb, np.float32)[:, None, None]
    # Upper teeth: fixed to the skull, their edge a little below where the lips meet at rest (the
    # overbite), rising towards the canines and notched between teeth.
    shade_u, gap_u = _teeth_row(at, half, UPPER_GAPS, blur)
    # The incisal edge: barely rounded at each tooth's corners (a notch deep enough to show the throat between
    # teeth is what makes a comb), rising towards the canines.
    notch = 0.04 * np.minimum(0.3 * half, 0.04 * fh) * (1.0 - smoothstep(0.0, 0.45, gap_u))
    contact = (v_up + v_lo) / 2
    edge = contact + OVERBITE * fh * (1.0 - 0.5 * at * at) - notch
    upper_cover = (1.0 - smoothstep(-0.5 * edge_w, 0.5 * edge_w, v - edge)) * (1.0 - smoothstep(0.85, 1.02, at))
    translucent = 1.0 - 0.12 * smoothstep(-0.3 * OVERBITE * fh - edge_w, 0.0, v - edge)
    # Teeth in shadow are lit by the mouth around them: the light bounced off the cheeks and tongue
    # warms them towards the cavity's hue as they darken (scaled teeth alone went a cold grey that read
    # bluish against a warm face and interior: p05, p07).
    bounce = bounce_colour(enc)[:, None, None]

    def shaded(light: np.ndarray) -> np.ndarray:
        return (teeth + (bounce - teeth) * (TEETH_BOUNCE * (1.0 - light))[None]) * light[None]

    # The far teeth turn away into the cheeks' shadow (the buccal corridor).
    upper_rgb = np.clip(shaded(shade_u * (1.0 - 0.55 * at * at) * translucent), 0.0, 255.0)
    # Lower teeth: on the jaw, narrower, in the upper row's shadow.
    shade_l, gap_l = _teeth_row(at, half, LOWER_GAPS, blur, depth=0.6)
    lower_notch = 0.03 * np.minimum(0.2 * half, 0.03 * fh) * (1.0 - smoothstep(0.0, 0.45, gap_l))
    lower_cover = 1.0 - smoothstep(0.5, 0.75, at)
    lower_rgb = np.clip(shaded(0.9 * shade_l * (1.0 - 0.6 * at * at)), 0.0, 255.0)
    # Tongue: a dome lying on the jaw behind the lower teeth, lit across its middle, a groove down it.
    dome = np.clip(1.0 - (at / 0.8) ** 2, 0.0, 1.0)
    groove = 1.0 - 0.1 * (1.0 - smoothstep(0.0, 0.08, at))
    tongue_rgb = np.asarray(enc.palette[2], np.float32)[:, None, None] * ((0.72 + 0.28 * dome) * groove)[None]
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return MouthLayout(
        other=f32(other.reshape(k, -1)), gap_rate=f32(gap_rate), drop_rate=f32(drop_rate),
        out_xy=f32(np.stack([xs, ys])), upper_cover=f32(upper_cover), upper_rgb=f32(upper_rgb),
        below_contact=f32(v - contact), lower_cover=f32(lower_cover), lower_notch=f32(lower_notch),
        lower_rgb=f32(lower_rgb), dome=f32(dome), tongue_rgb=f32(tongue_rgb),
        throat=f32(1.0 - smoothstep(0.35, 1.0, at)), grain=f32(grain_texture(u.shape, geo.grain, blur)),
    )


def other_map(lay: MouthLayout, w):
    """Where each patch pixel would sample with the other lip's field (crop coordinates), (..., 2, ph, pw)."""
    return (w @ lay.other).reshape(tuple(w.shape[:-1]) + tuple(lay.out_xy.shape)) + lay.out_xy


def seam_band(enc: Encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, own weight) of the mouth-patch pixels within half a pixel of the lips' seam (Encoding.patch_seam).

    Such a pixel is covered partly by each lip: its colour is its own side's sample times the share
    of it on its own side (0.5 + |distance|, box-filter coverage) plus the other side's sample
    (other_map) times the rest. Empty for an encoding without a seam map.
    """
    d = enc.patch_seam
    rows, cols = np.nonzero(np.abs(d) < 0.5) if d.size else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return rows, cols, (0.5 + np.abs(d[rows, cols])).astype(np.float32)


def lip_depths(xs, ys, side, enc: Encoding, lay: MouthLayout, w, lut: Callable, o=None):
    """(below the upper inner lip, above the lower inner lip) at output pixels that sample source (xs, ys).

    Source pixels, so positive inside the opening. The pixel's own lip is read where it samples;
    the other lip where that lip's field (the layout's) would have it sample. `w` are the frame's
    mode weights, (K,) or (B, K); `o` is other_map(lay, w) when the caller has it.
    """
    geo = enc.geometry
    cs, sn = geo.roll_cos, geo.roll_sin
    o = other_map(lay, w) if o is None else o

    def depths(x, y):
        dx, dy = x - geo.mouth_x, y - geo.mouth_y
        u = dx * cs + dy * sn
        v = -dx * sn + dy * cs
        return v - lut(enc.lut_upper, u), lut(enc.lut_lower, u) - v

    # Each side's own lip where the frame's map samples, the other where the layout's field would.
    up_own, lo_own = depths(xs, ys)
    up_other, lo_other = depths(o[..., 0, :, :], o[..., 1, :, :])
    return up_own + side * (up_other - up_own), lo_other + side * (lo_own - lo_other)


def mouth_alpha(below_up, above_lo, enc: Encoding, clamp: Callable, mask=None):
    """Opacity of the drawn interior: inside both inner lips (past the portrait's own teeth), edges as soft as the portrait's.

    `mask` (the encoding's patch_mask) keeps it inside the face. Shut, nothing is drawn: the ramp starts
    just inside both lips. Opening, it moves out to straddle them by up to the geometry's edge_overlap of
    its width (half the local opening past the rest gap at most), so a narrow opening shows its interior
    across its whole height instead of its lips' colour smeared over it.
    """
    geo = enc.geometry
    own = geo.own_teeth
    e0 = own + 0.1
    width = _soft(2.0, geo.blur)
    e1 = e0 + width
    if geo.edge_overlap > 0.0 and own <= 0.0:
        # As the lips part past their rest gap, the edge slides out to straddle them, as a blurred photo's
        # edge does (EDGE_OVERLAP). Not next to a portrait's own teeth: they, not the lips, border the drawing.
        reach = clamp(0.5 * (below_up + above_lo - geo.rest_gap), 0.0, geo.edge_overlap * width)
        below_up, above_lo = below_up + reach, above_lo + reach
    alpha = smooth01(e0, e1, below_up, clamp) * smooth01(e0, e1, above_lo, clamp)
    return alpha if mask is None else alpha * mask


LOWER_SHOW = 0.045
"""How far the lower teeth's top rises above the lower lip at most, in face heights."""
LOWER_SHARE = 0.3
"""The share of the opening that the lower teeth show above the lower lip (up to LOWER_SHOW): in speech the jaw
drops less than the lips part, so both rows of teeth fill most of a conversational opening with a dark band
between them, as the kit's three GRID talkers show at every opening: down the midline, upper teeth, a dark
band, lower teeth (evaluator reenact's interior profile). At 0.2 of the opening, ramped in only past 0.12 of
the widest, the lower teeth barely showed and a conversational opening was upper teeth over a dark throat."""
TEETH_LIT_SHUT = 0.6
"""The share of its light a tooth gets in a mouth just parted: the light reaches the teeth through the opening
and under the upper lip, so they brighten as it widens, fully lit at TEETH_LIT_OPEN of the face height. The
kit's GRID talkers' teeth at 0.035 face heights are 0.85-0.9 as bright as at 0.06 (v01, v03), and v02's do
not show at all; ours, as bright at every opening, made the heads' interiors further from the real ones than
one flat colour (interior_over_flat 1.46/1.58 on v02/v03; 0.98/1.01 with this and LOWER_SHARE)."""
TEETH_LIT_OPEN = 0.12
"""The opening, in face heights, from which the teeth are fully lit (see TEETH_LIT_SHUT)."""
LIP_SHADOW = 0.3
"""How much darker the upper teeth are just under the upper lip (its shadow, over an eighth of the gap)."""


def seam_shift(below_up, above_lo, side, gap, enc: Encoding, clamp: Callable, opening: bool = True, closing: bool = True):
    """(dx, dy) to add to the sampling map over the patch so an opening mouth never shows the seam between its lips.

    A closed mouth's lips meet at a dark line (the seam, with the shadow and wet edge around it).
    Opening it, the pixels along each inner lip would sample that line (a dark outline ring round the
    interior) and the jaw side would sample the upper lip's edge just above it (a doubled lower lip).
    Instead every pixel on a side samples no closer to the seam than SEAM_DEPTH inside its own lip, the
    lip's band next to its edge pressed into the band beyond (SEAM_PRESS): the lip keeps its own colour,
    texture and thickness up to its new edge, where the interior takes over.
    `below_up`/`above_lo` are lip_depths' (each side's own lip is where it samples), `gap` jaw_motion's;
    nothing moves at rest (the shift grows over the first 1.5 px of opening), nor where the lips do
    not part (past the corners), nor on a portrait whose own teeth show (what lies between its lips
    is its own interior).

    Closing a mouth that is open at rest (its own teeth, or a dark gap, between the lips), the pixels
    squeezed between the lips would show slivers of that teeth band (a pink slab with tooth specks):
    instead, as the gap closes by the rest gap, the sides sample no closer than their own inner lips.
    None when neither applies (a closed-mouth portrait never closing past its own gap, see mode_weights).
    A caller that knows the frame only opens (or only closes) says so with `opening`/`closing`, and the
    other half is not computed (it would be zero).
    """
    geo = enc.geometry
    opening, closing = opening and geo.own_teeth <= 0.0, closing and geo.rest_gap >= 1.0
    if not (opening or closing):
        return None
    s = 0.0
    if opening:
        m = seam_depth(geo)
        k = smooth01(0.0, 1.5, gap, clamp) * smooth01(0.0, 3.0 * m, below_up + above_lo, clamp)
        # Jaw side: a lip pixel d below the lower inner lip samples m + d (1 - 1/SEAM_PRESS) below it, out to
        # SEAM_PRESS m, past which nothing moves; the interior, m below the lip; the upper side the same, upwards.
        r = 1.0 / (SEAM_PRESS * m)

        def pressed(depth):  # the shift into its own lip of a pixel `depth` past that lip's edge (negative: inside it)
            return clamp(depth, 0.0, None) + m * clamp(1.0 + depth * r, 0.0, 1.0)

        s = k * (side * pressed(above_lo) - (1.0 - side) * pressed(below_up))
    if closing:
        k = smooth01(0.6 * geo.rest_gap, geo.rest_gap, -gap, clamp)
        s = s + k * (side * clamp(above_lo, 0.0, None) - (1.0 - side) * clamp(below_up, 0.0, None))
    return -geo.roll_sin * s, geo.roll_cos * s


SEAM_DEPTH = 0.01
"""How far inside its own lip (face heights) an opening mouth's lip edge samples: past the closed mouth's seam line."""


def seam_depth(geo) -> float:
    """The seam depth in pixels for a face (FaceGeometry): SEAM_DEPTH of its height, at least 1 px, plus half its blur."""
    return max(1.0, SEAM_DEPTH * geo.face_height) + 0.5 * geo.blur


SEAM_PRESS = 3.0
"""The lip band, in seam depths (seam_depth) from its inner edge, that an opening mouth presses into the band's outer
part: sampled depths run from one seam depth at the edge to this many in, so the lip keeps its own texture up to its
edge. Sampling the one row at the seam depth across the whole first seam depth (1 here) drew vertical streaks along
both lips, and a glint on that row (p10's teeth between his parted lips) became a grey block on the lower lip. 3 leaves
no streak visible at 4x on p02, p05 or p10 (2 still does); kit reenact figures before and after are in the README."""


def jaw_motion(lay: MouthLayout, w):
    """(the gap's change at the teeth's midline, the jaw's drop there) for mode weights `w`, shaped to broadcast."""
    lead = tuple(w.shape[:-1]) + (1, 1)
    return (w @ lay.gap_rate).reshape(lead), (w @ lay.drop_rate).reshape(lead)


def mouth_colour(lay: MouthLayout, below_up, above_lo, gap, drop, enc: Encoding, clamp: Callable):
    """Colour (r, g, b) of the drawn interior: throat, tongue, lower and upper teeth, back to front, with grain.

    `below_up` and `above_lo` are each pixel's distances from the moving inner lips (lip_depths),
    `gap` and `drop` the jaw's motion (jaw_motion); `lay` may be a window of the patch.
    """
    geo = enc.geometry
    fh = geo.face_height
    gap = gap + geo.rest_gap
    ew = _soft(1.0, geo.blur)
    own = geo.own_teeth > 0.0  # the portrait's own teeth move with its lips: none are drawn
    # The lower teeth ride on the jaw; their top rises above the lower lip as the jaw drops (the lip is
    # drawn down off them). The tongue's back shows above them, more as the mouth opens. A portrait's
    # own lower teeth end where the lips met at rest, moved down with the jaw.
    show = clamp(LOWER_SHARE * gap, 0.0, LOWER_SHOW * fh)
    teeth_top = drop if own else drop - show  # below the rest contact line
    on_jaw = lay.below_contact - teeth_top  # > 0 below the lower teeth's top
    tongue_h = clamp(0.4 * gap - 0.01 * fh, 0.0, 0.06 * fh) * lay.dome  # none while the mouth barely parts
    # Its back recedes into the throat's shadow: lit at the front, darker towards its soft top edge.
    tongue = smooth01(-tongue_h - ew, 2.0 * ew - tongue_h, on_jaw, clamp) * clamp(4.0 * lay.dome, 0.0, 1.0)
    lit = smooth01(-tongue_h, 0.5 * ew, on_jaw, clamp)
    tongue_shade = 0.3 + 0.7 * lit
    # The throat is darkest in the middle of the opening, far from every lit surface; it lightens
    # gradually towards the lips (no flat core), and the upper lip shades the teeth just below it.
    # Darkest under the upper teeth (the palate's shadow), lighter low in the mouth where the floor and
    # the tongue catch the light coming in over the lower lip.
    deep = (lay.throat * clamp(below_up * (1.0 / (0.3 * gap + 1.0)), 0.0, 1.0)
            * clamp(above_lo * (1.0 / (0.7 * gap + 1.0)), 0.0, 1.0))
    lip_shadow = 1.0 - LIP_SHADOW * (1.0 - smooth01(0.0, 0.125 * gap + 0.5, below_up, clamp))
    # Teeth in a narrow opening are in the lips' shadow (TEETH_LIT_SHUT): dimmer, and what light still reaches them
    # has bounced inside the mouth, so their hue moves towards the cavity's by the share they lose (at half that
    # move p05's shadowed teeth went grey-green against her warm skin).
    shut = 1.0 - (TEETH_LIT_SHUT + (1.0 - TEETH_LIT_SHUT) * smooth01(0.0, TEETH_LIT_OPEN * fh, gap, clamp))
    if not own:
        lower = lay.lower_cover * smooth01(0.0, ew, on_jaw - lay.lower_notch, clamp)
        upper = lay.upper_cover
    cavity, back, _ = (tuple(float(x) for x in row) for row in enc.palette)
    # Per channel, the bounced light's colour over the teeth's, less one (as in mouth_layout's shaded teeth).
    warm = [float(x) for x in bounce_colour(enc) / np.maximum(np.asarray(enc.teeth_rgb, np.float32), 1.0) - 1.0]
    # The floor keeps the throat's hue: each channel stops where the throat colour has the floor's luminance.
    low = [c * geo.dark_floor / max(float(np.dot(back, LUMA)), 1.0) for c in back]
    # Grain is fainter in the dark, as a photo's noise and a painting's cracks are.
    g_dark, g_rate = 0.35, 0.65 / max(float(np.dot(enc.teeth_rgb, LUMA)), 1.0)
    rgb = []
    for ch in range(3):
        col = cavity[ch] + (back[ch] - cavity[ch]) * deep
        col = col + (back[ch] + (lay.tongue_rgb[ch] - back[ch]) * tongue_shade - col) * tongue
        if not own:
            lit = (1.0 - shut) * (1.0 + warm[ch] * shut)
            col = col + (lay.lower_rgb[ch] * lit - col) * lower
            col = col + (lay.upper_rgb[ch] * (lip_shadow * lit) - col) * upper
        rgb.append(clamp(col + lay.grain * (g_dark + g_rate * col), low[ch], 255.0))
    return rgb


def shade_mouth(xs, ys, side, enc: Encoding, lay: MouthLayout, w, lut: Callable, clamp: Callable, mask=None):
    """Mouth-interior alpha and colour (r, g, b) over the whole patch, for output pixels that sample source (xs, ys)."""
    below_up, above_lo = lip_depths(xs, ys, side, enc, lay, w, lut)
    alpha = mouth_alpha(below_up, above_lo, enc, clamp, mask)
    return alpha, mouth_colour(lay, below_up, above_lo, *jaw_motion(lay, w), enc, clamp)


LID_TOP, LID_LOW = 0.94, 1.08
"""A shut lid's brightness at its top and near its lashes, times its skin (Encoding.eye_skin, as light as the skin
around the eye). Measured on v03, the kit's GRID talker who blinks: across the middle of his shut left lid the
rows read 95 at the top, rising to 108-115 by the lash line, which dips to 60 over 2-3 rows (frames 28 and 44);
the drawn lid was flat at 95-98, darkening towards its edge, with a one-row line."""
LASH_WIDTH = 0.25
"""A shut eye's lash line: half its width as a share of the eye's opening (at most 3 px), centred 0.4 of that
above the lid's edge, which fades over LID_EDGE pixels either side. On v03 (the kit's GRID talker who blinks,
frames 44-45 aligned to his open frame 20) the shut lid's rows run 100, 90, 72, 68, 78, 91 across its lashes: a
soft band 4-5 rows deep; at 0.2 of the opening, 0.6 up and a 0.6 px fade the drawn band was 2 rows, 93, 74, 76,
99, and at a big eye's 4 px it read as a pen line (p02, p04, p08)."""
LASH_WEIGHT = 0.7
"""How far the lash colour (the portrait's own lashes, Encoding.eye_lash) takes over at the band's middle. A wider
band made the shut eye darker than v03's (L* over the ring around the eye: 0.84-0.85 with a band 0.3 of the
opening at 0.8, his own 0.86-1.02); this band reads 0.88 on his frame (the narrow one at 0.9 read 0.86-0.87)."""
LID_EDGE = 1.0
"""Half the width, in pixels, of the shut lid's fade into the eye at its lash line."""
LID_FOLD = 0.6
"""How far above the rest lid line (a share of the column's opening, times the closure) a shutting lid covers
the fold: across v03's eyes the 6 rows above his lid line lighten from 67-98 open to 83-108 shut as the fold
unfolds, where the drawn lid left them at 82-93 (84-95 with the fold covered)."""


def shade_eyes(eye_map, lid_left, lid_right, clamp: Callable):
    """Alpha, skin brightness and lash weight of the drawn upper lid over the eye patch, for closures 0 (open) .. 1 (shut).

    The lid's edge sits `closure x opening` pixels below the rest lid; above it the lid skin
    (Encoding.eye_skin, times the brightness) covers the eye, and along the edge its lashes
    (Encoding.eye_lash, the portrait's own) take over by the lash weight. Closures are scalars or
    (B, 1, 1) for a batch; alpha is exactly 0 at closure 0.
    """
    t, g, which = eye_map[0], eye_map[1], eye_map[2]
    b = clamp(lid_left + (lid_right - lid_left) * which, 0.0, 1.0)
    edge = b * g
    # Shut, the lid reaches half a pixel past the lower lid, so no rim of the eye shows under its lashes.
    cover = edge + 0.5 * b
    g_max = float(eye_map[1].max())
    # Above the rest lid line it covers the open eye's lashes, fading into the skin over 3 px or more (a big
    # eye's drawn lid began with a cut edge), and, as it shuts, the fold above them (LID_FOLD).
    top = max(3.0, 0.12 * g_max) + LID_FOLD * g * b
    alpha = (smooth01(0.0, 0.12, b, clamp) * smooth01(0.0, 0.6, g, clamp)
             * (1.0 - smooth01(cover - LID_EDGE, cover + LID_EDGE, t, clamp)) * smooth01(-0.5 - top, -0.5, t, clamp))
    width = min(max(LASH_WIDTH * g_max, 0.7), 3.0)
    lash = clamp(1.0 - ((t - (edge - 0.4 * width)) / width) ** 2, 0.0, 1.0) * smooth01(0.15, 0.5, b, clamp)
    # A shut lid bulges over the eyeball: in the socket's shade under the brow, lit where it covers the cornea.
    bright = LID_TOP + (LID_LOW - LID_TOP) * smooth01(0.0, 1.0, (t + 1.0) / (edge + 1.0), clamp)
    return alpha, bright, LASH_WEIGHT * lash


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

    def forget(self, enc: Encoding) -> None:
        """Drop the layout of `enc`, if it is held (its avatar was evicted from the device's cache)."""
        with self._lock:
            hit = self._items.get(id(enc))
            if hit is not None and hit[0] is enc:
                del self._items[id(enc)]
