"""Portraits as users send them: a transparent PNG on a background, two faces, a small face in a large frame.

Real kit portraits (tests/fixtures/media: p09 cut out with a soft machine-made matte, p10 a full
figure whose face is 13% of the height, p11 two faces side by side) and the real encoder and renderer.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from avatar_contracts.media import Background, image_has_alpha, parse_background
from gpu_service.talking_head import landmarks as L
from gpu_service.talking_head.controls import Controls
from gpu_service.talking_head.encoding import (WORK_FACE_MAX, WORK_FACE_MIN, Encoding, decode_image, encode_image,
                                               image_key)
from gpu_service.talking_head.renderer import Renderer
from gpu_service.talking_head.video import read_frames
from tests.conftest import running_app

MEDIA = Path(__file__).resolve().parents[1] / "fixtures" / "media"
P09 = MEDIA / "p09_transparent_background_rgba_obama.png"
P10 = MEDIA / "p10_small_face_large_frame_obama.jpg"
P11 = MEDIA / "p11_two_faces_obama_biden.jpg"
P05 = MEDIA / "p05_glasses_older_woman_grace_hopper.jpg"
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
LIMIT = 10 * 1024 * 1024


def rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))


def rgba(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(colour float 0..1, alpha float 0..1) of an RGBA PNG as stored."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return raw[..., 2::-1].astype(np.float32) / 255.0, raw[..., 3].astype(np.float32) / 255.0


def png_rgba(colour: np.ndarray, alpha: np.ndarray) -> bytes:
    """RGBA PNG bytes from colour (float 0..1, RGB) and alpha (float 0..1)."""
    arr = np.dstack([np.round(colour[..., ::-1] * 255), np.round(alpha * 255)]).astype(np.uint8)
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def colour_bg(hex_colour: str) -> Background:
    return parse_background(hex_colour, LIMIT, 40_000_000)


def rim_shares(out: np.ndarray, alpha: np.ndarray, bg_lum: float, tol: float = 8.0) -> tuple[float, float]:
    """Shares of the alpha edge's ring that are darker than both sides, and lighter than both, by more than `tol`.

    A ring pixel (0.1 < alpha < 0.9, opaque pixels within 3 px) is a blend of the background and
    the portrait beside it, so a correct composite is not darker than both the background's
    luminance and the darkest opaque pixel within 3 px (a dark fringe is), nor lighter than both
    the background and the lightest (a light fringe is).
    """
    lum = out.astype(np.float32) @ LUMA
    opaque = alpha >= 0.999
    k = np.ones((7, 7), np.uint8)
    darkest = cv2.erode(np.where(opaque, lum, 1e4).astype(np.float32), k)
    lightest = cv2.dilate(np.where(opaque, lum, -1e4).astype(np.float32), k)
    ring = (alpha > 0.1) & (alpha < 0.9) & (darkest < 1e3)
    assert ring.sum() > 50
    dark = np.minimum(darkest[ring], bg_lum) - lum[ring] > tol
    light = lum[ring] - np.maximum(lightest[ring], bg_lum) > tol
    return float(dark.mean()), float(light.mean())


def test_png_and_webp_headers_say_whether_they_can_be_transparent():
    from PIL import Image

    def encoded(mode: str, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (70, 70), 0).save(buf, format=fmt, **kw)
        return buf.getvalue()

    assert image_has_alpha(P09.read_bytes())
    assert not image_has_alpha(P10.read_bytes()) and not image_has_alpha(P11.read_bytes())
    assert image_has_alpha(encoded("LA", "PNG")) and not image_has_alpha(encoded("L", "PNG"))
    assert image_has_alpha(encoded("P", "PNG", transparency=0)) and not image_has_alpha(encoded("RGB", "PNG"))
    assert image_has_alpha(encoded("RGBA", "WEBP", lossless=True)) and image_has_alpha(encoded("RGBA", "WEBP"))
    assert not image_has_alpha(encoded("RGB", "WEBP", lossless=True)) and not image_has_alpha(encoded("RGB", "WEBP"))


def test_p09_is_composited_on_its_background_with_no_rim():
    """The kit's cut-out: clear pixels are the background colour, opaque ones the photo, and the soft edge not
    darker (nor lighter) than both the background and the face beside it, but for a few pixels of the
    machine-made matte's own halo (the kit's README: "a slight halo at the ears and hair")."""
    colour, alpha = rgba(P09)
    raw = P09.read_bytes()
    shares = {}
    for hex_colour in ("#e9e6e1", "#1a1a1a", "#20a040"):
        bg = np.array(colour_bg(hex_colour).colour, np.float32)
        out = decode_image(raw, LIMIT, background=colour_bg(hex_colour))
        h, w = out.shape[:2]
        a = alpha[:h, :w]
        assert out.shape == (h, w, 3) and (h, w) == (alpha.shape[0] - alpha.shape[0] % 2, alpha.shape[1] - alpha.shape[1] % 2)
        clear = cv2.erode((a == 0).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert np.array_equal(out[clear], np.broadcast_to(bg.astype(np.uint8), out[clear].shape))  # the background where alpha = 0
        opaque = a == 1.0
        assert np.array_equal(out[opaque], np.round(colour[:h, :w][opaque] * 255).astype(np.uint8))  # the photo where opaque
        dark, light = rim_shares(out, a, float(bg @ LUMA))
        assert dark <= 0.03 and light <= 0.08, (hex_colour, dark, light)
        shares[hex_colour] = light

    # The measure tells a fringe from a clean edge: edge pixels that lost their colour (black, as an RGBA image
    # resized without premultiplying leaves them) ring the head in dark on every background; the stored edge
    # colours used as they are keep the light window and curtain the cut-out was made from, on a dark background.
    a3 = alpha[..., None]
    for hex_colour in ("#e9e6e1", "#1a1a1a", "#20a040"):
        bg = np.array(colour_bg(hex_colour).colour, np.float32)
        lost = np.clip(a3 * np.where(a3 < 0.999, 0.0, colour) * 255 + (1 - a3) * bg + 0.5, 0, 255).astype(np.uint8)
        assert rim_shares(lost, alpha, float(bg @ LUMA))[0] > 0.2
    dark_bg = np.array([26, 26, 26], np.float32)
    as_stored = np.clip(a3 * colour * 255 + (1 - a3) * dark_bg + 0.5, 0, 255).astype(np.uint8)
    stored_light = rim_shares(as_stored, alpha, float(dark_bg @ LUMA))[1]
    assert stored_light > 0.12 and shares["#1a1a1a"] < 0.6 * stored_light  # the estimated edge colours are cleaner


def test_an_exporters_fill_under_the_clear_pixels_is_not_mistaken_for_the_edge():
    """A soft-edged disc whose clear pixels are black (as many exporters write them) and whose edge pixels hold the
    disc's own colour: the composite is exactly the ideal straight-alpha one, with no dark or bright ring."""
    yy, xx = np.mgrid[:160, :160].astype(np.float32)
    alpha = np.clip((50.0 - np.hypot(xx - 80, yy - 80)) / 8.0 + 0.5, 0.0, 1.0)
    skin = np.array([0.75, 0.55, 0.45], np.float32)
    colour = np.where(alpha[..., None] > 0, skin, 0.0).astype(np.float32)
    raw = png_rgba(colour, alpha)
    bg = np.array([40, 60, 200], np.float32)
    out = decode_image(raw, LIMIT, background=colour_bg("#283cc8")).astype(np.float32)
    a = np.round(alpha * 255)[..., None] / 255.0
    ideal = a * np.round(skin * 255) + (1 - a) * bg
    assert np.abs(out - ideal).max() <= 1.0
    assert rim_shares(out.astype(np.uint8), alpha, float(bg @ LUMA)) == (0.0, 0.0)


