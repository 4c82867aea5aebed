"""Contact sheets for every portrait of the media kit, driven by Piper speech and by one real clip, plus an overview.

    PYTHONPATH=. .venv/bin/python scripts/contact_sheets_kit.py [--out /tmp/sheets_kit]
        [--kit /work/shared/media] [--clip a01] [--seconds 3] [--text "..."] [--run 8] [--only p03,p08]

Writes, into --out (keep it outside the repository):
  <portrait>__piper.png and <portrait>__<clip>.png  one sheet per portrait and take (scripts/contact_sheet.py's layout)
  overview.png    one row per portrait: its own mouth, then for each take the widest opening and the
                  tightest bilabial closure, all from the same mouth box at one tile width
  summary.json    per sheet: timing source, frames, widest and closure frames and openings, seconds taken

Speech is made once (Piper with noise_w_scale 0, so its timings and the frames picked repeat run
after run) and aligned once (the clip with its .txt transcript: forced alignment, as the service
does for an upload with text); each portrait is encoded once and rendered on the service's CPU
path (cv2; --backend torch for the GPU path). --seconds renders the start of each driven clip.
The kit may also be one flat folder (tests/fixtures/media).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contact_sheet as cs  # noqa: E402  (the sibling script, imported as a module)

KIT = Path("/work/shared/media")
PIPER_TEXT = "Bob, my mother bought a map of Paris."
"""About 2.5 s of Piper: bilabials to close on (b, m, p) between open vowels (ɑ, ʌ, æ)."""
TILE = 220
"""Width of every overview tile."""


def _sub(kit: Path, name: str) -> Path:
    """The kit's portraits/ or audio/ folder; the kit itself when it is flat (tests/fixtures/media)."""
    return kit / name if (kit / name).is_dir() else kit


def overview_row(portrait: cs.Portrait, shots: list[tuple[str, cs.Clip]]) -> np.ndarray:
    """One portrait's line of the overview: its own mouth, then each take's widest and closed mouths."""
    box = cs.mouth_box(portrait.enc)
    scale = TILE / max(1, box[2] - box[0])
    tiles = [cs.caption(cs.to_width(cs.crop(portrait.image, box), TILE), f"input mouth ({scale:.1f}x)")]
    for label, clip in shots:
        for kind, i in (("widest", cs.widest(clip)), ("closed", cs.closure(clip))):
            tiles.append(cs.caption(cs.to_width(cs.crop(clip.frames[i], box), TILE), f"{label} {kind}: {cs.frame_label(clip, i)}"))
    return cs.caption(cs.strip(tiles, max_width=10**6), portrait.name, size=14)


def main(argv: Optional[list[str]] = None) -> None:
    """Render every portrait with both takes; write the sheets, the overview and a summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/sheets_kit"))
    ap.add_argument("--kit", type=Path, default=KIT, help="the media kit (portraits/ and audio/, or one flat folder)")
    ap.add_argument("--clip", default="a01", help="real clip by its prefix in audio/ (a01..a04); its .txt is the transcript")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of each driven clip to render")
    ap.add_argument("--text", default=PIPER_TEXT, help="what Piper says")
    ap.add_argument("--run", type=int, default=8, help="consecutive mouths per run row")
    ap.add_argument("--only", default="", help="comma-separated portrait prefixes (default: all)")
    ap.add_argument("--backend", default="cv2", choices=["auto", "cv2", "torch"])
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be > 0")
    if args.run < 0:
        ap.error("--run must be >= 0")

    portrait_dir, audio_dir = (_sub(args.kit, name) for name in ("portraits", "audio"))
    portraits = sorted(p for p in portrait_dir.iterdir() if p.name[:1] == "p" and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if args.only:
        wanted = tuple(w.strip() for w in args.only.split(",") if w.strip())
        portraits = [p for p in portraits if p.name.startswith(wanted)]
    if not portraits:
        raise SystemExit(f"no portraits in {portrait_dir}" + (f" matching {args.only}" if args.only else ""))
    wavs = sorted(audio_dir.glob(f"{args.clip}*.wav"))
    if len(wavs) != 1:
        raise SystemExit(f"--clip {args.clip!r} matches {len(wavs)} WAV files in {audio_dir}; name one")
    transcript = wavs[0].with_suffix(".txt")
    if args.out.resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        raise SystemExit(f"--out {args.out} is inside the repository; write the PNGs elsewhere")
    args.out.mkdir(parents=True, exist_ok=True)

    from gpu_service.talking_head.renderer import Renderer

    t0 = time.perf_counter()
    takes = [cs.piper_take(args.text, cs.load_piper(noise_w_scale=0.0)), cs.clip_take(wavs[0], transcript if transcript.is_file() else None)]
    print(f"speech ready in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{t.label} ({t.timing_source}, "
          f"{len(t.audio) / t.sample_rate:.2f} s)" for t in takes), flush=True)
    renderer = Renderer("cpu", backend=args.backend)
    rows, summary = [], []
    for path in portraits:
        t1 = time.perf_counter()
        portrait = cs.load_portrait(path)
        encode_s = time.perf_counter() - t1
        shots = []
        for take in takes:
            t2 = time.perf_counter()
            clip = cs.render_take(portrait, take, renderer, seconds=args.seconds)
            render_s = time.perf_counter() - t2
            label = "piper" if take.timing_source == "piper" else take.label.split("_")[0]
            sheet_path = args.out / f"{portrait.name}__{label}.png"
            cs.write_png(sheet_path, cs.make_sheet(portrait, take, clip, run=args.run))
            wide, shut = cs.widest(clip), cs.closure(clip)
            summary.append({
                "portrait": portrait.name, "take": take.label, "timing_source": take.timing_source,
                "sheet": sheet_path.name, "frames": len(clip.frames), "size": list(portrait.enc.frame_size),
                "face_box": list(portrait.enc.face_box), "widest": {"frame": wide, "open": round(float(clip.controls.mouth_open[wide]), 3)},
                "closure": {"frame": shut, "open": round(float(clip.controls.mouth_open[shut]), 3),
                            "phone": cs.phone_at(clip.phones, (shut + 0.5) / float(clip.controls.fps))},
                "encode_s": round(encode_s, 2), "render_s": round(render_s, 2),
            })
            shots.append((label, clip))
            print(f"{sheet_path.name}: {len(clip.frames)} frames in {render_s:.1f} s (encode {encode_s:.1f} s)", flush=True)
        rows.append(overview_row(portrait, shots))
    cs.write_png(args.out / "overview.png", cs.stack([np.pad(r, ((0, 8), (0, 0), (0, 0)), constant_values=255) for r in rows]))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(summary)} sheets, overview.png and summary.json to {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
