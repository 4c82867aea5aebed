"""Renderer on real faces: encoding, exact rest frame, untouched background, MediaPipe-measured mouth and lids, mouth interior, CPU vs torch."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data
from skimage.metrics import structural_similarity

from gpu_service.speech.protocol import SpeechRequest
from gpu_service.talking_head import landmarks as L
from gpu_service.talking_head.controls import SPEECH_OPEN, Controls
from gpu_service.talking_head.encoding import Encoding, encode_from_landmarks, encode_image, find_landmarks
from gpu_service.talking_head.renderer import Renderer, mode_weights
from gpu_service.talking_head.shading import lip_depths, mouth_alpha, mouth_layout, seam_depth

MEDIA = Path(__file__).resolve().parents[1] / "fixtures" / "media"
CLOSED_MOUTHS = {"p01": "p01_neutral_closed_mouth_grid_bbaf2n_f000.png", "p05": "p05_glasses_older_woman_grace_hopper.jpg",
                 "p06": "p06_darker_skin_closed_mouth_grid_swiz3n_f074.png"}
"""Real closed-mouth portraits from the media kit (GRID, lighter and darker skin; an older woman with a grainy photo): nothing in them to copy a mouth from."""
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@pytest.fixture(scope="module")
def astro() -> Encoding:
    return encode_image(data.astronaut())


@pytest.fixture(scope="module")
def cam() -> Encoding:
    return encode_image(np.stack([data.camera()] * 3, -1))


@pytest.fixture(scope="module")
def cpu() -> Renderer:
    return Renderer("cpu")


@pytest.fixture(scope="module")
def closed() -> dict[str, Encoding]:
    return {name: encode_image(kit_portrait(name)) for name in CLOSED_MOUTHS}


def kit_portrait(name: str) -> np.ndarray:
    """One of the real portraits copied into tests/fixtures/media, RGB."""
    return cv2.cvtColor(cv2.imread(str(MEDIA / CLOSED_MOUTHS[name])), cv2.COLOR_BGR2RGB)


def rest_controls(enc: Encoding, n: int) -> Controls:
    """Controls that reproduce the portrait's own rest mouth."""
    c = Controls.neutral(n, 25.0)
    c.mouth_open[:] = enc.geometry.rest_gap / enc.geometry.max_gap
    return c


def inner_gap(frame: np.ndarray) -> float:
    lm = L.detect_faces(frame)[0]
    return float(np.mean(lm[L.INNER_LOWER_MID, 1]) - np.mean(lm[L.INNER_UPPER_MID, 1]))


def eye_aperture(frame: np.ndarray) -> float:
    lm = L.detect_faces(frame)[0]
    (ul, ll), (ur, lr) = L.LID_MID_LEFT, L.LID_MID_RIGHT
    return float((lm[ll, 1] - lm[ul, 1]) + (lm[lr, 1] - lm[ur, 1])) / 2


def test_encoding_of_real_portraits(astro, cam, tmp_path):
    assert astro.landmarks.shape == (478, 2)
    x, y, w, h = astro.face_box
    assert 150 < x < 220 and 50 < y < 110 and 80 < w < 120  # the astronaut's face, upper middle
    assert astro.nbytes <= 20 * 1024 * 1024
    assert astro.geometry.rest_gap > 4  # she smiles with her teeth: the rest mouth is open
    assert astro.geometry.own_teeth > 0  # and those teeth are recognised as the portrait's own
    path = tmp_path / "a.npz"
    astro.save(path)
    again = Encoding.load(path)
    assert np.array_equal(again.bases, astro.bases) and np.array_equal(again.image, astro.image)
    # Boxes and the geometry come back by name, with the same values, so the cached avatar renders the same frames.
    assert again.geometry == astro.geometry and (again.crop, again.patch, again.eye_patch) == (astro.crop, astro.patch, astro.eye_patch)
    assert again.crop.width == astro.crop.x1 - astro.crop.x0 and again.nbytes == astro.nbytes
    c = rest_controls(astro, 1)
    c.mouth_open[:] = 0.7
    assert np.array_equal(Renderer("cpu").render(again, c), Renderer("cpu").render(astro, c))
    # A cache file of an older layout is refused (the avatar is encoded again), never misread.
    with np.load(path) as data:
        np.savez(tmp_path / "old.npz", **{**{k: data[k] for k in data.files}, "version": np.int32(7)})
    assert Encoding.load(tmp_path / "old.npz") is None
    # The cameraman's face is small and grey; MediaPipe finds it after upscaling.
    cx, cy, cw, ch = cam.face_box
    assert 180 < cx < 230 and 100 < cy < 150 and 50 < cw < 90
    assert cam.geometry.rest_gap < 2  # closed mouth
    # Per-frame encoding from given landmarks (what lip-sync reuses) is the same encoding.
    same = encode_from_landmarks(astro.image, astro.landmarks)
    assert np.array_equal(same.bases, astro.bases)


def test_rest_controls_reproduce_the_portrait_exactly(astro, cpu):
    frames = cpu.render(astro, rest_controls(astro, 3), head_motion=False)
    assert np.array_equal(frames[0], astro.image)