def test_an_image_background_fills_the_clear_pixels_scaled_to_cover():
    colour, alpha = rgba(P09)
    h, w = alpha.shape[0] // 2 * 2, alpha.shape[1] // 2 * 2
    # A 64x32 two-colour image: scaled to cover the 272x340 portrait it is cut around its middle.
    pattern = np.zeros((32, 64, 3), np.uint8)
    pattern[:, :32] = (200, 30, 30)
    pattern[:, 32:] = (30, 30, 200)
    ok, buf = cv2.imencode(".png", pattern[..., ::-1])
    out = decode_image(P09.read_bytes(), LIMIT, background=Background(image=buf.tobytes()))
    clear = cv2.erode((alpha[:h, :w] == 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    left, right = clear.copy(), clear.copy()
    left[:, w // 2 - 16:] = False  # the colours meet in the middle, blurred by the 10x upscaling
    right[:, :w // 2 + 16] = False
    assert np.abs(out[left].astype(int) - (200, 30, 30)).max() <= 2
    assert np.abs(out[right].astype(int) - (30, 30, 200)).max() <= 2


def test_the_background_is_part_of_the_cache_key_of_a_transparent_image_only():
    p09, p11 = P09.read_bytes(), P11.read_bytes()
    grey, green = colour_bg("#e9e6e1"), colour_bg("#20a040")
    assert image_key(p09) == image_key(p09, None, grey)  # no background said: the default
    assert image_key(p09, None, grey) != image_key(p09, None, green)
    assert image_key(p09, None, green) != image_key(p09, None, Background(image=P10.read_bytes()))
    assert image_key(p11, None, grey) == image_key(p11, None, green)  # opaque: the background changes nothing
    assert image_key(p11, 0) == image_key(p11) != image_key(p11, 1)  # face 0 is the default face


@pytest.fixture(scope="module")
def cpu() -> Renderer:
    return Renderer("cpu")


def opening(n: int = 6) -> Controls:
    c = Controls.neutral(n, 25.0)
    c.mouth_open[:] = np.linspace(0.0, 0.36, n, dtype=np.float32)  # up to the widest speech opening
    return c


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int], pad: float = 0.0) -> np.ndarray:
    x, y, w, h = box
    m = np.zeros(shape, bool)
    m[max(0, int(y - pad * h)):int(y + h + pad * h), max(0, int(x - pad * w)):int(x + w + pad * w)] = True
    return m


def test_two_faces_the_largest_by_default_and_face_index_picks_the_other(cpu):
    image = rgb(P11)
    faces = L.detect_faces(image)
    assert len(faces) == 2
    areas = [float(np.prod(f.max(0) - f.min(0))) for f in faces]
    default, first, second = encode_image(image), encode_image(image, 0), encode_image(image, 1)
    assert default.face_box == first.face_box != second.face_box
    assert areas[0] >= areas[1]
    for chosen, other in ((first, second), (second, first)):
        frames = cpu.render(chosen, opening(), head_motion=False)
        moved = np.abs(frames[-1].astype(int) - image).max(-1) > 16
        assert moved.sum() > 50
        mouth = chosen.frame_landmarks[L.OUTER_UPPER + L.OUTER_LOWER]
        ys, xs = np.nonzero(moved)
        # The mouth that moves is the chosen face's (its jaw may drop a little below the box), and the other
        # face is left as it was.
        assert box_mask(image.shape[:2], chosen.face_box, pad=0.3)[moved].all()
        assert abs(np.median(xs) - mouth[:, 0].mean()) < 0.2 * chosen.face_box[2]
        assert not moved[box_mask(image.shape[:2], other.face_box)].any()
        still = ~box_mask(image.shape[:2], chosen.face_box, pad=0.5)
        assert np.array_equal(frames[-1][still], image[still])
    with pytest.raises(Exception, match=r"face_index=2 but 2 faces were found in the image.*largest"):
        encode_image(image, 2)


def test_a_small_face_in_a_large_frame_keeps_the_frame_and_every_pixel_away_from_the_face(cpu):
    """p10 (a full figure, the face 13% of the height): the frame keeps its size, the mouth opens where the face is,
    and nothing beyond the face's crop changes, not by one grey level."""
    image = rgb(P10)
    enc = encode_image(image)
    assert not enc.placed and enc.frame_size == (image.shape[1], image.shape[0])
    frames = cpu.render(enc, opening(), head_motion=True)
    assert frames.shape == (6, *image.shape)
    outside = np.ones(image.shape[:2], bool)
    outside[enc.crop.slices] = False
    assert outside.mean() > 0.8 and all(np.array_equal(f[outside], image[outside]) for f in frames)
    gap = inner_gap(frames[-1], enc.face_box)
    assert gap > inner_gap(frames[0], enc.face_box) + 0.03 * enc.geometry.face_height


def inner_gap(frame: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """MediaPipe's inner-lip gap (px) of the face in `box`, measured on a cut around it (the mesh needs the face large)."""
    x, y, w, h = box
    x0, y0 = max(0, x - w), max(0, y - h)
    cut = np.ascontiguousarray(frame[y0:y + 2 * h, x0:x + 2 * w])
    lm = L.detect_faces(cut)[0]
    return float(np.mean(lm[L.INNER_LOWER_MID, 1]) - np.mean(lm[L.INNER_UPPER_MID, 1]))


@pytest.mark.parametrize("case", ["tiny", "huge"])
def test_faces_outside_the_working_range_are_animated_there_and_pasted_back(case, cpu):
    """A face under WORK_FACE_MIN (p10 shrunk further) is animated upscaled, one over WORK_FACE_MAX (p05 at 3x)
    downscaled; either way the frame keeps the portrait's size, the face is animated at an adequate
    resolution (its working height within the bounds, the mouth opening as MediaPipe measures it at full
    size), and every pixel outside the feathered region is the portrait's own."""
    if case == "tiny":
        image = np.ascontiguousarray(cv2.resize(rgb(P10), None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA))
    else:
        image = np.ascontiguousarray(cv2.resize(rgb(P05), None, fx=3.0, fy=3.0, interpolation=cv2.INTER_CUBIC))
    lm = L.detect_faces(image)[0]
    native_h = float(np.linalg.norm(lm[L.CHIN] - lm[L.FOREHEAD]))
    assert (native_h < WORK_FACE_MIN) if case == "tiny" else (native_h > WORK_FACE_MAX)
    enc = encode_image(image)
    assert enc.placed and enc.frame_size == (image.shape[1], image.shape[0])
    work_h = float(np.linalg.norm(enc.landmarks[L.CHIN] - enc.landmarks[L.FOREHEAD]))
    assert WORK_FACE_MIN - 1 <= work_h <= WORK_FACE_MAX + 1
    assert work_h == pytest.approx(WORK_FACE_MIN if case == "tiny" else WORK_FACE_MAX, rel=0.03)
    frames = cpu.render(enc, opening(), head_motion=True)
    assert frames.shape == (6, *image.shape)
    untouched = enc.blend == 0
    outside = np.ones(image.shape[:2], bool)
    outside[enc.region.slices] = untouched
    assert outside.mean() > 0.5
    assert all(np.array_equal(f[outside], image[outside]) for f in frames)
    # The feather is inside the region: a band at most a few pixels wide where the cut blends into the portrait.
    assert ((enc.blend > 0) & (enc.blend < 1)).sum() < 0.25 * enc.blend.size
    # The pasted face keeps the portrait's position and opens its mouth.
    assert np.abs(np.array(enc.face_box) - np.array(L.face_box(lm))).max() <= 3
    assert inner_gap(frames[-1], enc.face_box) > inner_gap(frames[0], enc.face_box) + 0.03 * native_h
    # The torch path (batched, here on the CPU) pastes back the same frames, within its usual few grey levels.
    torch_frames = Renderer("cpu", backend="torch", batch=4).render(enc, opening(), head_motion=True)
    assert torch_frames.shape == frames.shape
    diff = np.abs(torch_frames.astype(np.int16) - frames)
    assert diff.mean() < 0.1 and diff.max() <= 12 and np.array_equal(torch_frames[:, outside], frames[:, outside])


def test_encoding_of_a_placed_face_survives_the_disk_cache(tmp_path, cpu):
    image = np.ascontiguousarray(cv2.resize(rgb(P10), None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA))
    enc = encode_image(image)
    enc.save(tmp_path / "e.npz")
    back = Encoding.load(tmp_path / "e.npz")
    assert back is not None and back.placed and back.region == enc.region and back.face_box == enc.face_box
    assert np.array_equal(cpu.render(back, opening(3), False), cpu.render(enc, opening(3), False))


def test_a_face_a_tenth_of_a_large_frame_is_found_in_tiles():
    small = rgb(P10)
    canvas = np.full((1400, 1400, 3), 190, np.uint8)
    canvas[600:600 + small.shape[0], 800:800 + small.shape[1]] = small
    assert not L._run_mesh(canvas, 8, 0.5)  # the detector alone, at its 128 px, does not see it
    faces = L.detect_faces(canvas)
    assert len(faces) == 1
    x, y, w, h = L.face_box(L.detect_faces(small)[0])
    assert np.abs(np.array(L.face_box(faces[0])) - (x + 800, y + 600, w, h)).max() <= 4


# -- through the service ---------------------------------------------------------------------------------------

def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def wav_b64(seconds: float) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32),
             16000, format="WAV")
    return b64(buf.getvalue())


def test_background_and_face_index_through_the_api(gpu_settings):
    p09, p11 = P09.read_bytes(), P11.read_bytes()
    broken_png = p09[:200]  # a sound header, then the data cut short
    alpha = rgba(P09)[1]

    async def upload(client, raw, **form):
        return await client.post("/avatars", files={"image": ("x.png", raw, "image/png")}, data=form)

    async def scenario():
        async with running_app(gpu_settings) as client:
            gen = lambda body: client.post("/video/generate", json={"audio": wav_b64(0.6), **body})  # noqa: E731
            out = {
                "green": await upload(client, p09, background="#20a040"),
                "green_again": await upload(client, p09, background="#20a040"),
                "grey": await upload(client, p09),
                "file_bg": await client.post("/avatars", files={"image": ("x.png", p09, "image/png"),
                                                                "background_image": ("b.jpg", P10.read_bytes(), "image/jpeg")}),
                "p11": await upload(client, p11),
                "p11_green": await upload(client, p11, background="#20a040"),
                "p11_f1": await upload(client, p11, face_index="1"),
                "video": await gen({"avatar_image": b64(p09), "background": "#2050a0", "response": "json"}),
                "video_f1": await gen({"avatar_image": b64(p11), "face_index": 1, "response": "json"}),
            }
            out["video_bytes"] = (await client.get(out["video"].json()["video_url"])).content
            bad = [
                (await gen({"avatar_image": b64(p09), "background": "#12345"}), "background '#12345' is not a colour"),
                (await gen({"avatar_image": b64(p09), "background": "#gggggg"}), "is not a colour; write it as #rrggbb"),
                (await gen({"avatar_image": b64(p09), "background": "not base64!"}), "background is not valid base64"),
                (await gen({"avatar_image": b64(p09), "background": b64(b"GIF89a" + b"\0" * 40)}),
                 "background is not a JPEG, PNG or WebP image"),
                (await gen({"avatar_image": b64(p09), "background": b64(broken_png)}), "background could not be decoded"),
                (await gen({"avatar_image": b64(p11), "background": b64(broken_png)}), "background could not be decoded"),
                (await gen({"avatar_image": b64(p11), "face_index": 2}), "face_index=2 but 2 faces were found"),
                (await gen({"avatar_image": b64(p11), "face_index": 64}), "face_index"),
                (await gen({"avatar_id": "x", "background": "#ffffff"}), "background applies to avatar_image"),
                (await upload(client, p09, background="#fff"), "background '#fff' is not a colour"),
                (await upload(client, p11, face_index="2"), "face_index=2 but 2 faces were found"),
                (await client.post("/avatars", files={"image": ("x.png", p09, "image/png"),
                                                      "background_image": ("b.png", broken_png, "image/png")}),
                 "background_image could not be decoded"),
            ]
            return out, bad

    out, bad = asyncio.run(scenario())
    for resp, words in bad:
        assert resp.status_code == 422, (words, resp.text)
        assert words in resp.json()["error"], (words, resp.text)
    for name in ("green", "green_again", "grey", "file_bg", "p11", "p11_green", "p11_f1", "video", "video_f1"):
        assert out[name].status_code == 200, (name, out[name].text)
    ids = {name: out[name].json()["avatar_id"] for name in ("green", "green_again", "grey", "file_bg", "p11", "p11_green", "p11_f1")}
    # Each background of a transparent image is its own avatar, encoded once; an opaque image ignores it.
    assert ids["green"] == ids["green_again"] and out["green_again"].json()["cached"] is True
    assert len({ids["green"], ids["grey"], ids["file_bg"]}) == 3
    assert ids["p11"] == ids["p11_green"] and ids["p11_f1"] == ids["p11"] + "_f1"
    assert out["p11"].json()["face_box"] != out["p11_f1"].json()["face_box"]
    assert out["video_f1"].json()["avatar_id"] == ids["p11_f1"]
    # The video of p09 on #2050a0 shows that colour where the portrait is clear (up to the codec's loss).
    body = out["video"].json()
    frames = read_frames(out["video_bytes"], (body["width"], body["height"]))
    h, w = frames.shape[1:3]
    clear = cv2.erode((alpha[:h, :w] == 0).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.abs(np.median(frames[:, clear].reshape(-1, 3), 0) - (0x20, 0x50, 0xa0)).max() <= 4
