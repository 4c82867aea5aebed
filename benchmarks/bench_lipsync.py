"""Lip-sync speed at 1280x720: this tree against a baseline git ref (default `main`), measured in the same run.

Prints figures; asserts nothing. The input is a real talking clip (kit clip v01 by default: a
GRID speaker, 360x288) scaled to 1280x720 (its height to 720 and padded at the sides, looped to
the audio's length) and a real speech WAV (LJSpeech a01 by default, 8.1 s), re-voiced with the
`trim` policy. The baseline is the ref checked out into a temporary git worktree and imported
in a child process with PYTHONPATH pointing at it; this tree runs the same way. Runs alternate
(baseline, new, new, baseline, ...) so a change in the machine's load hits both alike. Each run
is a fresh child process (model load and warm-up excluded from the timing).

Per run it prints fps (frames / wall time of `engine.lipsync`), the CPU time per frame of the
worker process and of its ffmpeg children (less sensitive to other load than wall time), and
per-stage wall ms per frame: decode (blocked reading decoded frames from ffmpeg), landmarks
(face tracking), driving (speech to controls), face (encoding the frame's face fields), render,
encode (blocked handing frames to x264 plus finishing the MP4). With stages in threads they
overlap, so they sum to more than the wall time. A pass-through (the same decode and encode, no
face work) of this tree is measured in the same rounds as the floor.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_lipsync.py [--runs 5] [--baseline main] [--clip MP4] [--audio WAV] [--soundtrack]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_lipsync.py --runs 1 --long-s 60   # plus peak memory on a long clip
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KIT = Path(os.environ.get("KIT_MEDIA") or next(
    (p / "shared" / "media" for p in REPO.parents if (p / "shared" / "media").is_dir()), REPO / "tests" / "fixtures" / "media"))
"""The real-media kit (`../shared/media` beside the checkout, or KIT_MEDIA); else the test fixtures' copy of v01."""
DEFAULT_CLIP = next(KIT.glob("**/v01_*.mp4"), KIT / "video" / "v01_grid_swiz3n_darker_skin_moustache.mp4")
DEFAULT_AUDIO = next(KIT.glob("**/a01_*.wav"), None) or next(KIT.glob("**/a0*.wav"), KIT / "audio" / "a01.wav")
STAGES = ("decode", "landmarks", "driving", "face", "render", "encode")


class _Clock:
    """Wall time spent inside one stage, summed over calls (thread-safe enough: one writer per stage)."""

    def __init__(self) -> None:
        self.s = 0.0

    def wrap_iter(self, it):
        """Yield from `it`, counting the time spent waiting for each item."""
        it = iter(it)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.s += time.perf_counter() - t
                return
            self.s += time.perf_counter() - t
            yield item


def _worker(video: str, audio: str, policy: str) -> None:
    """Child process: one lip-sync job on whichever tree PYTHONPATH names; print its figures as JSON."""
    import resource
    import tracemalloc

    from gpu_service.lipsync import stream_io
    from gpu_service.lipsync.engines import landmark
    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.stream_io import decode_audio_file, open_video

    decode, upstream, encode = _Clock(), _Clock(), _Clock()
    frames_of = stream_io.VideoSource._frames

    def timed_frames(self, *a, **k):
        return decode.wrap_iter(frames_of(self, *a, **k))

    stream_io.VideoSource._frames = timed_frames
    encode_mp4 = landmark.encode_mp4

    def timed_encode(frames, *a, **k):
        # Everything the encoder waits for upstream is counted apart; the rest is the encoder's own.
        before = upstream.s
        t = time.perf_counter()
        out = encode_mp4(upstream.wrap_iter(frames), *a, **k)
        encode.s += time.perf_counter() - t - (upstream.s - before)
        return out

    landmark.encode_mp4 = timed_encode
    engine = landmark.LandmarkLipSync()
    engine.load("cpu")
    engine.warmup()
    src = open_video(Path(video), max_s=3600, max_pixels=1920 * 1080)
    wav, rate = decode_audio_file(Path(audio), max_s=3600)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    track_mem = os.environ.get("BENCH_TRACEMALLOC") == "1"
    if track_mem:
        tracemalloc.start()
    r0s, r0c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = engine.lipsync(LipSyncJob(video=src, audio=wav, sample_rate=rate, length_policy=policy))
    wall = time.perf_counter() - t0
    r1s, r1c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    py_peak = tracemalloc.get_traced_memory()[1] if track_mem else 0
    t = res.timings_ms
    n = res.frames
    stages = {"decode": decode.s * 1000, "landmarks": t.get("track", 0.0), "driving": t.get("drive", 0.0),
              "face": t.get("encode_face", 0.0), "render": t.get("render", 0.0), "encode": encode.s * 1000}
    print(json.dumps({
        "frames": n, "wall_s": wall, "fps": n / wall, "mp4_mb": len(res.mp4) / 2**20,
        "cpu_ms_per_frame": (r1s.ru_utime + r1s.ru_stime - r0s.ru_utime - r0s.ru_stime) * 1000 / n,
        "ffmpeg_cpu_ms_per_frame": (r1c.ru_utime + r1c.ru_stime - r0c.ru_utime - r0c.ru_stime) * 1000 / n,
        "stages_ms_per_frame": {k: v / n for k, v in stages.items()},
        "rss_before_mb": base_rss / 1024, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ffmpeg_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "python_alloc_peak_mb": py_peak / 2**20, "timings_ms": t,
    }))


