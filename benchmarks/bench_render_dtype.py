"""Torch render path by precision: float32 (the baseline, measured in the same run) against float16 and bfloat16.

Renders the same clip of the astronaut (512x512, mouth, blinks and head motion) at each dtype on
one device and prints render-only fps (medians), the ratio to float32, how far the frames are from
float32's (mean and max grey levels) and, on CUDA, the peak memory of a batch.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_render_dtype.py [--device cuda] [--frames 256] [--batch 16] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    """Print fps, the ratio to float32 and the difference to float32's frames for each dtype."""
    import torch
    from skimage import data

    from gpu_service.talking_head.controls import Controls
    from gpu_service.talking_head.encoding import encode_image
    from gpu_service.talking_head.renderer import Renderer

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    enc = encode_image(data.astronaut())
    n = args.frames
    rng = np.random.default_rng(0)
    c = Controls.neutral(n, 25.0)
    c.mouth_open[:] = np.clip(0.5 + 0.5 * np.sin(np.arange(n) / 3.0), 0, 1)
    c.blink[:] = (rng.uniform(size=n) > 0.95).astype(np.float32)
    c.head_roll[:] = 0.02 * np.sin(np.arange(n) / 20.0)
    c.head_dx[:] = 0.01 * np.sin(np.arange(n) / 30.0)
    cuda = args.device.startswith("cuda")
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        r = Renderer(args.device, backend="torch", batch=args.batch, dtype=dtype)
        r.render(enc, c.slice(0, args.batch))  # warm: kernels chosen, the avatar's tensors resident
        times = []
        for _ in range(args.runs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            frames = r.render(enc, c)
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        results[dtype] = (n / statistics.median(times), frames, r.precision, peak)
    base_fps, base_frames = results["float32"][0], results["float32"][1]
    print(f"device {args.device}, {n} frames 512x512, batch {args.batch}, medians of {args.runs} runs, torch {torch.__version__}")
    for dtype, (fps, frames, precision, peak) in results.items():
        diff = np.abs(frames.astype(np.int16) - base_frames.astype(np.int16))
        mem = f", peak {peak:7.1f} MiB" if cuda else ""
        print(f"{dtype:9s}: {fps:7.1f} fps  x{fps / base_fps:5.2f} of float32  "
              f"diff mean {diff.mean():.4f} max {int(diff.max()):2d} grey levels{mem}  ({precision})")


if __name__ == "__main__":
    main()
