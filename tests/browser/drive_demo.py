"""Drive the runtime's demo page in real headless Chromium against the real GPU service and runtime.

Run inside a network namespace whose only interface is `lo` (tests/browser/test_demo_browser.py starts it
with `unshare`), so that WebRTC over loopback is the only way, and nothing leaves the namespace:

    unshare -rn sh -c 'ip link set lo up && exec python -m tests.browser.drive_demo --out DIR'

What makes WebRTC work over 127.0.0.1 (see the test's docstring): the GPU service gathers a loopback host
candidate (STREAM_ICE_LOOPBACK=true; aioice leaves 127.0.0.1 out), Chromium is started with
`--allow-loopback-in-peer-connection` and with its host candidates not hidden behind mDNS names
(`--disable-features=WebRtcHideLocalIpsWithMdns`: no mDNS responder answers in the namespace, and
gathering would never finish).

It starts both services as processes, opens /demo, types the API key, connects, types text, clicks Say,
captures video frames (idle, then while speaking) as PNGs, clicks Interrupt on a second, long utterance,
and writes what it saw to DIR/result.json for the test to judge. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from tests.helpers import REPO, free_port, stop_process, wait_ready

API_KEY = "browser-test-key-0123"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
    "--no-sandbox",  # root in the (user) namespace: Chromium's own sandbox cannot start
    "--disable-dev-shm-usage",
    "--disable-gpu",
]
SAY = "Hello there! I am speaking to you live, over WebRTC, from the GPU service."
LONG = ("This is a much longer sentence that keeps the avatar talking for a good while, so that the "
        "interrupt button has something to cut off. It goes on and on, about nothing at all, for many words more.")

FRAME_JS = """() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  c.getContext('2d').drawImage(v, 0, 0);
  return {png: c.toDataURL('image/png'), frames: window.demo.frames, t: performance.now()};
}"""


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(page, expression: str, timeout_s: float, what: str):
    """Poll a page expression until it is truthy (bounded); returns its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.05)
    state = page.evaluate("JSON.stringify({state: demo.state, ice: demo.ice, frames: demo.frames, "
                          "errors: demo.errors, events: demo.events.map(e => e.event)})")
    raise TimeoutError(f"{what}: not within {timeout_s} s ({state})")


def save_frame(page, out: Path, name: str) -> dict:
    grab = page.evaluate(FRAME_JS)
    (out / f"{name}.png").write_bytes(base64.b64decode(grab["png"].split(",", 1)[1]))
    return {"name": name, "frames": grab["frames"], "t_ms": grab["t"]}