def _passthrough(video: str, audio: str, policy: str) -> None:
    """Child process, the floor: the same decode -> encode pipes and audio as a job, with no face work."""
    import numpy as np

    from gpu_service.lipsync.engines.landmark import LandmarkLipSync
    from gpu_service.lipsync.stream_io import decode_audio_file, frames_in_order, open_video, plan_length
    from gpu_service.talking_head.video import encode_mp4

    settings = LandmarkLipSync()  # the job's x264 preset and CRF, without loading its models
    x264 = {"x264_params": settings.x264_params} if getattr(settings, "x264_params", None) else {}
    encode_mp4([np.zeros((128, 128, 3), np.uint8)] * 2, 25, (128, 128), preset=settings.x264_preset, crf=settings.crf,
               **x264)
    src = open_video(Path(video), max_s=3600, max_pixels=1920 * 1080)
    wav, rate = decode_audio_file(Path(audio), max_s=3600)
    t0 = time.perf_counter()
    fps = float(src.fps)
    n_out = plan_length(max(src.estimated_frames(), 1), max(1, int(round(len(wav) / rate * fps))), policy)
    n_samples = int(round(n_out / fps * rate))
    sound = wav[:n_samples] if len(wav) >= n_samples else np.pad(wav, (0, n_samples - len(wav)))
    frames = (f for _, f in frames_in_order(src, n_out, policy, 64))
    mp4, facts = encode_mp4(frames, src.fps, src.size, audio=sound, sample_rate=rate,
                            preset=settings.x264_preset, crf=settings.crf, like=src.info, **x264)
    wall = time.perf_counter() - t0
    print(json.dumps({"frames": facts["frames"], "wall_s": wall, "fps": facts["frames"] / wall}))


def _job(tree: Path, video: Path, audio: Path, policy: str = "trim", mode: str = "--worker",
         env_extra: dict | None = None) -> dict:
    """One child process running this script's worker against the code in `tree`."""
    env = {"PYTHONPATH": str(tree), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           **(env_extra or {})}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode, str(video), str(audio), policy],
                         capture_output=True, text=True, cwd=tree, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{tree}: {out.stderr[-3000:]}")
    return json.loads(lines[-1])


def make_clip(clip: Path, audio: Path, out: Path, size: tuple[int, int] = (1280, 720), soundtrack: bool = False) -> None:
    """`clip` scaled to fit `size` (padded at the sides or top), looped to cover the audio, H.264 CRF 18; no audio,
    or with `soundtrack` its own (looped with it), as a filmed talker's clip comes."""
    import soundfile as sf

    from gpu_service.talking_head.video import ffmpeg_exe

    w, h = size
    seconds = sf.info(str(audio)).duration + 0.5
    vf = (f"scale={w}:{h}:force_original_aspect_ratio=decrease:flags=lanczos,"
          f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2,setsar=1")
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(clip),
                    "-t", f"{seconds:.2f}", *(["-c:a", "aac"] if soundtrack else ["-an"]), "-vf", vf,
                    "-c:v", "libx264", "-preset", "fast", "-crf", "18", "-pix_fmt", "yuv420p", str(out)], check=True)


def _baseline_tree(ref: str, root: Path) -> Path:
    """`ref` checked out (detached) into a temporary worktree under `root`."""
    path = root / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path), ref],
                   check=True, capture_output=True)
    return path


def _row(name: str, runs: list[dict]) -> str:
    fps = [r["fps"] for r in runs]
    st = {k: statistics.median(r["stages_ms_per_frame"][k] for r in runs) for k in STAGES}
    cpu = statistics.median(r["cpu_ms_per_frame"] for r in runs)
    ff = statistics.median(r["ffmpeg_cpu_ms_per_frame"] for r in runs)
    return (f"{name:<9} median {statistics.median(fps):6.2f} fps (all: {', '.join('%.2f' % f for f in fps)}); "
            f"CPU ms/frame: worker {cpu:.1f}, ffmpeg {ff:.1f}; stage ms/frame: "
            + ", ".join(f"{k} {v:.1f}" for k, v in st.items()))


