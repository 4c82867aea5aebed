"""Streaming core figures, in process on the real engines (no transport): what a session costs and how fast it answers.

    python benchmarks/bench_stream_core.py [--runs 5] [--hold-s 8] [--sessions 1,2,4,6] [--sizes 512,256]

- say -> first tick with the mouth open (median of --runs), and speech_started's lag behind the say;
- interrupt -> first tick with the mouth closed, in ticks;
- the producer's render time per tick (p50, p95) at each size;
- N sessions at once, each with one viewer taking every tick, for --hold-s: the fps each viewer got,
  the 95th percentile of the interval between ticks, late ticks (released > 1 frame late), and the
  process's CPU seconds per session-second. Figures, not assertions: the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_service.registry import EngineRegistry  # noqa: E402
from gpu_service.settings import Settings  # noqa: E402
from gpu_service.streaming.manager import SessionManager, SessionSpec  # noqa: E402

TEXT = "Sure, I can help with that. The rocket leaves at nine tomorrow morning."


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def latency(manager: SessionManager, avatar: str, runs: int) -> dict:
    session = await manager.create(SessionSpec(avatar_id=avatar))
    sub, feed = session.subscribe(), session.listen()
    opens, closes, started_lag = [], [], []
    for _ in range(runs):
        for _ in range(10):
            await sub.get()
        t0 = time.monotonic()
        uid = await session.say(TEXT)
        first = None
        while True:
            tick = await sub.get()
            if tick.utterance_id == uid and tick.mouth_open > 0.02:
                first = time.monotonic() - t0
                break
        opens.append(first * 1000)
        for _ in range(15):
            tick = await sub.get()
        at = tick.index
        session.interrupt()
        while (tick := await sub.get()).mouth_open > 0.0:
            pass
        closes.append(tick.index - at)
        while (event := feed.get_nowait()) is not None:
            if event["event"] == "speech_started" and event["utterance_id"] == uid:
                started_lag.append(event["t"])
    sub.close(), feed.close()
    await session.close()
    return {"say_to_mouth_open_ms_median": round(statistics.median(opens), 1),
            "say_to_mouth_open_ms": [round(x, 1) for x in opens],
            "interrupt_to_closed_ticks_max": max(closes), "interrupt_to_closed_ticks": closes,
            "underruns": session.underruns, "utterances": list(session.timings)}


async def hold(manager: SessionManager, avatar: str, n: int, size: int, seconds: float) -> dict:
    sessions = [await manager.create(SessionSpec(avatar_id=avatar, size=(size, size))) for _ in range(n)]

    async def view(session):
        sub = session.subscribe()
        times = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await sub.get()
            times.append(time.monotonic())
        sub.close()
        return times

    for s in sessions:  # talking all along: the costlier case
        await s.say(TEXT + " " + TEXT)
    c0, w0 = cpu_s(), time.monotonic()
    views = await asyncio.gather(*(view(s) for s in sessions))
    c1, w1 = cpu_s(), time.monotonic()
    fps = [(len(t) - 1) / (t[-1] - t[0]) for t in views if len(t) > 1]
    gaps = sorted(b - a for t in views for a, b in zip(t, t[1:]))
    render = sorted(ms for s in sessions for ms in s.render_ms)
    out = {"sessions": n, "size": size, "fps_min": round(min(fps), 2), "fps_median": round(statistics.median(fps), 2),
           "interval_p95_ms": round(gaps[int(0.95 * len(gaps))] * 1000, 1),
           "late_ticks": sum(s.late_ticks for s in sessions),
           "render_ms_p50": round(render[len(render) // 2], 2), "render_ms_p95": round(render[int(0.95 * len(render))], 2),
           "cpu_s_per_session_s": round((c1 - c0) / (w1 - w0) / n, 3)}
    for s in sessions:
        await s.close()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hold-s", type=float, default=8.0)
    ap.add_argument("--sessions", default="1,2,4,6")
    ap.add_argument("--sizes", default="512,256")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    counts = [int(x) for x in args.sessions.split(",")]
    settings = Settings(device=args.device, tts_engines=["piper"], lipsync_engines=[],
                        data_dir=Path("/tmp/bench_stream_core"), stream={"max_sessions": max(counts) + 1})
    registry = EngineRegistry.from_settings(settings, [args.device])
    registry.load_all(True)
    avatar = registry.talking_head_engine(None).engine.list_avatars()[0].avatar_id
    manager = SessionManager(settings, registry)
    report = {"avatar": avatar, "latency": await latency(manager, avatar, args.runs), "hold": []}
    print(json.dumps(report["latency"]), flush=True)
    for size in [int(x) for x in args.sizes.split(",")]:
        for n in counts:
            row = await hold(manager, avatar, n, size, args.hold_s)
            report["hold"].append(row)
            print(json.dumps(row), flush=True)
    await manager.stop()
    registry.close()


if __name__ == "__main__":
    asyncio.run(main())