def drive(out: Path, runtime_url: str, size: str, result: dict) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            result["console"] = console
            page.goto(f"{runtime_url}/demo", timeout=30_000)
            result["key_box_visible"] = page.is_visible("#api-key")
            page.fill("#api-key", API_KEY)
            if size:
                page.select_option("#size", size)
            t_click = time.monotonic()
            page.click("#connect")
            wait_for(page, "demo.state === 'connected' && demo.frames > 5", 45, "connected with frames")
            result["connect_to_frames_s"] = time.monotonic() - t_click
            result["first_frame_ms"] = page.evaluate("demo.firstFrameMs")
            result["session"] = page.evaluate("demo.session")
            result["video_size"] = page.evaluate("[video.videoWidth, video.videoHeight]")
            result["state_text"] = page.text_content("#state")
            idle = []
            for i in range(4):
                idle.append(save_frame(page, out, f"idle{i}"))
                time.sleep(0.3)
            result["idle"] = idle
            frames_before = page.evaluate("demo.frames")
            time.sleep(1.0)
            result["frames_in_1s"] = page.evaluate("demo.frames") - frames_before

            page.fill("#text", SAY)
            page.click("#say")
            wait_for(page, "demo.events.some(e => e.event === 'speech_started')", 30, "speech_started")
            speaking = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                speaking.append(save_frame(page, out, f"speak{len(speaking)}"))
                time.sleep(0.12)
            result["speaking"] = speaking
            wait_for(page, "demo.events.some(e => e.event === 'speech_finished')", 60, "speech_finished")
            try:  # judged by the test, not fatal here: the other checks still get their figures
                wait_for(page, "demo.says[0].changed != null", 5, "the mouth region changed")
            except TimeoutError as exc:
                result["mouth_change_missed"] = str(exc)
            result["say"] = page.evaluate("demo.says[0]")
            wait_for(page, "document.getElementById('m-fps').textContent !== '\\u2013'", 5, "stats shown")
            result["figures_text"] = page.evaluate(
                "Object.fromEntries([...document.querySelectorAll('#figures tr')].map("
                "r => [r.cells[0].textContent, r.cells[1].textContent]))")
            result["stats"] = page.evaluate("demo.stats")
            result["fps_rvfc"] = page.evaluate("demo.fps")
            time.sleep(1.1)
            result["stats_later"] = page.evaluate("demo.stats")

            # a long utterance, interrupted once it has started
            page.fill("#text", LONG)
            page.click("#say")
            wait_for(page, "demo.events.filter(e => e.event === 'speech_started').length >= 2", 30, "second start")
            time.sleep(0.8)
            page.click("#interrupt")
            last = wait_for(page, "demo.events.filter(e => e.event === 'speech_finished').length >= 2 && "
                                  "demo.events.filter(e => e.event === 'speech_finished')[1]", 10, "interrupted finish")
            result["interrupted_finish"] = {k: v for k, v in last.items() if k != "received_ms"}
            result["events"] = page.evaluate("demo.events")
            result["motion"] = page.evaluate("demo.motion")
            time.sleep(0.5)
            result["frames_after_interrupt"] = page.evaluate("demo.frames")
            page.screenshot(path=str(out / "page.png"), full_page=True)
            result["log_text"] = page.text_content("#log")
            result["errors"] = page.evaluate("demo.errors")
            page.click("#disconnect")
            wait_for(page, "demo.state === 'closed'", 10, "closed")
            result["closed"] = True
        finally:
            browser.close()


@contextlib.contextmanager
def services(out: Path, result: dict, **gpu_env: str):
    """The GPU service and the runtime as processes (logs in `out`) until the block ends; yields the runtime's URL."""
    procs: list[subprocess.Popen] = []
    try:
        gpu_port, rt_port = free_port(), free_port()
        gpu_url, runtime_url = f"http://127.0.0.1:{gpu_port}", f"http://127.0.0.1:{rt_port}"
        gpu = start([sys.executable, "-m", "gpu_service"], {
            "HOST": "127.0.0.1", "PORT": str(gpu_port), "DEVICE": "cpu", "TTS_ENGINES": "piper",
            "DATA_DIR": str(out / "gpu-data"), "PRESET_AVATARS_DIR": str(REPO / "preset_avatars"),
            "STREAM_ICE_LOOPBACK": "true", **gpu_env}, out / "gpu.log")
        procs.append(gpu)
        rt = start([sys.executable, "-m", "runtime"], {
            "HOST": "127.0.0.1", "PORT": str(rt_port), "GPU_SERVICE_URL": gpu_url, "DATA_DIR": str(out / "rt-data"),
            "RUNTIME_API_KEYS": API_KEY, "REDIS_URL": "", "DATABASE_URL": "", "OUTPUT_STORE": "local"}, out / "runtime.log")
        procs.append(rt)
        t = time.monotonic()
        wait_ready(f"{gpu_url}/ready", 240, gpu)
        result["gpu_ready_s"] = time.monotonic() - t
        wait_ready(f"{runtime_url}/ready", 60, rt)
        yield runtime_url
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", default="256x256", help="the demo's frame size choice ('' for the portrait's)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"ok": False}
    try:
        with services(out, result) as runtime_url:
            drive(out, runtime_url, args.size, result)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - everything goes into the result for the test to show
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["trace"] = traceback.format_exc()[-4000:]
    finally:
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