def main() -> None:
    """Make the 720p clip, run baseline and new jobs alternately, print medians, stages and the ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", default="main", help="git ref measured as the old code ('' to skip)")
    ap.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    ap.add_argument("--long-s", type=float, default=0.0, help="also measure peak memory on a clip this long (new code)")
    ap.add_argument("--soundtrack", action="store_true",
                    help="keep the clip's own audio: the shared silences and the speaker's own opening are then measured too")
    ap.add_argument("--worker", nargs=3)
    ap.add_argument("--passthrough", nargs=3)
    args = ap.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    if args.passthrough:
        _passthrough(*args.passthrough)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_lipsync_"))
    clip = tmp / "clip720.mp4"
    make_clip(args.clip, args.audio, clip, soundtrack=args.soundtrack)
    trees = {"new": REPO}
    if args.baseline:
        trees = {"baseline": _baseline_tree(args.baseline, tmp), "new": REPO}
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load {load:.1f}; clip {args.clip.name} -> 1280x720"
          f"{' with its soundtrack' if args.soundtrack else ''}, audio {args.audio.name}; "
          f"baseline {args.baseline or 'none'}; work dir {tmp}")
    results: dict[str, list[dict]] = {k: [] for k in trees}
    floor: list[dict] = []
    try:
        for i in range(args.runs):
            order = list(trees) if i % 2 == 0 else list(trees)[::-1]
            for name in order:
                results[name].append(_job(trees[name], clip, args.audio))
                r = results[name][-1]
                print(f"  run {i + 1} {name}: {r['frames']} frames {r['fps']:.2f} fps", flush=True)
            floor.append(_job(REPO, clip, args.audio, mode="--passthrough"))
        print(f"1280x720, {results['new'][0]['frames']} frames, {args.runs} runs each, alternating:")
        for name, runs in results.items():
            print(_row(name, runs))
        floor_fps = statistics.median(r["fps"] for r in floor)
        new_fps = statistics.median(r["fps"] for r in results["new"])
        print(f"pass-through (decode -> encode, same audio, no face work, this tree): median {floor_fps:.2f} fps; "
              f"lip-sync / pass-through {new_fps / floor_fps:.3f}")
        if "baseline" in results:
            old_fps = statistics.median(r["fps"] for r in results["baseline"])
            old_cpu = statistics.median(r["cpu_ms_per_frame"] + r["ffmpeg_cpu_ms_per_frame"] for r in results["baseline"])
            new_cpu = statistics.median(r["cpu_ms_per_frame"] + r["ffmpeg_cpu_ms_per_frame"] for r in results["new"])
            paired = [n["fps"] / o["fps"] for n, o in zip(results["new"], results["baseline"])]
            print(f"new / baseline: fps {new_fps / old_fps:.2f}x (per round: {', '.join('%.2f' % p for p in paired)}); "
                  f"CPU per frame (worker + ffmpeg) {old_cpu:.1f} -> {new_cpu:.1f} ms ({old_cpu / new_cpu:.2f}x less)")
        if args.long_s > 0:
            _long(clip, args.audio, tmp, args.long_s)
    finally:
        if "baseline" in trees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(trees["baseline"])],
                           capture_output=True)


def _long(clip: Path, audio: Path, tmp: Path, seconds: float) -> None:
    """Peak memory of one long 720p job on this tree: the clip looped, the speech repeated."""
    import numpy as np
    import soundfile as sf

    from gpu_service.talking_head.video import ffmpeg_exe

    long_clip, long_audio = tmp / "long720.mp4", tmp / "long.wav"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(clip),
                    "-t", str(seconds), "-c", "copy", str(long_clip)], check=True)
    wav, sr = sf.read(str(audio), dtype="float32")
    sf.write(long_audio, np.tile(wav, int(np.ceil(seconds * sr / len(wav))))[: int(seconds * sr)], sr)
    r = _job(REPO, long_clip, long_audio, env_extra={"BENCH_TRACEMALLOC": "1"})
    print(f"long 1280x720 {seconds:g} s ({r['frames']} frames): {r['fps']:.2f} fps; worker RSS {r['rss_before_mb']:.0f} MB "
          f"after load -> {r['rss_peak_mb']:.0f} MB peak; python allocations peak {r['python_alloc_peak_mb']:.0f} MB "
          f"(the MP4, {r['mp4_mb']:.1f} MB, included); ffmpeg children peak {r['ffmpeg_peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
