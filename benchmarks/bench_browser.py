"""What the runtime's demo page measures in real headless Chromium, as medians of several rounds.

Prints figures; asserts nothing. The GPU service and the runtime are started once as processes, Chromium
once; each round connects the demo page (a new session through POST /api/v1/stream), watches it idle,
says one sentence and waits for its end, then disconnects. Figures, all taken by the page itself:

- offer -> first frame (the offer posted, until requestVideoFrameCallback's first frame);
- Say -> speech_started (the click, until the event arrives through the runtime's relayed SSE);
- Say -> first frame whose mouth region changed (frame to frame, twice what idle motion reached);
- fps (requestVideoFrameCallback over 2 s idle, and while speaking), getStats' video fps, jitter and
  jitter buffer delay.

It runs in a network namespace with only `lo` (as tests/browser does; `unshare -rn`), or, where none can
be made, in the host's:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_browser.py [--rounds 5] [--size 256x256]
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
sys.path.insert(0, str(REPO))

SAY = "Good morning! This sentence is measured in the browser."


def rounds(out: Path, size: str, count: int) -> dict:
    from playwright.sync_api import sync_playwright

    from tests.browser.drive_demo import API_KEY, CHROMIUM, CHROMIUM_ARGS, services, wait_for

    result: dict = {"rounds": []}
    with services(out, result) as runtime_url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        try:
            page = browser.new_page()
            page.goto(f"{runtime_url}/demo", timeout=30_000)
            page.fill("#api-key", API_KEY)
            if size:
                page.select_option("#size", size)
            for n in range(count):
                page.click("#connect")
                wait_for(page, "demo.state === 'connected' && demo.frames > 5", 45, "connected")
                time.sleep(2.5)
                idle = page.evaluate("({fps: demo.fps, stats: demo.stats, first: demo.firstFrameMs})")
                page.fill("#text", SAY)
                said = page.evaluate("demo.says.length")
                page.click("#say")
                wait_for(page, f"demo.says.length > {said} && demo.events.some(e => e.event === 'speech_started' "
                               f"&& e.received_ms > demo.says[{said}].at)", 30, "speech_started")
                time.sleep(1.5)
                speaking = page.evaluate("({fps: demo.fps, stats: demo.stats})")
                wait_for(page, f"demo.events.some(e => e.event === 'speech_finished' && e.received_ms > demo.says[{said}].at)",
                         60, "speech_finished")
                say = page.evaluate(f"demo.says[{said}]")
                video = (speaking["stats"] or {}).get("video") or {}
                result["rounds"].append({
                    "first_frame_ms": idle["first"], "say_to_started_ms": say["started"],
                    "say_to_mouth_ms": say["changed"], "fps_idle": idle["fps"], "fps_speaking": speaking["fps"],
                    "stats_fps": video.get("framesPerSecond"), "jitter_ms": 1000 * (video.get("jitter") or 0),
                    "jitter_buffer_ms": video.get("jitterBufferDelayMs"), "codec": video.get("codec")})
                print(json.dumps({"round": n + 1, **result["rounds"][-1]}), flush=True)
                page.click("#disconnect")
                wait_for(page, "demo.state === 'closed'", 10, "closed")
        finally:
            browser.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="256x256", help="frame size ('' for the portrait's own)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside:  # run again inside a namespace with only lo, when one can be made
        cmd = [sys.executable, __file__, "--inside", "--rounds", str(args.rounds), "--size", args.size]
        probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
        if probe.returncode == 0:
            cmd = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] + cmd
        else:
            print("no network namespace here: measuring in the host's", file=sys.stderr)
        return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    with tempfile.TemporaryDirectory() as tmp:
        result = rounds(Path(tmp), args.size, args.rounds)
    rows = result["rounds"]
    print(f"\nmedians of {len(rows)} rounds at {args.size or 'the portrait size'} (GPU service ready in "
          f"{result['gpu_ready_s']:.1f} s):")
    for key in ("first_frame_ms", "say_to_started_ms", "say_to_mouth_ms", "fps_idle", "fps_speaking", "stats_fps",
                "jitter_ms", "jitter_buffer_ms"):
        values = [r[key] for r in rows if r[key] is not None]
        print(f"  {key:20s} {statistics.median(values):8.1f}   (min {min(values):.1f}, max {max(values):.1f})"
              if values else f"  {key:20s}        -")
    print(f"  codec                {rows[0]['codec'] if rows else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
