"""Before/after contact sheet of a lip-sync: source frames, re-voiced frames and mouth close-ups, as one PNG.

Without arguments it renders the astronaut saying one Piper sentence with the talking head,
re-voices it with another sentence, and writes /tmp/lipsync_contact_sheet.png:

    PYTHONPATH=. .venv/bin/python scripts/lipsync_contact_sheet.py [--video in.mp4 --audio new.wav] [--out sheet.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np


def _label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.putText(out, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _mouth_crop(frame: np.ndarray, lm: np.ndarray | None, size: int) -> np.ndarray:
    """A square around the mouth, scaled to size x size (blank when no face)."""
    if lm is None:
        return np.zeros((size, size, 3), np.uint8)
    from gpu_service.talking_head import landmarks as L

    c = lm[[L.MOUTH_LEFT, L.MOUTH_RIGHT, L.INNER_UPPER_MID[0], L.INNER_LOWER_MID[0]]].mean(0)
    half = int(max(12, 0.9 * np.linalg.norm(lm[L.MOUTH_RIGHT] - lm[L.MOUTH_LEFT])))
    x0, y0 = int(c[0]) - half, int(c[1]) - half
    pad = np.pad(frame, ((half, half), (half, half), (0, 0)), mode="edge")
    crop = pad[y0 + half:y0 + 3 * half, x0 + half:x0 + 3 * half]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)


def main() -> None:
    """Build the sheet and print where it is."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", type=Path)
    ap.add_argument("--audio", type=Path)
    ap.add_argument("--policy", default="pingpong", choices=["trim", "loop", "pingpong"])
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lipsync_contact_sheet.png"))
    args = ap.parse_args()

    from evaluator.metrics.face import FaceMeasurer
    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync, speech_controls
    from gpu_service.lipsync.stream_io import decode_audio_file, open_video, source_index
    from gpu_service.talking_head.video import read_frames

    tmp = Path(tempfile.mkdtemp(prefix="lipsync_sheet_"))
    phonemes = None
    if args.video is None or args.audio is None:
        import soundfile as sf

        from gpu_service.speech.engines.piper import PiperEngine
        from tests.lipsync.media import SENTENCE_A, SENTENCE_B, speak, talking_clip

        piper = PiperEngine()
        piper.load("cpu")
        args.video = tmp / "source.mp4"
        talking_clip(piper, SENTENCE_A, args.video, size=320)
        audio_b, sr_b, phonemes = speak(piper, SENTENCE_B)
        args.audio = tmp / "new.wav"
        sf.write(args.audio, audio_b, sr_b)
    src = open_video(args.video, max_s=600, max_pixels=1920 * 1080)
    audio, rate = decode_audio_file(args.audio)
    engine = LandmarkLipSync()
    engine.load("cpu")
    res = engine.lipsync(LipSyncJob(video=src, audio=audio, sample_rate=rate, length_policy=args.policy,
                                     phonemes=phonemes))
    (tmp / "revoiced.mp4").write_bytes(res.mp4)
    after = read_frames(res.mp4, src.size)
    before_all = read_frames(args.video.read_bytes(), src.size)
    controls = speech_controls(audio, rate, float(src.fps), len(after), phonemes)
    # Show frames where the new mouth should be most open and most closed, in time order.
    order = np.argsort(controls.mouth_open)
    pick = sorted(set(order[-args.columns // 2:]) | set(order[: args.columns - args.columns // 2]))
    w, h = src.size
    tile = min(256, w)
    rows = [[], [], [], []]
    with FaceMeasurer() as fb, FaceMeasurer() as fa:
        for i in pick:
            b = before_all[source_index(i, len(before_all), args.policy)]
            a = after[i]
            lb, la = fb.landmarks(b), fa.landmarks(a)
            lb = None if np.isnan(lb).any() else lb[:, :2]
            la = None if np.isnan(la).any() else la[:, :2]
            rows[0].append(_label(cv2.resize(b, (tile, tile * h // w)), f"before #{i}"))
            rows[1].append(_label(cv2.resize(a, (tile, tile * h // w)), f"after open={controls.mouth_open[i]:.2f}"))
            rows[2].append(_label(_mouth_crop(b, lb, tile), "mouth before"))
            rows[3].append(_label(_mouth_crop(a, la, tile), "mouth after"))
    sheet = np.vstack([np.hstack(r) for r in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"{args.out}  ({res.frames} frames, {res.frames_without_face} without face; video {tmp / 'revoiced.mp4'})")


if __name__ == "__main__":
    main()
