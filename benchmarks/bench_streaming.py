"""Real-time streaming over WebRTC: what a viewer receives, measured by an aiortc viewer (gpu_service/streaming/probe.py).

Prints figures; asserts nothing. Each run opens a stream session, connects --viewers viewers to it
(recvonly audio + video, non-trickle offer) and records every RTP packet's and decoded frame's arrival:

- offer -> first decoded frame (the offer posted, until the first video frame is decoded);
- fps over the window and the 95th percentile of the interval between frames, of decoded frames and at
  the network (each frame's first packet: what the service sent, free of the probe's decoding);
- A/V offset at the start and the end of the window (median over 2 s each): offset(k) = arrival of video
  frame k - arrival of the audio holding sample k * 48000/fps, k from the RTP pts, at the network (the
  transport's figure) and after the probe decoded it (aiortc's receiver holds audio 80 ms, video 40 ms);
- CPU per viewer: the service's CPU (its /proc entry: --spawn, or --url with --service-pid) with
  --viewers viewers minus with one, per extra viewer; in process (--pattern or the default) the process
  also decodes, so that figure includes the probes' decoding and is printed as such;
- the session's own counters where it has them (late ticks).

Medians over --runs are printed at the end. Sources:

    # in process, a real session (landmark talking head, idle; --say adds an utterance mid-window)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_streaming.py [--size 256x256] [--seconds 20] [--runs 3] [--say]
    # in process, the transport alone over a test pattern (no engines)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_streaming.py --pattern
    # a live service, or one started here as a child process (its CPU measured from /proc)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_streaming.py --url http://127.0.0.1:8001 [--service-pid PID]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_streaming.py --spawn --viewers 3

The issue's figures: fps over 2 minutes (--seconds 120) and drift after 10 minutes (--seconds 600).
The say -> first open mouth figure is the stream core's (added to this script by it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from gpu_service.streaming.probe import StreamProbe, TestPatternSession  # noqa: E402


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    """Where sessions come from: create one, post offers to it, end it."""

    client: httpx.AsyncClient
    pid: Optional[int] = None
    in_process = False

    async def create(self, size: tuple[int, int], fps: int) -> dict:
        r = await self.client.post("/stream/sessions", json={"avatar_id": self.avatar, "size": list(size), "fps": fps})
        r.raise_for_status()
        return r.json()

    async def offer(self, created: dict, offer: dict) -> dict:
        r = await self.client.post(created["offer_url"], json=offer)
        r.raise_for_status()
        return r.json()

    async def say(self, created: dict, text: str) -> None:
        (await self.client.post(created["say_url"], json={"text": text})).raise_for_status()

    async def end(self, created: dict) -> None:
        await self.client.delete(f"/stream/sessions/{created['session_id']}")

    def session_stats(self, created: dict) -> dict:
        return {}


class PatternTarget(Target):
    """In process: the WebRTC router over test-pattern sessions (the transport alone)."""

    in_process = True

    @contextlib.asynccontextmanager
    async def open(self, args):
        from tests.streaming.test_webrtc import transport_app

        async with transport_app() as client:
            self.client, self.sessions = client, client.app.state.streams.sessions
            self.pid = os.getpid()
            yield self

    async def create(self, size, fps):
        sid = f"pattern-{len(self.sessions)}"
        self.sessions[sid] = TestPatternSession(sid, fps=fps, size=size)
        return {"session_id": sid, "offer_url": f"/stream/sessions/{sid}/offer"}

    async def say(self, created, text):
        pass

    async def end(self, created):
        await self.sessions.pop(created["session_id"]).close()


class AppTarget(Target):
    """In process: the whole GPU service app (create_app), real sessions."""

    in_process = True

    @contextlib.asynccontextmanager
    async def open(self, args):
        from gpu_service.settings import Settings
        from tests.conftest import running_app

        settings = Settings(device="cpu", tts_engines=["piper"], lipsync_engines=[], warmup=False,
                            data_dir=Path(tempfile.mkdtemp(prefix="bench-stream-")) / "data")
        self.avatar = args.avatar
        async with running_app(settings) as client:
            self.client, self.app = client, client.app
            self.pid = os.getpid()
            yield self

    def session_stats(self, created):
        with contextlib.suppress(Exception):
            session = self.app.state.streams.get(created["session_id"])
            return {"late_ticks": getattr(session, "late_ticks", None)}
        return {}


class UrlTarget(Target):
    """A live service (or one spawned here)."""

    @contextlib.asynccontextmanager
    async def open(self, args):
        self.avatar = args.avatar
        proc = None
        url = args.url
        if args.spawn:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu", "TTS_ENGINES": "piper",
                   "LIPSYNC_ENGINES": "", "WARMUP": "false", "LOG_LEVEL": "warning", "PYTHONPATH": str(REPO),
                   "DATA_DIR": tempfile.mkdtemp(prefix="bench-stream-")}
            proc = subprocess.Popen([sys.executable, "-m", "gpu_service"], cwd=REPO, env=env)
            url = f"http://127.0.0.1:{port}"
        self.pid = proc.pid if proc else args.service_pid
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                self.client = client
                for _ in range(600):  # bounded: 120 s
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get("/ready")).status_code == 200:
                            break
                    if proc is not None and proc.poll() is not None:
                        raise SystemExit(f"the service exited with {proc.returncode}")
                    await asyncio.sleep(0.2)
                else:
                    raise SystemExit(f"{url} never became ready")
                yield self
        finally:
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    proc.kill()


async def one_run(target: Target, args) -> dict:
    size = tuple(int(v) for v in args.size.lower().split("x"))
    created = await target.create(size, args.fps)
    probes: list[StreamProbe] = []
    try:
        first = StreamProbe(fps=args.fps)
        await first.connect(lambda offer: target.offer(created, offer))
        probes.append(first)
        if not await first.wait_video(1, 15):
            return {"error": "no frame within 15 s"}
        await first.wait_video(int(args.fps) * 2, 10)  # settle
        cpu_one = None
        if target.pid:
            c0, w0 = proc_cpu_s(target.pid), time.monotonic()
            await asyncio.sleep(3.0)
            cpu_one = (proc_cpu_s(target.pid) - c0) / (time.monotonic() - w0)
        for _ in range(args.viewers - 1):
            probe = StreamProbe(fps=args.fps)
            await probe.connect(lambda offer: target.offer(created, offer))
            probes.append(probe)
        for probe in probes[1:]:
            await probe.wait_video(int(args.fps), 10)
        c0, w0 = (proc_cpu_s(target.pid) if target.pid else None), time.monotonic()
        start = time.monotonic()
        said = False
        while time.monotonic() - start < args.seconds:
            await asyncio.sleep(0.5)
            if args.say and not said and time.monotonic() - start > args.seconds / 3:
                await target.say(created, args.text)
                said = True
        cpu_all = (proc_cpu_s(target.pid) - c0) / (time.monotonic() - w0) if target.pid else None
        window = args.seconds - 1.0
        out = first.summary(window_s=window)
        out["viewers"] = len(probes)
        out["other_viewers_fps"] = [p.fps_received(window) for p in probes[1:]]
        out["cpu_one_viewer"] = cpu_one
        out["cpu_all_viewers"] = cpu_all
        if cpu_one is not None and cpu_all is not None and len(probes) > 1:
            out["cpu_per_extra_viewer"] = (cpu_all - cpu_one) / (len(probes) - 1)
        out.update(target.session_stats(created))
        return out
    finally:
        for probe in probes:
            await probe.close()
        with contextlib.suppress(Exception):
            await target.end(created)


def fmt(value: Any, scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * scale:.1f}{unit}"
    return str(value)


async def main(args) -> None:
    target: Target = PatternTarget() if args.pattern else UrlTarget() if (args.url or args.spawn) else AppTarget()
    runs = []
    async with target.open(args):
        for i in range(args.runs):
            result = await one_run(target, args)
            runs.append(result)
            print(f"run {i + 1}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                for k, v in result.items()}), flush=True)
    good = [r for r in runs if "error" not in r]
    if not good:
        print("no run succeeded")
        return

    def med(key):
        values = [r[key] for r in good if r.get(key) is not None]
        return statistics.median(values) if values else None

    source = "test pattern (transport only)" if args.pattern else (args.url or "spawned service") \
        if (args.url or args.spawn) else "in-process service"
    cpu_note = " (includes the in-process probes' decoding)" if target.in_process else ""
    print(f"\nWebRTC streaming, {source}, {args.size} at {args.fps} fps, {args.viewers} viewer(s), "
          f"{args.seconds:.0f} s window, median of {len(good)} run(s), codec {good[0].get('codec')}")
    print(f"  offer -> first decoded frame   {fmt(med('first_frame_s'), 1000, ' ms')}")
    print(f"  fps (first viewer)             {fmt(med('fps'))}")
    print(f"  p95 frame interval             {fmt(med('p95_interval_s'), 1000, ' ms')}")
    print(f"  at the network: fps, p95       {fmt(med('rtp_fps'))}, {fmt(med('rtp_p95_interval_s'), 1000, ' ms')}"
          "  (frames' first packets, before the probe decodes)")
    print(f"  A/V offset start / end (RTP)   {fmt(med('av_offset_start_s'), 1000, ' ms')} / "
          f"{fmt(med('av_offset_end_s'), 1000, ' ms')}  (+: video later)")
    print(f"  A/V offset start / end (decoded by aiortc) {fmt(med('decoded_av_offset_start_s'), 1000, ' ms')} / "
          f"{fmt(med('decoded_av_offset_end_s'), 1000, ' ms')}")
    print(f"  CPU, one viewer                {fmt(med('cpu_one_viewer'), 100, '% of a core')}{cpu_note}")
    if args.viewers > 1:
        print(f"  CPU per extra viewer           {fmt(med('cpu_per_extra_viewer'), 100, '% of a core')}{cpu_note}")
        others = [f for r in good for f in r.get("other_viewers_fps") or [] if f is not None]
        print(f"  other viewers' fps (min)       {fmt(min(others) if others else None)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a live GPU service")
    parser.add_argument("--service-pid", type=int, help="its process id (for its CPU), with --url on this host")
    parser.add_argument("--spawn", action="store_true", help="start a GPU service here as a child process")
    parser.add_argument("--pattern", action="store_true", help="in process, test-pattern sessions (transport only)")
    parser.add_argument("--avatar", default="astronaut")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--viewers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--say", action="store_true", help="say --text a third into the window")
    parser.add_argument("--text", default="Hello, and welcome. I am streaming to you in real time over WebRTC.")
    asyncio.run(main(parser.parse_args()))
