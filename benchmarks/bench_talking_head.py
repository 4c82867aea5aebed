"""Talking-head speed at 512x512 on this machine: medians of several runs, with baselines measured in the same run.

Baselines: a naive renderer (per frame: the displacement fields rebuilt from the landmarks and one
dense full-frame cv2.remap, no precomputed bases and no face crop), and libx264 alone on the same
number of still frames through the same encoder path (the ceiling render+encode can reach).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_talking_head.py [--frames 250] [--runs 5] [--naive-frames 50]
"""

from __future__ import annotations

from typing import Iterator

import argparse
import statistics
import time

import cv2
import numpy as np


def naive_frames(image: np.ndarray, lm: np.ndarray, weights: np.ndarray, head) -> "Iterator[np.ndarray]":
    """Naive baseline: per frame, rebuild the mode fields from the landmarks and remap the whole frame once.

    No bases are kept between frames and nothing is restricted to the face crop: the field is a
    dense (H, W, 2) map over the full frame. Mouth-interior and eyelid shading are left out, so the
    baseline does less work than the real renderer (the ratio errs in the baseline's favour).
    """
    from gpu_service.talking_head.encoding import encode_from_landmarks

    H, W = image.shape[:2]
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    for t in range(len(weights)):
        enc = encode_from_landmarks(image, lm)  # the per-frame field computation the bases save
        x0, y0, x1, y1 = (int(v) for v in enc.crop)
        disp = np.zeros((H, W, 2), np.float32)
        disp[y0:y1, x0:x1] = np.tensordot(weights[t], enc.bases, axes=1)
        mask = np.zeros((H, W), np.float32)
        mask[y0:y1, x0:x1] = enc.head_mask
        mx, my = xs + disp[..., 0], ys + disp[..., 1]
        if head is not None:  # the head's similarity transform folded into the same single map
            roll, tx, ty = (float(v) for v in head[t])
            c, s = np.cos(roll), np.sin(roll)
            cx, cy = enc.head_center[0] + x0, enc.head_center[1] + y0
            rx, ry = xs - cx - tx, ys - cy - ty
            mx += mask * (c * rx + s * ry - (xs - cx))
            my += mask * (-s * rx + c * ry - (ys - cy))
        yield cv2.remap(image, np.ascontiguousarray(mx), np.ascontiguousarray(my), cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)


