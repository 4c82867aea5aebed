"""Mouth-interior sheet: every kit portrait's mouth at fixed openings and lip shapes, at 2x, one row each.

    PYTHONPATH=. .venv/bin/python scripts/interior_sheet.py [--out /tmp/interior.png] [--only p01,p05]
        [--kit /work/shared/media] [--landmarks /tmp/interior_landmarks] [--backend cv2|torch] [--scale 2]

What the driving does not decide: the same controls on every portrait (rest, mouth_open 0.1 .. 1.0,
a rounded, a spread and a tucked mouth), so a change to the interior's drawing can be seen alone.
SPEECH_OPEN (0.36) is the widest conversational opening. Landmarks are found once per portrait
(MediaPipe) and kept in --landmarks, so a second run re-encodes without detecting again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contact_sheet as cs  # noqa: E402

KIT = Path("/work/shared/media")
SHAPES = [("rest", {}), ("o.10", {"mouth_open": 0.1}), ("o.20", {"mouth_open": 0.2}), ("o.36", {"mouth_open": 0.36}),
          ("o.50", {"mouth_open": 0.5}), ("o.75", {"mouth_open": 0.75}), ("o1.0", {"mouth_open": 1.0}),
          ("round .3", {"mouth_open": 0.3, "mouth_round": 1.0}), ("spread .3", {"mouth_open": 0.3, "mouth_spread": 1.0}),
          ("tuck", {"mouth_open": 0.15, "lip_tuck": 0.8})]


def portrait_encoding(path: Path, cache: Path):
    """(image, encoding) of a kit portrait as the service decodes it; landmarks from `cache` when there."""
    from gpu_service.talking_head.encoding import decode_image, encode_portrait, find_landmarks

    image = decode_image(path.read_bytes(), 100 << 20)
    lm_file = cache / f"{path.stem}.npy"
    if lm_file.exists():
        lm = np.load(lm_file)
    else:
        lm = find_landmarks(image)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(lm_file, lm)
    return image, encode_portrait(image, lm)


def row(name: str, image: np.ndarray, enc, renderer, scale: float) -> np.ndarray:
    from gpu_service.talking_head.controls import Controls

    c = Controls.neutral(len(SHAPES), 25.0)
    for k, (label, values) in enumerate(SHAPES):
        if label == "rest":
            c.mouth_open[k] = enc.geometry.rest_gap / enc.geometry.max_gap
        for key, v in values.items():
            getattr(c, key)[k] = v
    frames = renderer.render(enc, c, head_motion=False)
    box = cs.mouth_box(enc)
    tiles = [cs.caption(cs.scaled(cs.crop(image, box), scale), "input")]
    tiles += [cs.caption(cs.scaled(cs.crop(f, box), scale), label) for f, (label, _) in zip(frames, SHAPES)]
    return cs.caption(cs.strip(tiles, max_width=10**6), name, size=14)


def main(argv: Optional[list[str]] = None) -> None:
    from gpu_service.talking_head.renderer import Renderer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/interior.png"))
    ap.add_argument("--kit", type=Path, default=KIT)
    ap.add_argument("--landmarks", type=Path, default=Path("/tmp/interior_landmarks"))
    ap.add_argument("--only", default="")
    ap.add_argument("--backend", default="cv2", choices=["cv2", "torch"])
    ap.add_argument("--scale", type=float, default=2.0)
    args = ap.parse_args(argv)
    folder = args.kit / "portraits" if (args.kit / "portraits").is_dir() else args.kit
    paths = sorted(p for p in folder.iterdir() if p.name[:1] == "p" and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if args.only:
        paths = [p for p in paths if p.name.startswith(tuple(args.only.split(",")))]
    renderer = Renderer("cpu", backend=args.backend, batch=len(SHAPES))
    rows = []
    for p in paths:
        image, enc = portrait_encoding(p, args.landmarks)
        image = enc.frame if enc.placed else enc.image
        r = row(p.stem[:3], image, enc, renderer, args.scale)
        cs.write_png(args.out.with_name(f"{args.out.stem}_{p.stem[:3]}.png"), r)
        rows.append(r)
    cs.write_png(args.out, cs.stack(rows))


if __name__ == "__main__":
    main()
