"""Contact sheet of a talking-head clip: frames across it, and mouth/eye close-ups at full resolution.

    PYTHONPATH=. .venv/bin/python scripts/contact_sheet.py --out /tmp/sheet.png [--image portrait.png] [--text "..."]
        [--background '#rrggbb' | --background-image bg.jpg] [--face-index N] [--run 8]

The portrait is read as the service reads an upload (a transparent one composited on its
background); with --run, a last row shows the mouth of N consecutive frames around the widest
opening at 2x.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np


def main() -> None:
    """Render a Piper-voiced clip on a portrait and write the sheet PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/contact_sheet.png")
    ap.add_argument("--image", default=None, help="portrait file (default: skimage astronaut)")
    ap.add_argument("--camera", action="store_true", help="use skimage's cameraman instead")
    ap.add_argument("--text", default="Hello! We measured the moon, and it was bigger than we thought.")
    ap.add_argument("--backend", default="cv2", choices=["cv2", "torch"])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--background", default=None, help="#rrggbb for a transparent portrait (default: the service's)")
    ap.add_argument("--background-image", default=None, help="image file for a transparent portrait's background")
    ap.add_argument("--face-index", type=int, default=None, help="face by size, 0 the largest (default)")
    ap.add_argument("--run", type=int, default=0, help="a row of this many consecutive mouths at 2x")
    args = ap.parse_args()

    from skimage import data

    from gpu_service.speech.protocol import SpeechRequest
    from gpu_service.speech.engines.piper import PiperEngine
    from gpu_service.talking_head import landmarks as L
    from gpu_service.talking_head.driving import drive
    from avatar_contracts.media import Background, parse_background
    from gpu_service.talking_head.encoding import decode_image, encode_image
    from gpu_service.talking_head.renderer import Renderer

    if args.image:
        raw = open(args.image, "rb").read()
        if args.background_image:
            bg = Background(image=open(args.background_image, "rb").read())
        else:
            bg = parse_background(args.background, 100 << 20, 10**9)
        image = decode_image(raw, 100 << 20, background=bg)
    elif args.camera:
        image = np.stack([data.camera()] * 3, -1)
    else:
        image = data.astronaut()
    enc = encode_image(image, face_index=args.face_index)
    piper = PiperEngine()
    piper.load("cpu")
    speech = piper.synthesize(SpeechRequest(text=args.text))
    controls = drive(speech.duration_s, 25, phonemes=speech.phonemes, audio=speech.audio, sample_rate=speech.sample_rate)
    frames = Renderer("cpu", backend=args.backend).render(enc, controls)

    # Row 1: whole frames across the clip; rows 2-3: mouth and eyes at 3x (nearest, so pixels show).
    picks = np.linspace(0, len(frames) - 1, args.frames).round().astype(int)
    picks[len(picks) // 2] = int(np.argmax(controls.mouth_open))  # always show the widest mouth
    if controls.blink.max() > 0.5:
        picks[-1] = int(np.argmax(controls.blink))
    thumb = 160
    row1 = [cv2.resize(frames[i], (thumb, thumb * frames.shape[1] // frames.shape[2]), interpolation=cv2.INTER_AREA) for i in picks]
    lm = enc.frame_landmarks  # the frames are the portrait's own size

    def box(ids, pad_x, pad_top, pad_bottom):
        pts = lm[ids]
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        w = x1 - x0
        return int(x0 - pad_x * w), int(y0 - pad_top * w), int(x1 + pad_x * w), int(y1 + pad_bottom * w)

    def close(frame, b, width):
        x0, y0, x1, y1 = b
        patch = frame[max(y0, 0):y1, max(x0, 0):x1]
        scale = width / patch.shape[1]
        return cv2.resize(patch, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)

    mouth_b = box(L.OUTER_UPPER + L.OUTER_LOWER + [L.CHIN], 0.35, 0.25, 0.25)
    eyes_b = box(L.EYE_LEFT_UPPER + L.EYE_RIGHT_UPPER + L.BROW_LEFT + L.BROW_RIGHT + L.EYE_RIGHT_LOWER, 0.08, 0.05, 0.12)
    row2 = [close(frames[i], mouth_b, thumb) for i in picks]
    row3 = [close(frames[i], eyes_b, thumb) for i in picks]

    def strip(tiles):
        h = max(t.shape[0] for t in tiles)
        return np.concatenate([cv2.copyMakeBorder(t, 0, h - t.shape[0], 0, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255)) for t in tiles], 1)

    rows = [strip(row1), strip(row2), strip(row3)]
    if args.run:
        widest = int(np.argmax(controls.mouth_open))
        start = int(np.clip(widest - args.run // 2, 0, max(0, len(frames) - args.run)))
        x0, y0, x1, y1 = mouth_b
        row4 = [cv2.resize(frames[i][max(y0, 0):y1, max(x0, 0):x1], None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
                for i in range(start, min(len(frames), start + args.run))]
        rows.append(strip(row4))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([cv2.copyMakeBorder(r, 0, 2, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255)) for r in rows], 0)
    for k, i in enumerate(picks):
        cv2.putText(sheet, f"{i} o{controls.mouth_open[i]:.2f}", (k * (thumb + 2) + 3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 0), 1)
    cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]} (portrait {image.shape[1]}x"
          f"{image.shape[0]}), {speech.duration_s:.2f} s, picks {picks.tolist()}, face {enc.face_box}, "
          f"working scale {enc.image.shape[1] / enc.region.width if enc.placed else 1.0:.2f}")


if __name__ == "__main__":
    main()
