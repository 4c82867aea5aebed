"""Contact sheet of a talking-head clip: head crops across it, mouth and eye close-ups, runs of consecutive mouths at 2x.

    PYTHONPATH=. .venv/bin/python scripts/contact_sheet.py --out /tmp/sheet.png [--image portrait.png]
        [--text "..." | --audio clip.wav [--audio-text clip.txt]] [--seconds S]
        [--background '#rrggbb' | --background-image bg.jpg] [--face-index N] [--run 8]

Speech reaches the renderer as it does through the service: Piper's audio as a 16-bit WAV with its
own phoneme timings (what the runtime sends to /video/generate), or a real clip (--audio) decoded as
an upload and given timings by `timings_for` (forced alignment with --audio-text, else phone
recognition), then `drive` with the text, seed 0 and the avatar id the service would give the
portrait. The portrait is read as the service reads an upload (a transparent one composited on its
background). --seconds renders only the start of the driven clip (the controls are those of the
whole clip). Each run row shows N consecutive mouths at 2x: around the widest opening, and around
the tightest bilabial closure (m, b, p).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

BILABIALS = ("m", "b", "p")
WHITE = (255, 255, 255)
MAX_ROW_PX = 2400
"""Rows of tiles wider than this wrap onto a new line."""


@dataclass
class Take:
    """Speech that drives a clip, as the talking-head service receives it."""

    label: str
    audio: np.ndarray
    sample_rate: int
    phonemes: Optional[list]
    """(symbol, start_s, end_s) spans, or None (the driving then follows the envelope)."""
    text: Optional[str]
    timing_source: str
    """piper (the request's own timings) or what align() used: forced_alignment, phone_recognition, envelope."""


@dataclass
class Portrait:
    """A portrait read and encoded as an upload to /video/generate."""

    name: str
    image: np.ndarray
    """The decoded RGB portrait (a transparent one composited), the frames' size."""
    enc: object
    avatar_key: str


@dataclass
class Clip:
    """Frames rendered from a portrait and a take, with the controls and phones that drove them."""

    frames: np.ndarray
    controls: object
    phones: list
    duration_s: float


def _tuples(phonemes) -> list[tuple[str, float, float]]:
    return [(p.phoneme, p.start_s, p.end_s) if hasattr(p, "phoneme") else tuple(p) for p in phonemes or []]


def _upload_audio(raw: bytes) -> tuple[np.ndarray, int]:
    """Audio bytes decoded as the talking-head service decodes an upload (its length limit, mono float32)."""
    from gpu_service.audio import decode_audio
    from gpu_service.settings import TalkingHeadSettings

    return decode_audio(raw, "audio", 0.05, TalkingHeadSettings().max_audio_s)


def load_piper(noise_w_scale: Optional[float] = None):
    """Piper loaded on the CPU, as the service's default speech engine (noise_w_scale=0: the same timings every run)."""
    from gpu_service.speech.engines.piper import PiperEngine

    piper = PiperEngine(noise_w_scale=noise_w_scale)
    piper.load("cpu")
    return piper


def piper_take(text: str, piper=None) -> Take:
    """Piper speech for `text`: its WAV as the service stores it, and its own phoneme timings."""
    from gpu_service.audio import wav_bytes
    from gpu_service.speech.protocol import SpeechRequest

    piper = piper or load_piper()
    speech = piper.synthesize(SpeechRequest(text=text))
    audio, rate = _upload_audio(wav_bytes(speech.audio, speech.sample_rate))
    return Take("piper", audio, rate, _tuples(speech.phonemes), text, "piper")


def clip_take(wav: Path, text_file: Optional[Path] = None) -> Take:
    """A real speech clip as an upload: timings from forced alignment with its transcript (phone recognition without)."""
    from gpu_service.speech.alignment import timings_for

    audio, rate = _upload_audio(Path(wav).read_bytes())
    text = Path(text_file).read_text(encoding="utf-8").strip() if text_file else None
    phonemes, source = timings_for(audio, rate, None, text)
    return Take(Path(wav).stem, audio, rate, _tuples(phonemes) or None, text, source)


def load_portrait(path: Optional[Path], background: Optional[str] = None, background_image: Optional[Path] = None,
                  face_index: Optional[int] = None, camera: bool = False) -> Portrait:
    """Decode and encode a portrait as the service does (skimage's astronaut, or cameraman, without a path)."""
    from avatar_contracts.media import Background, parse_background
    from gpu_service.talking_head.encoding import decode_image, encode_image, image_key

    if path is None:
        from skimage import data

        image = np.stack([data.camera()] * 3, -1) if camera else data.astronaut()
        name, key = ("cameraman" if camera else "astronaut"), ""
    else:
        raw = Path(path).read_bytes()
        if background_image:
            bg = Background(image=Path(background_image).read_bytes())
        else:
            bg = parse_background(background, 100 << 20, 10**9)
        image = decode_image(raw, 100 << 20, background=bg)
        face = f"_f{face_index}" if face_index else ""
        name, key = Path(path).stem, "img_" + image_key(raw, face_index, bg)[:20] + face  # the service's avatar id
    return Portrait(name, image, encode_image(image, face_index=face_index), key)


def render_take(portrait: Portrait, take: Take, renderer, fps: float = 25.0, seconds: Optional[float] = None) -> Clip:
    """Drive the whole take as /video/generate does, then render its frames (only the first `seconds` if given)."""
    from gpu_service.talking_head.driving import drive

    duration = len(take.audio) / float(take.sample_rate)
    controls = drive(duration, fps, phonemes=take.phonemes, audio=take.audio, sample_rate=take.sample_rate,
                     text=take.text, seed=0, head_motion=True, avatar_key=portrait.avatar_key)
    if seconds is not None:
        controls = controls.slice(0, min(controls.n_frames, max(1, int(round(seconds * fps)))))
    frames = renderer.render(portrait.enc, controls)
    return Clip(frames, controls, list(take.phonemes or []), duration)


# -- picking frames ---------------------------------------------------------------------------
def phone_at(phones: Sequence, t: float) -> str:
    """The phone sounding at time t ("" outside every span)."""
    for sym, s, e in phones:
        if s <= t < e and sym != " ":
            return sym
    return ""


def widest(clip: Clip) -> int:
    """The frame with the widest mouth opening."""
    return int(np.argmax(clip.controls.mouth_open))


def closure(clip: Clip) -> int:
    """The tightest-closed frame inside a bilabial (m, b, p) that follows an opening (not the first seal from rest);
    else inside any bilabial; else the most closed frame inside speech; else frame 0."""
    fps, opening = float(clip.controls.fps), clip.controls.mouth_open
    times = (np.arange(len(opening)) + 0.5) / fps
    before = [float(opening[max(0, i - 6):i].max()) if i else 0.0 for i in range(len(opening))]
    bilabial = [i for i, t in enumerate(times) if phone_at(clip.phones, t) in BILABIALS]
    spoken = [p for p in clip.phones if p[0] not in ("_", " ")]
    for pool in ([i for i in bilabial if before[i] >= 0.15], bilabial,
                 [i for i, t in enumerate(times) if spoken and spoken[0][1] <= t < spoken[-1][2]]):
        if pool:
            return int(min(pool, key=lambda i: (round(float(opening[i]), 3), -before[i])))
    return 0


# -- drawing ----------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def caption(tile: np.ndarray, text: str, size: int = 12, min_width: int = 0) -> np.ndarray:
    """The tile with a white strip above it holding `text` (IPA too); padded to min_width."""
    from PIL import Image, ImageDraw

    font = _font(size)
    lines = text.split("\n")
    strip_h = (size + 3) * len(lines) + 2
    width = max(tile.shape[1], min_width, max(int(font.getlength(line)) + 6 for line in lines) if lines else 0)
    canvas = Image.new("RGB", (width, strip_h), WHITE)
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((3, 1 + k * (size + 3)), line, fill=(0, 0, 0), font=font)
    head = np.asarray(canvas)
    body = cv2.copyMakeBorder(tile, 0, 0, 0, width - tile.shape[1], cv2.BORDER_CONSTANT, value=WHITE)
    return np.concatenate([head, body], 0)


def strip(tiles: Sequence[np.ndarray], gap: int = 3, max_width: int = MAX_ROW_PX) -> np.ndarray:
    """Tiles side by side, top-aligned on white; beyond max_width, on as few lines as needed with equal counts."""
    total = sum(t.shape[1] + gap for t in tiles)
    per_line = max(1, -(-len(tiles) // max(1, -(-total // max_width))))
    lines = [tiles[k:k + per_line] for k in range(0, len(tiles), per_line)]
    out = []
    for line in lines:
        h = max(t.shape[0] for t in line)
        out.append(np.concatenate([cv2.copyMakeBorder(t, 0, h - t.shape[0] + gap, 0, gap, cv2.BORDER_CONSTANT, value=WHITE)
                                   for t in line], 1))
    return stack(out)


def stack(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows one under another, left-aligned on white."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate([cv2.copyMakeBorder(r, 0, 0, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=WHITE)
                           for r in rows], 0)


def landmark_box(lm: np.ndarray, ids, pad_x: float, pad_top: float, pad_bottom: float,
                 size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the landmarks, padded by fractions of their width, clipped to the frame."""
    pts = lm[ids]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    w = x1 - x0
    fw, fh = size
    return (int(max(0, x0 - pad_x * w)), int(max(0, y0 - pad_top * w)),
            int(min(fw, x1 + pad_x * w)), int(min(fh, y1 + pad_bottom * w)))


def mouth_box(enc) -> tuple[int, int, int, int]:
    """The mouth and chin at rest, with room for the widest opening."""
    from gpu_service.talking_head import landmarks as L

    return landmark_box(enc.frame_landmarks, L.OUTER_UPPER + L.OUTER_LOWER + [L.CHIN], 0.35, 0.25, 0.25, enc.frame_size)


def eyes_box(enc) -> tuple[int, int, int, int]:
    """Both eyes and brows."""
    from gpu_service.talking_head import landmarks as L

    ids = L.EYE_LEFT_UPPER + L.EYE_RIGHT_UPPER + L.BROW_LEFT + L.BROW_RIGHT + L.EYE_RIGHT_LOWER
    return landmark_box(enc.frame_landmarks, ids, 0.08, 0.05, 0.12, enc.frame_size)


def head_box(enc) -> tuple[int, int, int, int]:
    """The head, with the neck and collar below the jaw."""
    from gpu_service.talking_head import landmarks as L

    return landmark_box(enc.frame_landmarks, L.FACE_OVAL, 0.22, 0.2, 0.45, enc.frame_size)


def crop(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return frame[y0:y1, x0:x1]


def scaled(patch: np.ndarray, fx: float) -> np.ndarray:
    """A patch scaled by fx: nearest when enlarging (pixels show), area when shrinking."""
    interp = cv2.INTER_NEAREST if fx >= 1 else cv2.INTER_AREA
    return cv2.resize(patch, None, fx=fx, fy=fx, interpolation=interp)


def to_width(patch: np.ndarray, width: int) -> np.ndarray:
    return scaled(patch, width / patch.shape[1])


def frame_label(clip: Clip, i: int) -> str:
    t = (i + 0.5) / float(clip.controls.fps)
    return f"{i} o{clip.controls.mouth_open[i]:.2f} {phone_at(clip.phones, t) or '-'}"


def run_tiles(clip: Clip, centre: int, n: int, box, scale: float = 2.0) -> list[np.ndarray]:
    """n consecutive mouths around `centre` at `scale`, each captioned."""
    total = len(clip.frames)
    start = int(np.clip(centre - n // 2, 0, max(0, total - n)))
    return [caption(scaled(crop(clip.frames[i], box), scale), frame_label(clip, i))
            for i in range(start, min(total, start + n))]


def make_sheet(portrait: Portrait, take: Take, clip: Clip, n_picks: int = 12, run: int = 8, thumb: int = 180) -> np.ndarray:
    """The contact sheet: a header, two whole frames, head crops across the clip, mouth and eye close-ups, runs at 2x."""
    enc, frames, ctl = portrait.enc, clip.frames, clip.controls
    wide, shut = widest(clip), closure(clip)
    picks = np.linspace(0, len(frames) - 1, n_picks).round().astype(int)
    picks[len(picks) // 2] = wide  # always show the widest mouth and the closure
    picks[len(picks) // 2 + 1] = shut
    if ctl.blink.max() > 0.5:
        picks[-1] = int(np.argmax(ctl.blink))
    picks = np.unique(picks)
    fw, fh = enc.frame_size
    words = (take.text or "")[:110]
    header = caption(np.full((1, 900, 3), 255, np.uint8),
                     f"{portrait.name}  x  {take.label}   timings: {take.timing_source}   "
                     f"{len(frames)} frames ({len(frames) / float(ctl.fps):.2f} s of a {clip.duration_s:.2f} s clip), {fw}x{fh}, "
                     f"face {list(enc.face_box)}\n\"{words}\"", size=14)
    whole_h = 260
    mb, eb, hb = mouth_box(enc), eyes_box(enc), head_box(enc)
    wholes = [caption(to_width(frames[i], max(1, int(whole_h * fw / fh))), f"whole frame {label}: " + frame_label(clip, i))
              for label, i in (("first", 0), ("widest", wide))]
    wholes.append(caption(scaled(crop(portrait.image, mb), 2.0), "the portrait's own mouth at 2x"))
    rows = [header, strip(wholes),
            strip([caption(to_width(crop(frames[i], hb), thumb), frame_label(clip, i)) for i in picks]),
            strip([to_width(crop(frames[i], mb), thumb) for i in picks]),
            strip([to_width(crop(frames[i], eb), thumb) for i in picks])]
    if run:
        rows.append(caption(strip(run_tiles(clip, wide, run, mb)), f"{run} consecutive mouths at 2x around the widest opening (frame {wide})"))
        rows.append(caption(strip(run_tiles(clip, shut, run, mb)), f"{run} consecutive mouths at 2x around the tightest closure (frame {shut})"))
    return stack([cv2.copyMakeBorder(r, 0, 6, 0, 0, cv2.BORDER_CONSTANT, value=WHITE) for r in rows])


def write_png(path: Path, rgb: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise SystemExit(f"could not write {path}")


def main() -> None:
    """Render one portrait with Piper speech or a real clip and write the sheet PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/contact_sheet.png"))
    ap.add_argument("--image", type=Path, default=None, help="portrait file (default: skimage astronaut)")
    ap.add_argument("--camera", action="store_true", help="use skimage's cameraman instead")
    ap.add_argument("--text", default="Hello! We measured the moon, and it was bigger than we thought.",
                    help="what Piper says (ignored with --audio)")
    ap.add_argument("--audio", type=Path, default=None, help="a real speech clip (WAV/FLAC/OGG) instead of Piper")
    ap.add_argument("--audio-text", type=Path, default=None, help="its transcript (.txt): forced alignment, as the service does with text")
    ap.add_argument("--seconds", type=float, default=None, help="render only the first S seconds of the driven clip")
    ap.add_argument("--backend", default="cv2", choices=["auto", "cv2", "torch"])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--background", default=None, help="#rrggbb for a transparent portrait (default: the service's)")
    ap.add_argument("--background-image", type=Path, default=None, help="image file for a transparent portrait's background")
    ap.add_argument("--face-index", type=int, default=None, help="face by size, 0 the largest (default)")
    ap.add_argument("--run", type=int, default=0, help="rows of this many consecutive mouths at 2x")
    args = ap.parse_args()
    if args.audio_text and not args.audio:
        ap.error("--audio-text needs --audio")
    if args.audio and not args.audio.is_file():
        ap.error(f"--audio {args.audio} is not a file")
    if args.seconds is not None and args.seconds <= 0:
        ap.error("--seconds must be > 0")

    from gpu_service.talking_head.renderer import Renderer

    portrait = load_portrait(args.image, args.background, args.background_image, args.face_index, args.camera)
    take = clip_take(args.audio, args.audio_text) if args.audio else piper_take(args.text)
    clip = render_take(portrait, take, Renderer("cpu", backend=args.backend), seconds=args.seconds)
    write_png(args.out, make_sheet(portrait, take, clip, args.frames, args.run))
    enc = portrait.enc
    print(f"wrote {args.out}: {len(clip.frames)} frames {clip.frames.shape[2]}x{clip.frames.shape[1]} (portrait "
          f"{portrait.image.shape[1]}x{portrait.image.shape[0]}), {clip.duration_s:.2f} s clip, timings {take.timing_source}, "
          f"widest {widest(clip)}, closure {closure(clip)}, face {enc.face_box}, "
          f"working scale {enc.image.shape[1] / enc.region.width if enc.placed else 1.0:.2f}")


if __name__ == "__main__":
    main()
