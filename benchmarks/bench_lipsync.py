"""Lip-sync benchmark: frames per second at 512x512 and 1280x720 on this machine, and peak memory on a long clip.

Prints figures; asserts nothing. The source clips are the astronaut talking (talking head + Piper),
the long one is the 720p clip looped with ffmpeg to --long-s seconds. Memory is measured in a fresh
child process (ru_maxrss of the worker, and separately of its ffmpeg children), so it is the whole
footprint of one job and not the benchmark's.

Baseline, measured in the same run on the same clips and audio: a plain pass-through, the source
decoded through stream_io's pipes (frames_in_order, trim) and encoded with the same encode_mp4
settings and audio, no face work; printed as its fps and lipsync / pass-through.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_lipsync.py [--runs 3] [--long-s 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _canvas(size: tuple[int, int]) -> np.ndarray:
    """The astronaut's portrait placed on a frame of `size` (w, h), the face about a fifth of the height."""
    from skimage import data

    w, h = size
    img = data.astronaut()
    scale = h / 512 * 1.0
    face = cv2.resize(img, (int(512 * scale), int(512 * scale)))
    out = np.full((h, w, 3), 200, np.uint8)
    x0 = (w - face.shape[1]) // 2
    out[:, x0:x0 + face.shape[1]] = face[:h]
    return out


def _worker(video: str, audio: str, policy: str) -> None:
    """Child process: one lip-sync job, then print its figures and peak memory as JSON."""
    import resource
    import tracemalloc

    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync
    from gpu_service.lipsync.stream_io import decode_audio_file, open_video

    engine = LandmarkLipSync()
    engine.load("cpu")
    engine.warmup()
    src = open_video(Path(video), max_s=3600, max_pixels=1920 * 1080)
    wav, rate = decode_audio_file(Path(audio), max_s=3600)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    res = engine.lipsync(LipSyncJob(video=src, audio=wav, sample_rate=rate, length_policy=policy))
    wall = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    print(json.dumps({
        "frames": res.frames, "wall_s": wall, "fps": res.frames / wall, "mp4_mb": len(res.mp4) / 2**20,
        "rss_before_mb": base_rss / 1024, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ffmpeg_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "python_alloc_peak_mb": py_peak / 2**20, "timings_ms": res.timings_ms,
    }))


def _passthrough(video: str, audio: str, policy: str) -> None:
    """Child process, baseline: the same decode -> encode pipes and audio as a job, with no face work."""
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync
    from gpu_service.lipsync.stream_io import decode_audio_file, frames_in_order, open_video, plan_length
    from gpu_service.talking_head.video import encode_mp4

    settings = LandmarkLipSync()  # the job's x264 preset and CRF, without loading its models
    encode_mp4([np.zeros((128, 128, 3), np.uint8)] * 2, 25, (128, 128), preset=settings.x264_preset, crf=settings.crf)
    src = open_video(Path(video), max_s=3600, max_pixels=1920 * 1080)
    wav, rate = decode_audio_file(Path(audio), max_s=3600)
    t0 = time.perf_counter()
    fps = float(src.fps)
    n_out = plan_length(max(src.estimated_frames(), 1), max(1, int(round(len(wav) / rate * fps))), policy)
    n_samples = int(round(n_out / fps * rate))
    sound = wav[:n_samples] if len(wav) >= n_samples else np.pad(wav, (0, n_samples - len(wav)))
    frames = (f for _, f in frames_in_order(src, n_out, policy, 64))
    mp4, facts = encode_mp4(frames, src.fps, src.size, audio=sound, sample_rate=rate,
                            preset=settings.x264_preset, crf=settings.crf)
    wall = time.perf_counter() - t0
    print(json.dumps({"frames": facts["frames"], "wall_s": wall, "fps": facts["frames"] / wall, "mp4_mb": len(mp4) / 2**20}))


def _job(video: Path, audio: Path, policy: str = "trim", passthrough: bool = False) -> dict:
    flag = "--passthrough" if passthrough else "--worker"
    out = subprocess.run([sys.executable, __file__, flag, str(video), str(audio), policy], capture_output=True,
                         text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(lines[-1])


def main() -> None:
    """Make the clips, run the jobs, print the medians."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--long-s", type=float, default=60.0)
    ap.add_argument("--worker", nargs=3)
    ap.add_argument("--passthrough", nargs=3)
    args = ap.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    if args.passthrough:
        _passthrough(*args.passthrough)
        return

    import soundfile as sf

    from gpu_service.speech.engines.piper import PiperEngine
    from gpu_service.talking_head.video import ffmpeg_exe
    from tests.lipsync.media import SENTENCE_A, SENTENCE_B, speak, talking_clip

    tmp = Path(tempfile.mkdtemp(prefix="bench_lipsync_"))
    piper = PiperEngine()
    piper.load("cpu")
    audio_b, sr_b, _ = speak(piper, SENTENCE_B)
    sf.write(tmp / "b.wav", audio_b, sr_b)
    clips = {}
    for name, size in (("512x512", (512, 512)), ("1280x720", (1280, 720))):
        clips[name] = tmp / f"{name}.mp4"
        talking_clip(piper, SENTENCE_A, clips[name], portrait=_canvas(size))
    print(f"machine: {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; clips in {tmp}")
    for name, clip in clips.items():
        runs = [_job(clip, tmp / "b.wav") for _ in range(args.runs)]
        fps = statistics.median(r["fps"] for r in runs)
        t = runs[0]["timings_ms"]
        per = {k: round(t[k] / runs[0]["frames"], 1) for k in ("track", "encode_face", "render")}
        print(f"{name}: {runs[0]['frames']} frames, median {fps:.2f} fps over {args.runs} runs "
              f"(all: {', '.join('%.2f' % r['fps'] for r in runs)}); ms/frame {per}")
        base = [_job(clip, tmp / "b.wav", passthrough=True) for _ in range(args.runs)]
        base_fps = statistics.median(r["fps"] for r in base)
        print(f"{name} baseline pass-through (stream_io decode -> encode_mp4, same audio, no face work): "
              f"{base[0]['frames']} frames, median {base_fps:.2f} fps (all: {', '.join('%.2f' % r['fps'] for r in base)}); "
              f"lipsync / pass-through {fps / base_fps:.3f}")

    long_clip = tmp / "long720.mp4"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(clips["1280x720"]),
                    "-t", str(args.long_s), "-c", "copy", str(long_clip)], check=True)
    long_audio = tmp / "long.wav"
    reps = int(np.ceil(args.long_s / (len(audio_b) / sr_b)))
    sf.write(long_audio, np.tile(audio_b, reps)[: int(args.long_s * sr_b)], sr_b)
    r = _job(long_clip, long_audio)
    print(f"long 1280x720 {args.long_s:g} s ({r['frames']} frames): {r['fps']:.2f} fps; worker RSS {r['rss_before_mb']:.0f} MB "
          f"after load -> {r['rss_peak_mb']:.0f} MB peak; python allocations peak {r['python_alloc_peak_mb']:.0f} MB "
          f"(the MP4, {r['mp4_mb']:.1f} MB, included); ffmpeg children peak {r['ffmpeg_peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
