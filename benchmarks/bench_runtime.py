"""End-to-end latency of the runtime for about ten seconds of speech, and each stage's share.

Starts the real GPU service (Piper) and the runtime as processes on free ports, warms up once,
then times N synchronous POST /api/v1/generate calls from the client's side. Prints a table and
one JSON line. Goal on a 2-core CPU: median <= 2.5 s.

Baseline, measured in the same run against the same GPU service: the whole text sent straight to
it, /tts/generate (JSON) and then /video/generate with its audio_url and phonemes (MP4 with
audio), one after the other, with no runtime and no chunking; printed as runtime / direct. Runtime
and direct runs alternate, so that a change in the machine's load weighs on both alike.

    .venv/bin/python benchmarks/bench_runtime.py [--runs 5] [--text "..."]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import free_port, stop_process, wait_ready  # noqa: E402

TEXT = (
    "Good morning, and welcome to the weekly update. Sales grew in every region this quarter, "
    "and the new support portal cut waiting times in half. Thank you all for your hard work."
)
STAGES = ("tts", "video", "join", "mux", "captions_thumbnail")


def _start(argv: list[str], env: dict, url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(f"{url}/ready", 180, proc)
    return proc


def _avatar(gpu_url: str) -> dict:
    items = httpx.get(f"{gpu_url}/avatars", timeout=30).json()
    if items:
        return {"avatar_id": items[0]["avatar_id"]}
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    return {"avatar_image": base64.b64encode(buf.getvalue()).decode()}


def direct_once(http: httpx.Client, text: str, avatar: dict) -> float:
    """Seconds for the baseline: the text straight through the GPU service, speech then video, no runtime."""
    started = time.perf_counter()
    tts = http.post("/tts/generate", json={"text": text}, headers={"Accept": "application/json"})
    tts.raise_for_status()
    speech = tts.json()
    # audio_url keeps the speech on the service: the cheapest direct path (the runtime does the same).
    video = http.post("/video/generate", json={**avatar, "audio_url": speech["audio_url"],
                                                "phonemes": speech["phonemes"], "text": text, "response": "mp4"})
    video.raise_for_status()
    if not video.content:
        raise RuntimeError("the GPU service returned an empty video")
    return time.perf_counter() - started


def runtime_once(http: httpx.Client, body: dict) -> tuple[float, dict]:
    """Seconds for one synchronous submit to the runtime, and the finished job."""
    started = time.perf_counter()
    resp = http.post("/api/v1/generate", json=body)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    return elapsed, resp.json()


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--text", default=TEXT)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    gpu_port, rt_port = free_port(), free_port()
    gpu_url, rt_url = f"http://127.0.0.1:{gpu_port}", f"http://127.0.0.1:{rt_port}"
    procs = []
    try:
        procs.append(_start([sys.executable, "-m", "gpu_service"],
                            {"HOST": "127.0.0.1", "PORT": str(gpu_port), "DATA_DIR": str(tmp / "gpu"), "TTS_ENGINES": "piper"},
                            gpu_url, tmp / "gpu.log"))
        procs.append(_start([sys.executable, "-m", "runtime"],
                            {"HOST": "127.0.0.1", "PORT": str(rt_port), "GPU_SERVICE_URL": gpu_url,
                             "DATA_DIR": str(tmp / "runtime"), "RUNTIME_API_KEYS": "", "REDIS_URL": "", "LOG_LEVEL": "warning"},
                            rt_url, tmp / "runtime.log"))
        body = {"text": args.text, **_avatar(gpu_url)}
        avatar = {k: v for k, v in body.items() if k != "text"}
        with httpx.Client(base_url=rt_url, timeout=600) as rt_http, httpx.Client(base_url=gpu_url, timeout=600) as gpu_http:
            runtime_once(rt_http, body)  # warm-ups
            direct_once(gpu_http, args.text, avatar)
            # alternated, so that a change in the machine's load (other processes) weighs on both alike
            runs, direct = [], []
            for _ in range(args.runs):
                runs.append(runtime_once(rt_http, body))
                direct.append(direct_once(gpu_http, args.text, avatar))
    finally:
        for proc in reversed(procs):
            stop_process(proc)
    e2e = [r[0] for r in runs]
    median = statistics.median(e2e)
    speech_s = runs[0][1]["duration_s"]
    shares = {}
    for stage in STAGES:
        shares[stage] = statistics.median(job["timings"].get(stage, 0.0) / 1000 / el for el, job in runs)
    shares["overhead"] = max(0.0, 1 - sum(shares.values()))
    print(f"runtime end-to-end, {speech_s:.2f} s of speech, {args.runs} runs on {os.cpu_count()} CPU cores")
    print(f"  median {median:.3f} s   min {min(e2e):.3f} s   max {max(e2e):.3f} s   (goal <= 2.5 s)")
    print(f"  real-time factor {median / speech_s:.3f}")
    print("  stage busy time as a share of end-to-end (speech of chunk n+1 overlaps video of chunk n,")
    print("  so shares may add up past 100 %; overhead is what no stage accounts for):")
    for stage, share in shares.items():
        ms = statistics.median(job["timings"].get(stage, 0.0) for _, job in runs) if stage != "overhead" else share * median * 1000
        print(f"  {stage:<20} {share * 100:5.1f} %   {ms:7.1f} ms")
    direct_median = statistics.median(direct)
    print("baseline: same text straight to the GPU service (/tts/generate then /video/generate, no runtime, no chunking)")
    print(f"  median {direct_median:.3f} s   min {min(direct):.3f} s   max {max(direct):.3f} s   ({args.runs} runs)")
    paired = statistics.median(r[0] / d for r, d in zip(runs, direct))
    print(f"  runtime / direct ratio {median / direct_median:.3f}  (below 1 would mean the chunk overlap beats the direct calls; above 1 is the runtime's cost)")
    print(f"  median of the paired ratios {paired:.3f}  (each runtime run over the direct run right after it: steadier under a changing load)")
    print(json.dumps({"speech_s": speech_s, "runs": args.runs, "median_s": round(median, 4), "min_s": round(min(e2e), 4),
                      "max_s": round(max(e2e), 4), "shares": {k: round(v, 4) for k, v in shares.items()},
                      "direct_median_s": round(direct_median, 4), "runtime_over_direct": round(median / direct_median, 4),
                      "paired_ratio_median": round(paired, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