def test_pixels_outside_the_face_region_never_change(astro, cpu):
    rng = np.random.default_rng(1)
    c = Controls.neutral(12, 25.0)
    for name in c.names():
        getattr(c, name)[:] = rng.uniform(-1, 1, 12) * (0.05 if name.startswith("head") else 1.0)
    c.mouth_open[:] = np.abs(c.mouth_open)
    frames = cpu.render(astro, c, head_motion=True)
    x0, y0, x1, y1 = astro.crop
    outside = np.ones(astro.image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(frames[:, outside], np.broadcast_to(astro.image[outside], frames[:, outside].shape))
    assert not np.array_equal(frames[0], astro.image)


def test_mouth_opens_and_closes_as_mediapipe_measures(astro, cam, cpu):
    c = Controls.neutral(3, 25.0)
    # mouth_open=1 is the widest opening (about a fifth of the face height), which MediaPipe still follows.
    c.mouth_open[:] = [0.0, 0.5, 1.0]
    closed, half, wide = cpu.render(astro, c, head_motion=False)
    rest = inner_gap(astro.image)
    g_closed, g_half, g_wide = inner_gap(closed), inner_gap(half), inner_gap(wide)
    assert g_closed < 0.5 * rest  # her smiling mouth is closed
    assert rest < g_half < g_wide
    assert g_wide > 2.5 * rest
    # The closed-mouthed cameraman opens too (the interior is drawn, not found).
    cam_open = cpu.render(cam, Controls(**{**vars(Controls.neutral(1, 25.0)), "mouth_open": np.ones(1, np.float32)}), False)[0]
    lm = cam.landmarks
    region = (slice(int(lm[L.INNER_UPPER_MID[0], 1]), int(lm[L.INNER_LOWER_MID[0], 1]) + 8),
              slice(int(lm[L.MOUTH_LEFT, 0]), int(lm[L.MOUTH_RIGHT, 0])))
    darker = cam.image[region].astype(int).mean(axis=-1) - cam_open[region].astype(int).mean(axis=-1)
    # (His opening is 7 px: the lips keep their own colour up to their new edges, with no dark seam
    # line along them, and teeth fill part of it, so a dozen of these pixels darken, not the whole box.)
    assert (darker > 40).sum() >= 10, "a dark cavity appeared where the lips were"


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation 0..1 of RGB pixels (any leading shape)."""
    px = rgb.astype(np.float32)
    hi, lo = px.max(-1), px.min(-1)
    return (hi - lo) / np.maximum(hi, 1.0)


def open_mouth(enc: Encoding, cpu: Renderer, amounts) -> np.ndarray:
    c = Controls.neutral(len(amounts), 25.0)
    c.mouth_open[:] = amounts
    return cpu.render(enc, c, head_motion=False)


def test_mouth_interior_takes_the_portraits_colourfulness(astro, cam, cpu):
    # The grey cameraman gets a grey mouth: the drawn interior's saturation stays at the photo's.
    for frame in open_mouth(cam, cpu, [0.4, 0.7, 1.0]):
        changed = np.abs(frame.astype(np.int16) - cam.image).max(-1) > 12
        assert changed.sum() > 15  # the mouth did open
        drawn, photo = hsv_saturation(frame[changed]), hsv_saturation(cam.image[changed])
        assert abs(drawn.mean() - photo.mean()) < 0.02
        assert np.percentile(drawn, 95) < np.percentile(photo, 95) + 0.05  # no tinted patch, however small
    # The astronaut's interior is warm like her lips (red over blue), and not much richer than them.
    wide = open_mouth(astro, cpu, [1.0])[0]
    inside = np.abs(wide.astype(np.int16) - astro.image).max(-1) > 40
    px = wide[inside].astype(np.float32)
    lip = astro.image[int(astro.landmarks[17, 1]) - 2 : int(astro.landmarks[17, 1]) + 1, int(astro.landmarks[84, 0]) : int(astro.landmarks[314, 0])]
    assert inside.sum() > 200 and px[:, 0].mean() > px[:, 2].mean() + 5
    assert hsv_saturation(px).mean() < 1.6 * hsv_saturation(lip).mean()


def inner_lip_polygon(enc: Encoding, weights: np.ndarray, n: int = 41) -> np.ndarray:
    """The renderer's inner lips (its lip curves, 1.5 px into each lip) moved by one frame's field, image coordinates.

    Upper lip left to right, then lower lip right to left. Each point is carried forward through
    the backward field by fixed-point iteration (q = p - field(q)); 1.5 px keeps the bilinear
    samples on the point's own side of the lip midline, where the field jumps.
    """
    g = enc.geometry
    lut_u = np.arange(len(enc.lut_upper)) * g.lut_step + g.lut_u0
    d = enc.landmarks - np.array([enc.crop.x0 + g.mouth_x, enc.crop.y0 + g.mouth_y])
    corners = d[[L.MOUTH_LEFT, L.MOUTH_RIGHT]] @ np.array([g.roll_cos, g.roll_sin])
    u = np.linspace(corners[0], corners[1], n)
    field = np.tensordot(weights, enc.bases, 1).astype(np.float32)
    chains = []
    for lut, off in ((enc.lut_upper, -1.5), (enc.lut_lower, 1.5)):
        v = np.interp(u, lut_u, lut) + off
        p = np.stack([g.mouth_x + u * g.roll_cos - v * g.roll_sin, g.mouth_y + u * g.roll_sin + v * g.roll_cos], 1).astype(np.float32)
        q = p.copy()
        for _ in range(40):
            mx, my = np.ascontiguousarray(q[:, :1]), np.ascontiguousarray(q[:, 1:])
            q = p - np.concatenate([cv2.remap(field[..., k], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                                    for k in range(2)], 1)
        chains.append(q + np.array([enc.crop.x0, enc.crop.y0], np.float32))
    return np.concatenate([chains[0], chains[1][::-1]])


def crossings(poly: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of non-adjacent edges of a closed polygon that properly cross (empty: the polygon is simple)."""
    n = len(poly)
    a, b = poly, np.roll(poly, -1, axis=0)

    def side(p, q, r):
        return np.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))

    i, j = np.triu_indices(n, 2)
    keep = ~((i == 0) & (j == n - 1))
    i, j = i[keep], j[keep]
    cross = (side(a[i], b[i], a[j]) * side(a[i], b[i], b[j]) < 0) & (side(a[j], b[j], a[i]) * side(a[j], b[j], b[i]) < 0)
    return list(zip(i[cross].tolist(), j[cross].tolist()))