def main() -> None:
    """Print render-only fps, render+encode fps, encode time and memory per avatar, time to first frame."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--naive-frames", type=int, default=50, help="frames per naive-baseline run (it is slow)")
    args = ap.parse_args()
    from skimage import data

    from gpu_service.talking_head.controls import Controls
    from gpu_service.talking_head.encoding import encode_from_landmarks, encode_image, find_landmarks
    from gpu_service.talking_head.renderer import Renderer, head_params, mode_weights
    from gpu_service.talking_head.video import encode_mp4

    image = data.astronaut()
    enc = encode_image(image)  # also warms MediaPipe
    lm = find_landmarks(image)
    detect = []
    build = []
    for _ in range(args.runs):
        t = time.perf_counter()
        find_landmarks(image)
        detect.append(time.perf_counter() - t)
        t = time.perf_counter()
        encode_from_landmarks(image, lm)
        build.append(time.perf_counter() - t)
    rng = np.random.default_rng(0)
    n = args.frames
    c = Controls.neutral(n, 25.0)
    c.mouth_open[:] = np.clip(0.5 + 0.5 * np.sin(np.arange(n) / 3.0), 0, 1)
    c.blink[:] = (rng.uniform(size=n) > 0.95).astype(np.float32)
    c.head_roll[:] = 0.02 * np.sin(np.arange(n) / 20.0)
    c.head_dx[:] = 0.01 * np.sin(np.arange(n) / 30.0)
    r = Renderer("cpu")
    list(r.frames(enc, c.slice(0, 10)))
    render, full, first = [], [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        for _f in r.frames(enc, c):
            pass
        render.append(time.perf_counter() - t)
        t = time.perf_counter()
        _mp4, facts = encode_mp4(r.frames(enc, c), 25, (512, 512), preset="veryfast")
        full.append(time.perf_counter() - t)
        first.append(facts["first_frame_ms"])
    # Baselines, same controls and portrait: the naive renderer, and the encoder fed still frames.
    nn = min(args.naive_frames, n)
    cn = c.slice(0, nn)
    w_naive, h_naive = mode_weights(enc, cn), head_params(enc, cn, True)
    list(naive_frames(image, lm, w_naive[:2], None if h_naive is None else h_naive[:2]))
    naive, enc_only = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        for _f in naive_frames(image, lm, w_naive, h_naive):
            pass
        naive.append(time.perf_counter() - t)
        still = np.ascontiguousarray(image)
        t = time.perf_counter()
        encode_mp4((still for _ in range(n)), 25, (512, 512), preset="veryfast")
        enc_only.append(time.perf_counter() - t)
    med = statistics.median
    print(f"render only        : {n / med(render):7.1f} fps  (goal >= 400)")
    print(f"render + encode    : {n / med(full):7.1f} fps  (goal >= 150, libx264 veryfast)")
    print(f"encode per avatar  : {1000 * (med(detect) + med(build)):7.1f} ms  (MediaPipe {1000 * med(detect):.1f} + fields {1000 * med(build):.1f}; goal <= 200)")
    print(f"memory per avatar  : {enc.nbytes / 1e6:7.2f} MB  (goal <= 20)")
    print(f"request->1st frame : {med(first):7.1f} ms  (after the avatar is cached)")
    fps_render, fps_full = n / med(render), n / med(full)
    fps_naive, fps_enc = nn / med(naive), n / med(enc_only)
    print(f"baseline naive     : {fps_naive:7.1f} fps  (per frame: fields rebuilt from landmarks + full-frame 512x512 remap, "
          f"no shading; {nn} frames/run, runs: {', '.join(f'{nn / x:.1f}' for x in naive)})")
    print(f"render / naive     : {fps_render / fps_naive:7.1f} x")
    print(f"baseline encode    : {fps_enc:7.1f} fps  (libx264 veryfast, {n} still frames, same encode_mp4 path; "
          f"runs: {', '.join(f'{n / x:.1f}' for x in enc_only)})")
    print(f"(render+encode) / encode-only : {fps_full / fps_enc:5.3f}  (1.0 = the encoder's ceiling)")
    drive_ms = bench_driving(args.runs)
    print(f"driving 60 s speech: {drive_ms:7.1f} ms  (phoneme timings + audio, 1500 frames; "
          f"{60_000 / drive_ms:.0f}x real time)")
    print(f"runs per figure: {args.runs} (medians)")


def bench_driving(runs: int) -> float:
    """Median ms to turn a minute of real Piper speech (timings and audio) into face controls."""
    from gpu_service.speech.protocol import SpeechRequest
    from gpu_service.speech.engines.piper import PiperEngine
    from gpu_service.talking_head.driving import drive

    piper = PiperEngine()
    piper.load("cpu")
    sp = piper.synthesize(SpeechRequest(text="Please bring me the map of the moon. Well, we will meet them by the pool at noon."))
    reps = int(np.ceil(60.0 / sp.duration_s))
    audio = np.tile(sp.audio, reps)[: 60 * sp.sample_rate]
    phones = [(p.phoneme, p.start_s + i * sp.duration_s, p.end_s + i * sp.duration_s) for i in range(reps) for p in sp.phonemes]
    phones = [p for p in phones if p[2] <= 60.0]
    drive(60.0, 25.0, phonemes=phones, audio=audio, sample_rate=sp.sample_rate)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        drive(60.0, 25.0, phonemes=phones, audio=audio, sample_rate=sp.sample_rate)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