def interior_regions(enc: Encoding, frame: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Masks inside the frame's inner-lip polygon: all of it, its top quarter (upper teeth), middle (throat), lower half.

    The bands are the central columns (the middle 60-80 % of the opening's width); rows are
    fractions of the polygon's height.
    """
    mask = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(inner_lip_polygon(enc, weights)).astype(np.int32)], 1)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
    ys, xs = np.nonzero(mask)
    rel = ((np.arange(frame.shape[0]) - ys.min()) / (ys.max() - ys.min() + 1))[:, None]
    cx, half = (xs.min() + xs.max()) / 2, (xs.max() - xs.min()) / 2
    off = np.abs(np.arange(frame.shape[1]) - cx)[None, :]
    return {"all": mask, "upper": mask & (rel < 0.25) & (off < 0.4 * half),
            "throat": mask & (rel > 0.3) & (rel < 0.7) & (off < 0.4 * half), "lower": mask & (rel > 0.5) & (off < 0.3 * half)}


def grain_level(lum: np.ndarray, where: np.ndarray) -> float:
    """Robust std of the luminance's fine texture (minus its 1 px Gaussian blur) over `where`."""
    res = (lum - cv2.GaussianBlur(lum, (0, 0), 1.0))[where]
    return float(1.4826 * np.median(np.abs(res - np.median(res))))


def own_black(image: np.ndarray, lm: np.ndarray) -> float:
    """The portrait's own darkest: the 1st-percentile luminance over its eyes and brows (pupils, lashes, brows)."""
    pts = lm[L.EYE_LEFT_UPPER + L.EYE_LEFT_LOWER + L.EYE_RIGHT_UPPER + L.EYE_RIGHT_LOWER + L.BROW_LEFT + L.BROW_RIGHT]
    (x0, y0), (x1, y1) = np.floor(pts.min(0)).astype(int), np.ceil(pts.max(0)).astype(int) + 1
    return float(np.percentile(image[y0:y1, x0:x1].astype(np.float32) @ LUMA, 1))


def drawn_interior(enc: Encoding, weights: np.ndarray, opacity: float = 0.99) -> np.ndarray:
    """Boolean (H, W): the pixels where the renderer's drawn interior is at least `opacity` opaque for these weights."""
    from gpu_service.talking_head.render_cpu import lut_np

    smap = (np.tensordot(weights, enc.bases, 1) + np.stack(np.meshgrid(np.arange(enc.crop.width), np.arange(enc.crop.height)), -1))
    sub = smap[enc.patch.slices].astype(np.float32)
    lut = lambda t, u: lut_np(t, u, enc.geometry.lut_u0, enc.geometry.lut_step)  # noqa: E731
    depths = lip_depths(sub[..., 0], sub[..., 1], enc.patch_side, enc, mouth_layout(enc), weights, lut)
    out = np.zeros(enc.image.shape[:2], bool)
    rows, cols = enc.patch.slices
    out[enc.crop.y0 + rows.start:enc.crop.y0 + rows.stop, enc.crop.x0 + cols.start:enc.crop.x0 + cols.stop] = (
        mouth_alpha(*depths, enc, np.clip, enc.patch_mask) >= opacity)
    return out


def lower_teeth_height(enc: Encoding, frame: np.ndarray, weights: np.ndarray) -> float:
    """Mean height (face heights) of teeth-bright, teeth-pale pixels in the lower half of the opening, per column across its middle."""
    lum = frame.astype(np.float32) @ LUMA
    sat = (frame.max(-1).astype(np.float32) - frame.min(-1)) / np.maximum(frame.max(-1), 1)
    r = interior_regions(enc, frame, weights)
    throat, upper = float(np.median(lum[r["throat"]])), float(np.percentile(lum[r["upper"]], 90))
    lit = lum > (throat + upper) / 2
    teeth = r["lower"] & lit & (sat < np.median(sat[r["upper"] & lit]) + 0.1)
    return float(teeth.sum() / r["lower"].any(0).sum() / enc.geometry.face_height)


@pytest.mark.parametrize("name", list(CLOSED_MOUTHS))
def test_an_opened_closed_mouth_shows_teeth_tongue_and_a_shaded_throat(closed, cpu, name):
    enc = closed[name]
    assert enc.geometry.rest_gap < 1.0 and enc.geometry.own_teeth == 0.0  # closed: every tooth is drawn
    c = Controls.neutral(2, 25.0)
    c.mouth_open[:] = [0.5, 1.0]  # a mid opening and a wide-open vowel
    weights = mode_weights(enc, c)
    frames = cpu.render(enc, c, head_motion=False)
    for frame, w, opening in zip(frames, weights, c.mouth_open):
        lum = frame.astype(np.float32) @ LUMA
        r = interior_regions(enc, frame, w)
        throat = float(np.median(lum[r["throat"]]))
        # Not a flat hole: the opening spans dark throat to lit teeth, and the throat carries grain.
        inside = lum[r["all"]]
        assert np.percentile(inside, 90) - np.percentile(inside, 10) > 30, (name, opening)
        # The upper teeth (under the upper lip) are lit; the throat behind them is dark.
        assert np.percentile(lum[r["upper"]], 75) > throat + 25, (name, opening)
        # Nothing drawn is darker than the portrait's own black (a lifted video black lifts the throat too).
        drawn = drawn_interior(enc, w)
        assert drawn.sum() > 40
        assert lum[drawn].min() >= own_black(enc.image, enc.landmarks) - 1.0, (name, opening)
        if opening == 1.0:
            assert grain_level(lum, r["throat"]) > 0.4, name
            # Lower teeth show above the lower lip: teeth-bright, teeth-pale pixels low in the opening,
            # over 0.7 % of the face height on average across its middle (a thin line along the lip is not teeth).
            assert lower_teeth_height(enc, frame, w) > 0.007, (name, lower_teeth_height(enc, frame, w))


def test_a_conversational_opening_shows_both_rows_of_teeth(closed, cpu):
    # In speech the jaw drops less than the lips part: the kit's GRID talkers show upper teeth, a dark band
    # and lower teeth down every opening (shading.LOWER_SHARE). Drawn at 0.2 of the opening and ramped in only
    # past 0.12 of the widest, no lower tooth showed at the widest conversational opening (0.000 on all three;
    # 0.0014-0.0142 face heights now; the darker skin's dimmer teeth are the least).
    c = Controls.neutral(1, 25.0)
    c.mouth_open[:] = [SPEECH_OPEN]
    for name, enc in closed.items():
        frame, w = cpu.render(enc, c, head_motion=False)[0], mode_weights(enc, c)[0]
        assert lower_teeth_height(enc, frame, w) > 0.001, (name, lower_teeth_height(enc, frame, w))


def test_a_narrow_opening_shows_its_interior_across_its_height(closed):
    # The interior's soft edge straddles the parting lips (encoding.EDGE_OVERLAP) instead of starting inside
    # both: a narrow opening is not its lips' colour smeared inwards. Across the middle of the mouth, at 0.4 and
    # 0.6 of the widest conversational opening (4.6-10.3 px here), the drawn interior (at least half opaque)
    # spans on average 0.76-0.87 of the renderer's own inner-lip gap; 0.37-0.68 with the edge inside both lips.
    for name, enc in closed.items():
        shares = []
        for opening in (0.4, 0.6):
            c = Controls.neutral(1, 25.0)
            c.mouth_open[:] = [opening * SPEECH_OPEN]
            w = mode_weights(enc, c)[0]
            drawn, poly = drawn_interior(enc, w, 0.5), inner_lip_polygon(enc, w)
            k = len(poly) // 2
            for i in range(k // 2 - 3, k // 2 + 4):  # the middle columns: upper point i, lower point mirrored
                up, lo = poly[i], poly[len(poly) - 1 - i]
                gap = float(lo[1] - up[1]) - 3.0  # the polygon sits 1.5 px into each lip
                shares.append(drawn[:, int(round((up[0] + lo[0]) / 2))].sum() / gap)
        assert np.mean(shares) > 0.72, (name, np.mean(shares))


def opened_columns(enc: Encoding, frame: np.ndarray, weights: np.ndarray, min_rows: int):
    """(top row, bottom row, luminance column) of the half-opaque drawn interior, per column across its middle half.

    Only columns where at least `min_rows` rows are drawn count towards the interior's extent.
    """
    drawn = drawn_interior(enc, weights, 0.5)
    lum = frame.astype(np.float32) @ LUMA
    cols = np.nonzero(drawn.sum(0) >= min_rows)[0]
    mid, half = (cols.min() + cols.max()) / 2, (cols.max() - cols.min()) / 2
    for x in cols[np.abs(cols - mid) < 0.5 * half]:
        rows = np.nonzero(drawn[:, x])[0]
        yield rows.min(), rows.max(), lum[:, x]


def inner_lip_rings(enc: Encoding, frame: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """How much darker than both its sides the frame gets along the opened inner lips (grey levels; 0: no dark ring).

    Per column across the middle half of the drawn interior: at the upper lip, the darkest of the
    2 px either side of the interior's top edge against the lighter of the lip above and the teeth
    below; at the lower lip the same against the lip below and the interior just above its edge (the
    cavity there when the teeth fill the rest of the opening: a dark strip between teeth and lower
    lip is the mouth's own shadow, not an outline). Medians over the columns, (upper, lower).
    The seam stretched along the lips (seam_shift's opening half left out) reads 15-73 at the lower
    lip at mouth_open 0.6 and 20-83 at 1.0 on the kit's closed mouths. The renderer reads at most 12.0 at the
    lower lips at these openings (p05 at 1.0; 15.4 at 0.8, where no outline shows at 8x): the lip band pressed
    into the lip beyond (SEAM_PRESS) brings the lip's lighter body within 2-3 px of its edge, so the lip's own
    darker inner margin reads against it. Sampling one row across the band read at most 8.3 (12.6 at 0.8),
    and drew vertical streaks along the lips.
    """
    up, lo = [], []
    for top, bot, col in opened_columns(enc, frame, weights, 4):
        up.append(min(np.median(col[top - 5:top - 2]), col[top:top + 4].max()) - col[top - 2:top + 2].min())
        lo.append(min(np.median(col[bot + 3:bot + 6]), np.median(col[bot - 2:bot])) - col[bot - 1:bot + 3].min())
    return float(np.median(up)), float(np.median(lo))


def test_an_opened_closed_mouth_has_no_dark_ring_along_its_inner_lips(closed, cpu):
    # A closed mouth's lips meet at a dark seam line; opened, the lips keep their own colour up to their
    # new edges, where the interior (teeth under the upper lip) begins: no dark outline between them
    # (the seam stretched along the upper lip read 11-14 grey levels darker than lip and teeth).
    c = Controls.neutral(3, 25.0)
    c.mouth_open[:] = [0.36, 0.6, 1.0]
    for name, enc in closed.items():
        for frame, w, opening in zip(cpu.render(enc, c, head_motion=False), mode_weights(enc, c), c.mouth_open):
            upper, lower = inner_lip_rings(enc, frame, w)
            assert upper < 13 and lower < 13, (name, float(opening), upper, lower)


def flat_lip_share(enc: Encoding, frame: np.ndarray, weights: np.ndarray) -> float:
    """The share of row-to-row steps under half a grey level in the lips' band along the opened mouth (0: all textured).

    Per column across the middle half of the drawn interior, the seam depth's worth of rows (see
    seam_shift) just outside each inner lip, averaged over both lips. A lip that samples one row
    across that band is flat down each column: vertical streaks.
    """
    n = int(round(seam_depth(enc.geometry)))
    flat = []
    for top, bot, col in opened_columns(enc, frame, weights, 2):
        flat.append((np.abs(np.diff(col[top - 2 - n:top - 1])) < 0.5).mean())
        flat.append((np.abs(np.diff(col[bot + 2:bot + 3 + n])) < 0.5).mean())
    return float(np.mean(flat))


def test_opened_lips_keep_their_texture_up_to_the_opening(closed, cpu):
    # Opening, each lip's edge samples no closer than the seam depth to the seam; sampling the one row at that
    # depth across the whole band drew vertical streaks along both lips (flat shares 0.25-0.63 on p01, p05, p06
    # and p10 over these openings, 0.01-0.08 with the band pressed into the lip beyond, SEAM_PRESS).
    c = Controls.neutral(3, 25.0)
    c.mouth_open[:] = [0.2, 0.36, 0.6]
    p10 = cv2.cvtColor(cv2.imread(str(MEDIA / "p10_small_face_large_frame_obama.jpg")), cv2.COLOR_BGR2RGB)
    for name, enc in {**closed, "p10": encode_image(p10)}.items():
        shares = [flat_lip_share(enc, frame, w) for frame, w in zip(cpu.render(enc, c, head_motion=False), mode_weights(enc, c))]
        assert np.mean(shares) < 0.15, (name, shares)


def test_the_interior_takes_the_portraits_grain_and_softness(closed, cpu):
    # The same face (same landmarks) as photographed, with more sensor noise, and out of focus.
    enc = closed["p06"]
    image = enc.image.astype(np.float32)
    noisy = np.clip(image + np.random.default_rng(0).normal(0.0, 6.0, image.shape), 0, 255).astype(np.uint8)
    soft = cv2.GaussianBlur(enc.image, (0, 0), 2.0)
    c = Controls.neutral(1, 25.0)
    c.mouth_open[:] = 1.0
    measured = {}
    for label, img in (("photo", enc.image), ("noisy", noisy), ("soft", soft)):
        e = encode_from_landmarks(img, enc.landmarks)
        w = mode_weights(e, c)[0]
        frame = cpu.render(e, c, head_motion=False)[0]
        lum = frame.astype(np.float32) @ LUMA
        r = interior_regions(e, frame, w)
        gx, gy = cv2.Sobel(lum, cv2.CV_32F, 1, 0) / 8, cv2.Sobel(lum, cv2.CV_32F, 0, 1) / 8
        measured[label] = (grain_level(lum, r["throat"]), float(np.percentile(np.hypot(gx, gy)[r["all"]], 95)), e.geometry)
    (g_photo, edge_photo, geo), (g_noisy, _, geo_noisy), (_, edge_soft, geo_soft) = (measured[k] for k in ("photo", "noisy", "soft"))
    assert geo_noisy.grain > 2 * geo.grain and geo_soft.blur > geo.blur + 1.0  # the encoder measures both
    assert g_noisy > 2 * g_photo, (g_photo, g_noisy)  # a grainier photo, a grainier mouth
    assert edge_soft < 0.7 * edge_photo, (edge_photo, edge_soft)  # a softer photo, softer teeth edges


def test_the_inner_lips_never_cross_at_any_opening(astro, cam, closed, cpu):
    bow_tie = np.array([[0, 0], [2, 2], [2, 0], [0, 2]], np.float32)
    assert crossings(bow_tie) and not crossings(bow_tie[[0, 2, 1, 3]])  # the check tells a crossing from a simple outline
    openings = [0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.2]
    for name, enc in {"astro": astro, "cam": cam, **closed}.items():
        c = Controls.neutral(4 * len(openings), 25.0)
        c.mouth_open[:] = openings * 4
        c.mouth_spread[len(openings):2 * len(openings)] = 1.0
        c.mouth_round[2 * len(openings):3 * len(openings)] = 1.0
        c.smile[3 * len(openings):] = 1.0
        for k, w in enumerate(mode_weights(enc, c)):
            poly = inner_lip_polygon(enc, w)
            assert not crossings(poly), (name, k, crossings(poly)[:3])
            # The drawn interior is one region inside those lips (no blobs at the corners, no holes); a
            # mouth just parting may show as specks of a few pixels first, which are not counted.
            drawn = drawn_interior(enc, w, 0.5).astype(np.uint8)
            if drawn.sum() >= 6:
                areas = cv2.connectedComponentsWithStats(drawn)[2][1:, cv2.CC_STAT_AREA]
                assert (areas >= 6).sum() <= 1, (name, k, areas)
                assert cv2.connectedComponents(1 - drawn)[0] == 2, (name, k)


def test_turned_face_opens_inside_its_oval(cam, cpu):
    # The cameraman is near profile: his opening (and everything else) stays inside the face oval,
    # so no background beside the lips or below the chin is dragged or painted over.
    import cv2

    n = 4
    c = Controls.neutral(n, 25.0)
    c.mouth_open[:] = 1.0
    c.mouth_round[:] = [0.0, 1.0, 0.0, 0.0]  # rounding opens a little further
    c.mouth_spread[:] = [0.0, 0.0, 1.0, 0.0]
    c.smile[:] = [0.0, 0.0, 1.0, -1.0]
    c.blink[:] = [0.0, 0.0, 0.0, 1.0]
    c.brow[:] = [0.0, 0.0, 1.0, -1.0]
    frames = cpu.render(cam, c, head_motion=False)
    hull = np.zeros(cam.image.shape[:2], np.uint8)
    cv2.fillConvexPoly(hull, np.round(L.face_hull(cam.landmarks)).astype(np.int32), 1)
    pad = int(np.ceil(0.06 * cam.geometry.face_width))  # a few pixels: the feather of the motion at the outline
    allowed = cv2.dilate(hull, np.ones((2 * pad + 1, 2 * pad + 1), np.uint8)).astype(bool)
    for frame in frames:
        changed = np.any(frame != cam.image, -1)
        assert changed[hull.astype(bool)].sum() > 20  # the face did move
        assert not changed[~allowed].any(), np.argwhere(changed & ~allowed)[:5]
    # Turned away, the widest opening is a small fraction of the face height, not a third of it.
    assert cam.geometry.max_gap < 0.15 * cam.geometry.face_height


def test_a_three_quarter_turn_opens_past_its_parted_lips_for_speech_and_closes(cpu):
    # p08 (Vermeer, head turned about 3/4, lips parted at rest): the widest opening once shrank with
    # the turn to half the face's (0.11 face heights), so speech's widest opening was her own parted
    # lips (MediaPipe: 0.036 against her rest's 0.041) and the mouth barely moved. A jaw drops as far
    # in a 3/4 view; only near profile does the photo not show it.
    from gpu_service.talking_head.controls import SPEECH_OPEN

    img = cv2.cvtColor(cv2.imread(str(MEDIA / "p08_painting_turned_head_pearl_earring.jpg")), cv2.COLOR_BGR2RGB)
    enc = encode_image(img)
    c = Controls.neutral(3, 25.0)
    c.mouth_open[:] = [enc.geometry.rest_gap / enc.geometry.max_gap, SPEECH_OPEN, 0.0]
    rest, wide, shut = (inner_gap(f) for f in cpu.render(enc, c, head_motion=False))
    assert rest > 0.02 * enc.geometry.face_height  # her own parted lips, as painted
    assert wide >= 1.3 * rest, (rest, wide)
    assert shut <= 0.01 * enc.geometry.face_height, shut


@pytest.mark.parametrize("name", sorted(CLOSED_MOUTHS))
def test_teeth_in_shadow_take_the_mouths_warm_light(closed, name):
    # Light bounced off the cheeks and tongue warms a tooth as it darkens; scaled teeth alone kept the
    # lit teeth's chromaticity and went a cold grey against the warm interior and face.
    from gpu_service.talking_head.shading import mouth_layout

    enc = closed[name]
    lay = mouth_layout(enc)
    m = lay.lower_cover > 0.5
    px = np.stack([lay.lower_rgb[c][m] for c in range(3)], -1).astype(np.float32)
    lum = px @ LUMA
    lab = cv2.cvtColor((np.clip(px, 0, 255) / 255.0)[None].astype(np.float32), cv2.COLOR_RGB2LAB)[0]
    lit = cv2.cvtColor((np.asarray(enc.teeth_rgb, np.float32) / 255.0)[None, None], cv2.COLOR_RGB2LAB)[0, 0]
    dark = lum <= np.percentile(lum, 20)
    # redder than the lit teeth, towards the cavity, and still a tooth: not as red as the cavity
    cavity = cv2.cvtColor((np.asarray(enc.palette[0], np.float32) / 255.0)[None, None], cv2.COLOR_RGB2LAB)[0, 0]
    assert lab[dark, 1].mean() >= lit[1] + 2.0, (lab[dark, 1].mean(), lit[1])
    assert lab[dark, 1].mean() <= lit[1] + 0.5 * (cavity[1] - lit[1]), (lab[dark, 1].mean(), lit[1], cavity[1])


def test_blink_closes_the_eyes(astro, cpu):
    c = rest_controls(astro, 2)
    c.blink[:] = [0.0, 1.0]
    open_, shut = cpu.render(astro, c, head_motion=False)
    assert eye_aperture(shut) < 0.5 * eye_aperture(open_)
    # The shut eye is covered by smooth lid skin like the skin around it, not a smear of iris and lashes.
    import cv2

    lm = astro.landmarks
    for upper, lower in ((L.EYE_LEFT_UPPER, L.EYE_LEFT_LOWER), (L.EYE_RIGHT_UPPER, L.EYE_RIGHT_LOWER)):
        eye = np.zeros(astro.image.shape[:2], np.uint8)
        cv2.fillPoly(eye, [np.round(lm[upper + lower[::-1]]).astype(np.int32)], 1)
        eye = cv2.erode(eye, np.ones((3, 3), np.uint8)).astype(bool)
        lum = shut.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        open_lum = open_.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        rows = np.nonzero(eye.any(1))[0]
        lid = eye & (np.arange(eye.shape[0])[:, None] < rows[0] + 0.6 * (rows[-1] - rows[0] + 1))  # above the lash line
        x0, x1 = np.nonzero(eye.any(0))[0][[0, -1]]
        cols = np.arange(eye.shape[1])[None, :]
        lid &= (cols >= x0 + 0.2 * (x1 - x0)) & (cols <= x1 - 0.2 * (x1 - x0))  # clear of the corners' lash line
        # as light as the skin around the eye (a real shut lid is: v03, test_a_shut_eye_is_about_as_light_as...)
        whole = np.zeros(astro.image.shape[:2], np.uint8)
        cv2.fillPoly(whole, [np.round(lm[upper + lower[::-1]]).astype(np.int32)], 1)
        ring = cv2.dilate(whole, np.ones((11, 11), np.uint8)).astype(bool) & ~cv2.dilate(whole, np.ones((7, 7), np.uint8)).astype(bool)
        skin_around = np.median(open_lum[ring])
        # (smooth: a shut lid lightens towards its lashes, as v03's real one does, but an iris or lashes
        # smeared into it would leave detail finer than that)
        # (measured 11-16 where the open eye's iris and lashes give 26-27 there)
        fine = float(np.abs(lum - cv2.GaussianBlur(lum, (0, 0), 1.0))[lid].mean())
        open_fine = float(np.abs(open_lum - cv2.GaussianBlur(open_lum, (0, 0), 1.0))[lid].mean())
        assert lid.sum() > 10 and 0.8 <= lum[lid].mean() / skin_around <= 1.25 and fine < 0.7 * open_fine, (
            lum[lid].mean(), skin_around, fine, open_fine)


def _shut_eyes(enc: Encoding, cpu: Renderer):
    """(open, shut) luminance frames of a blink, and per eye its polygon mask at rest."""
    c = Controls.neutral(2, 25.0)
    c.blink[:] = [0.0, 1.0]
    open_, shut = (f.astype(np.float32) @ LUMA for f in cpu.render(enc, c, head_motion=False))
    lm, eyes = enc.frame_landmarks, []
    for upper, lower in ((L.EYE_LEFT_UPPER, L.EYE_LEFT_LOWER), (L.EYE_RIGHT_UPPER, L.EYE_RIGHT_LOWER)):
        eye = np.zeros(open_.shape, np.uint8)
        cv2.fillPoly(eye, [np.round(lm[upper + lower[::-1]]).astype(np.int32)], 1)
        eyes.append(eye)
    return open_, shut, eyes


@pytest.mark.parametrize("name", ["p01_neutral_closed_mouth_grid_bbaf2n_f000.png", "p05_glasses_older_woman_grace_hopper.jpg",
                                  "p06_darker_skin_closed_mouth_grid_swiz3n_f074.png",
                                  "p10_small_face_large_frame_obama.jpg"])
def test_a_shut_eyes_lash_line_is_no_darker_than_the_portraits_own_eye(name, cpu):
    # The line a blink draws along the shut lid is this picture's lashes: a fixed near-black line was
    # darker than anything in p01's and p06's soft eyes (1st percentile 26 and 21 against their own 49
    # and 54) and read as drawn on.
    open_, shut, eyes = _shut_eyes(encode_image(cv2.cvtColor(cv2.imread(str(MEDIA / name)), cv2.COLOR_BGR2RGB)), cpu)
    for eye in eyes:
        near = cv2.dilate(eye, np.ones((5, 5), np.uint8)).astype(bool)
        assert np.percentile(shut[near], 1) >= np.percentile(open_[near], 1) - 8.0, name


@pytest.mark.parametrize("name", ["p01_neutral_closed_mouth_grid_bbaf2n_f000.png", "p05_glasses_older_woman_grace_hopper.jpg",
                                  "p06_darker_skin_closed_mouth_grid_swiz3n_f074.png"])
def test_a_shut_eye_is_about_as_light_as_the_skin_around_it(name, cpu):
    # A real blink (v03, the kit's GRID talker, frames 28 and 44): the shut eye's outline, lid and lashes,
    # reads 0.87-1.02 of the lightness (L*) of the 3 px ring of skin around it. The lid sampled from the
    # socket's shade above the eye read 0.77-0.84 on p01, p05 and p06 (and 0.81-0.89 on v03's own frame);
    # lit like the ring, 0.86-1.01 (v03's own frame 0.86-0.88).
    img = cv2.cvtColor(cv2.imread(str(MEDIA / name)), cv2.COLOR_BGR2RGB)
    enc = encode_image(img)
    c = Controls.neutral(2, 25.0)
    c.blink[:] = [0.0, 1.0]
    open_, shut = (cv2.cvtColor(f, cv2.COLOR_RGB2LAB)[..., 0].astype(np.float32)
                   for f in cpu.render(enc, c, head_motion=False))
    lm = enc.frame_landmarks
    for upper, lower in ((L.EYE_LEFT_UPPER, L.EYE_LEFT_LOWER), (L.EYE_RIGHT_UPPER, L.EYE_RIGHT_LOWER)):
        eye = np.zeros(open_.shape, np.uint8)
        cv2.fillPoly(eye, [np.round(lm[upper + lower[::-1]]).astype(np.int32)], 1)
        ring = cv2.dilate(eye, np.ones((9, 9), np.uint8)).astype(bool) & ~cv2.dilate(eye, np.ones((3, 3), np.uint8)).astype(bool)
        ratio = shut[eye.astype(bool)].mean() / open_[ring].mean()
        assert 0.85 <= ratio <= 1.12, (name, ratio)


def test_a_shut_lid_lightens_towards_its_lashes():
    # v03's shut lid, across its middle: 95 at the top, 108-115 by the lash line (the socket's shade above,
    # the lid lit where it bulges over the eye); the drawn lid darkened towards its edge.
    from gpu_service.talking_head.shading import shade_eyes

    t = np.linspace(-1.0, 9.0, 11, dtype=np.float32)[:, None]
    eye_map = np.stack([t, np.full_like(t, 10.0), np.zeros_like(t)])
    alpha, bright, lash = shade_eyes(eye_map, 1.0, 1.0, np.clip)
    above = (t[:, 0] >= 0) & (lash[:, 0] == 0)
    assert np.all(np.diff(bright[above, 0]) >= 0) and bright[above, 0][-1] >= 1.1 * bright[above, 0][0]


def test_a_shut_lid_keeps_the_skins_grain(cpu):
    # p05's grainy photo: the skin around her eyes has a fine texture of 19-29 grey levels (mean |x - blur|);
    # a lid of blurred skin measured 3-4 and read as a smooth sticker. Its upper part (above the lashes):
    open_, shut, eyes = _shut_eyes(encode_image(kit_portrait("p05")), cpu)
    fine = np.abs(shut - cv2.GaussianBlur(shut, (0, 0), 1.5))
    for eye in eyes:
        eye = cv2.erode(eye, np.ones((3, 3), np.uint8)).astype(bool)
        rows = np.nonzero(eye.any(1))[0]
        lid = eye & (np.arange(eye.shape[0])[:, None] < rows[0] + 0.6 * (rows[-1] - rows[0] + 1))
        assert lid.sum() > 100 and fine[lid].mean() >= 6.0, fine[lid].mean()


@pytest.mark.parametrize("name", ["p01", "p05", "p06"])
def test_a_shut_lids_skin_is_as_grainy_as_the_skin_above_the_eye(name):
    # The skin a blink draws (Encoding.eye_skin) over the middle of the eye, against the portrait's skin 0.3-1
    # eye openings above it, in fine texture (RGB high-pass at 1.5 px): with its grain interpolated and clipped
    # at twice its median, 0.39-0.44 on these portraits (0.37-0.68 over the kit), a smooth sticker on a grainy
    # photo; copied whole and clipped at three times, 0.61-0.70 (0.52-0.88 over the kit).
    enc = encode_image(kit_portrait(name))
    t, g, _ = enc.eye_map
    ex0, ey0, ex1, ey1 = enc.eye_patch
    cx0, cy0 = enc.crop[0], enc.crop[1]
    portrait = enc.image[cy0 + ey0:cy0 + ey1, cx0 + ex0:cx0 + ex1].astype(np.float32)
    fine = lambda im: im - cv2.GaussianBlur(im, (0, 0), 1.5)  # noqa: E731
    middle = g > 0.6 * g.max()
    lid = middle & (t > 1) & (t < g - 1)
    skin = middle & (t < -0.3 * g.max()) & (t > -1.0 * g.max())
    ratio = fine(enc.eye_skin.astype(np.float32))[lid].std(0).mean() / fine(portrait)[skin].std(0).mean()
    assert lid.sum() > 40 and skin.sum() > 40 and ratio >= 0.55, (name, ratio)


def test_a_shut_lid_is_lit_across_the_eye_as_the_skin_around_it():
    # p01 lit from one side (a ramp of 0.4 -> 1.0 across the face, as a window beside the sitter) against
    # p01 as it is: across each eye, the lid's lit third over its other third must rise with the light (by
    # 0.9 and 0.5 of the light's own rise; one colour per eye drew the first 0.12 of it). A
    # real shut lid is lit as the skin around its eye (v03's, frame 44: 135-139 at his outer corners, 67-75
    # by the nose, following the skin under the eye column by column, r 0.93 and 0.89). One colour per eye
    # drew each lid flat from corner to corner whatever the light: a pale almond on the shaded side.
    image = kit_portrait("p01").astype(np.float32)
    lm = find_landmarks(image.astype(np.uint8))
    x0, x1 = lm[L.FACE_OVAL][:, 0].min(), lm[L.FACE_OVAL][:, 0].max()
    ramp = np.clip(0.4 + 0.6 * (np.arange(image.shape[1]) - x0) / (x1 - x0), 0.3, 1.0).astype(np.float32)

    def across(img: np.ndarray) -> tuple[list[float], list[float]]:
        """Per eye, the lid's right third over its left third (luma of Encoding.eye_skin), and the ramp's."""
        enc = encode_image(img)
        t, g, which = enc.eye_map
        lum = enc.eye_skin.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        lid = (g > 0.5 * g.max()) & (t > 1) & (t < g - 1)
        lids, lights = [], []
        for eye in (0.0, 1.0):
            mine = lid & (which == eye)
            cols = np.flatnonzero(mine.any(axis=0))
            assert len(cols) > 12
            left, right = cols[: len(cols) // 3], cols[-(len(cols) // 3):]
            lids.append(float(lum[:, right][mine[:, right]].mean() / lum[:, left][mine[:, left]].mean()))
            xs = enc.crop.x0 + enc.eye_patch.x0 + np.array([left.mean(), right.mean()])
            lights.append(float(np.interp(xs[1], np.arange(len(ramp)), ramp) / np.interp(xs[0], np.arange(len(ramp)), ramp)))
        return lids, lights

    even, _ = across(image.astype(np.uint8))
    lit, light = across(np.clip(image * ramp[None, :, None], 0, 255).astype(np.uint8))
    for eye in (0, 1):
        assert lit[eye] / even[eye] >= 1.0 + 0.4 * (light[eye] - 1.0), (eye, round(lit[eye] / even[eye], 3), round(light[eye], 3))


def test_a_black_and_white_photos_shut_lid_is_grey(cpu):
    # p05 as a black-and-white photo (the kit's p04 is one): the lid's flush (LID_FLUSH, a colour portrait's
    # redder lid skin) drew its lids pink, a tint of 3.8 levels on the kit's p04 where its skin has none.
    grey = np.repeat(cv2.cvtColor(kit_portrait("p05"), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=-1)
    enc = encode_image(grey)
    c = Controls.neutral(2, 25.0)
    c.blink[:] = [0.0, 1.0]
    open_, shut = (f.astype(np.int16) for f in cpu.render(enc, c, head_motion=False))
    lid = np.abs(shut - open_).max(-1) > 8  # where the blink drew
    assert lid.sum() > 100
    tint = shut.max(-1) - shut.min(-1)
    assert tint[lid].max() <= 1, (float(tint[lid].mean()), int(tint[lid].max()))


def test_speech_driven_clip_keeps_the_rest_of_the_face(astro, cpu, piper_engine):
    from gpu_service.talking_head.driving import drive

    speech = piper_engine.synthesize(SpeechRequest(text="Maybe we should open the window."))
    c = drive(speech.duration_s, 25, phonemes=speech.phonemes, audio=speech.audio, sample_rate=speech.sample_rate, head_motion=False)
    assert c.n_frames == round(speech.duration_s * 25)
    frames = cpu.render(astro, c, head_motion=False)
    assert len(frames) == c.n_frames
    lm = astro.landmarks
    keep = np.ones(astro.image.shape[:2], bool)
    for group, pad in ((L.OUTER_UPPER + L.OUTER_LOWER, 0.45), (L.EYE_LEFT_UPPER + L.BROW_LEFT, 0.25), (L.EYE_RIGHT_UPPER + L.BROW_RIGHT, 0.25)):
        pts = lm[group]
        lo, hi = pts.min(0), pts.max(0)
        m = pad * astro.geometry.face_height
        keep[int(lo[1] - m) : int(hi[1] + m * (2.2 if group[0] == 61 else 1.0)), int(lo[0] - m) : int(hi[0] + m)] = False
    grey = lambda im: im.astype(np.float32).mean(-1)  # noqa: E731
    scores = []
    for frame in frames[:: max(1, len(frames) // 12)]:
        _, smap = structural_similarity(grey(astro.image), grey(frame), data_range=255, full=True)
        scores.append(float(smap[keep].mean()))
    assert min(scores) >= 0.95, scores
    # The speech moved the mouth: closed it on m/b/p and opened it again. Speech opens to 0.08 face
    # heights at most (controls.SPEECH_OPEN), about her smile's own gap (0.068), so around her rest, not past it.
    gaps = np.array(mode_weights(astro, c)[:, 0])
    assert gaps.max() - gaps.min() > 0.03 * astro.geometry.face_height


def random_controls(n: int, seed: int, **ranges: tuple[float, float]) -> Controls:
    """n frames of still controls but for the named ones, drawn uniformly from their (low, high) in order."""
    rng = np.random.default_rng(seed)
    c = Controls.neutral(n, 25.0)
    for name, (lo, hi) in ranges.items():
        getattr(c, name)[:] = rng.uniform(lo, hi, n)
    return c


def assert_paths_agree(a: np.ndarray, b: np.ndarray) -> None:
    """Two render paths' frames differ by a fraction of a grey level on average, a few levels at most."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.mean() < 0.1 and diff.max() <= 12, (float(diff.mean()), int(diff.max()))


def test_cpu_and_torch_paths_agree(astro, closed, cpu):
    c = random_controls(10, 0, mouth_open=(0, 1), blink=(0, 1), smile=(-1, 1), mouth_round=(0, 1),
                        head_roll=(-0.05, 0.05), head_dy=(-0.03, 0.03), gaze_x=(-0.1, 0.1), gaze_y=(-0.05, 0.05))
    torch_path = Renderer("cpu", backend="torch", batch=4)
    assert_paths_agree(cpu.render(astro, c), torch_path.render(astro, c))
    # A closed mouth's interior is all drawn (teeth, tongue, throat, grain): the same on both paths.
    c.mouth_open[:] = np.linspace(0.2, 1.2, 10)
    assert_paths_agree(cpu.render(closed["p06"], c), torch_path.render(closed["p06"], c))


@pytest.mark.parametrize("backend", ["cv2", "torch"])
def test_a_clip_rendered_in_blocks_is_the_clip_rendered_whole(astro, piper_engine, backend):
    from gpu_service.talking_head.driving import drive
    from gpu_service.talking_head.engines.landmark import LandmarkFrameStream
    from gpu_service.talking_head.protocol import FrameStream

    speech = piper_engine.synthesize(SpeechRequest(text="Bring the map, please."))
    c = drive(speech.duration_s, 25, phonemes=speech.phonemes, audio=speech.audio, sample_rate=speech.sample_rate,
              seed=3, head_motion=True).slice(0, 30)
    # Head motion, a blink and speech (which opens the mouth to controls.SPEECH_OPEN, 0.36, at most).
    assert c.head_roll.any() and c.blink.any() and c.mouth_open.max() > 0.2
    renderer = Renderer("cpu", backend=backend, batch=4)
    whole = renderer.render(astro, c, head_motion=True)
    stream = LandmarkFrameStream(renderer, astro, "astro", 25.0, head_motion=True)
    assert isinstance(stream, FrameStream) and stream.size == (astro.image.shape[1], astro.image.shape[0])
    # Blocks of 40 ms (one frame), empty, and not aligned to the torch batch of 4.
    cuts = [0, 1, 2, 2, 9, 16, 23, 30]
    blocks = [stream.render(c.slice(a, b)) for a, b in zip(cuts, cuts[1:])]
    assert [len(b) for b in blocks] == [b - a for a, b in zip(cuts, cuts[1:])]
    assert stream.frames_rendered == 30
    assert np.array_equal(np.concatenate(blocks), whole)
    with pytest.raises(Exception, match="fps"):
        stream.render(Controls.neutral(2, 30.0))
    # A stream that adds its own blinks and head drift carries them on across blocks too.
    from gpu_service.talking_head.driving import IdleMotion

    still = Controls.neutral(30, 25.0)
    idle_whole = renderer.render(astro, IdleMotion(25.0, seed=7).apply(still, 0))
    live = LandmarkFrameStream(renderer, astro, "astro", 25.0, head_motion=True, idle=IdleMotion(25.0, seed=7))
    idle_blocks = np.concatenate([live.render(still.slice(a, b)) for a, b in zip(cuts, cuts[1:])])
    assert np.array_equal(idle_blocks, idle_whole) and not np.array_equal(idle_whole[0], idle_whole[-1])


@pytest.mark.gpu
def test_torch_on_cuda_renders_what_the_cpu_path_renders(astro, cpu):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is false)")
    from gpu_service.talking_head.engines.landmark import LandmarkFrameStream

    c = random_controls(24, 1, mouth_open=(0, 1), mouth_spread=(0, 1), lip_tuck=(0, 0.5), blink=(0, 1),
                        brow=(-1, 1), head_roll=(-0.05, 0.05), head_dx=(-0.02, 0.02), head_dy=(-0.03, 0.03))
    c.head_roll[:3] = c.head_dx[:3] = c.head_dy[:3] = 0.0  # still frames among moving ones
    cuda = Renderer("cuda", batch=16)
    assert cuda.backend == "torch"
    b = cuda.render(astro, c)
    assert_paths_agree(cpu.render(astro, c), b)
    # In blocks of one to seven frames (not the batch of 16) the CUDA frames are those of the whole clip.
    stream = LandmarkFrameStream(cuda, astro, "astro", 25.0, head_motion=True)
    cuts = [0, 1, 8, 15, 24]
    blocks = np.concatenate([stream.render(c.slice(lo, hi)) for lo, hi in zip(cuts, cuts[1:])])
    assert np.abs(blocks.astype(np.int16) - b.astype(np.int16)).max() <= 1
