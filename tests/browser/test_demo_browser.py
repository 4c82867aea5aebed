"""Tier 3, the browser: the runtime's demo page in real headless Chromium, receiving the real stream.

The GPU service and the runtime run natively as processes; Chromium (Debian's, driven by Playwright) opens
`/demo`, types the API key, connects, types text and clicks Say; the stream comes over WebRTC on 127.0.0.1.
The work is done by tests/browser/drive_demo.py inside a network namespace that has only `lo`, so loopback
is the only path and nothing leaves the namespace. This test starts it and judges what it saw.

The loopback recipe (found with a throwaway aiortc answerer first, then kept here):
- a network namespace with only `lo` up: `unshare -rn sh -c 'ip link set lo up && exec ...'` (`-r` maps the
  user to root in a new user namespace, so it needs no root; as root, `unshare -n` alone does too);
- the GPU service gathers a host candidate on 127.0.0.1: STREAM_ICE_LOOPBACK=true (aioice leaves loopback out;
  with no other interface the service adds it anyway);
- Chromium: `--allow-loopback-in-peer-connection`, and `--disable-features=WebRtcHideLocalIpsWithMdns`:
  without it Chromium hides its host candidates behind mDNS names, no responder answers in the namespace and
  ICE gathering never completes, so no connection. Even with both flags Chromium gathers no candidate of its
  own on `lo`; the connection forms from the GPU service's 127.0.0.1 candidate, which Chromium checks, and
  aiortc learns Chromium's address as a peer-reflexive candidate;
- `--autoplay-policy=no-user-gesture-required` so the unmuted video plays headless; `--no-sandbox` as root.
Where no namespace can be made (no `unshare`, user namespaces off), the driver runs in the host's own network
namespace: there both sides use the host's other interface, the traffic still never leaves the machine.

Without Chromium (or Playwright) the test skips saying how to install it; scripts/test.sh installs
chromium and chromium-driver with apt-get first when it runs as root and they are missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
INSTALL = "install it with `apt-get install -y chromium chromium-driver` (scripts/test.sh does so when run as root)"


def chromium_missing() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium is not installed at {CHROMIUM}: {INSTALL}, or set CHROMIUM to its path"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: install the dev extra (EXTRAS=...,dev ./setup_gpu_service.sh)"
    return None


def namespace_prefix() -> list[str]:
    """How to run a command in a fresh network namespace with only `lo` up, or [] when none can be made here."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip") or "/usr/sbin/ip"
    if not unshare or not os.path.exists(ip):
        return []
    probe = subprocess.run([unshare, "-rn", "sh", "-c", f"{ip} link set lo up"], capture_output=True, timeout=20)
    if probe.returncode != 0:
        return []
    return [unshare, "-rn", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    """What the driver saw in Chromium (its result.json), the frames it saved beside it."""
    why = chromium_missing()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("browser")
    prefix = namespace_prefix()
    cmd = prefix + [sys.executable, "-m", "tests.browser.drive_demo", "--out", str(out), "--size", "256x256"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CHROMIUM": CHROMIUM}
    try:
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the browser driver ran past 480 s: {(exc.stdout or '')[-2000:]}")
    path = out / "result.json"
    result = json.loads(path.read_text()) if path.exists() else {"ok": False, "error": "no result.json"}
    if not result.get("ok"):
        logs = "".join(f"\n--- {name} ---\n" + (out / name).read_text(errors="replace")[-3000:]
                       for name in ("gpu.log", "runtime.log") if (out / name).exists())
        pytest.fail(f"browser driver failed ({'namespace' if prefix else 'host network'}): {result.get('error')}\n"
                    f"{result.get('trace', '')}\nconsole: {result.get('console')}\nstdout: {run.stdout[-2000:]}\n"
                    f"stderr: {run.stderr[-3000:]}{logs}")
    result["dir"] = str(out)
    result["in_namespace"] = bool(prefix)
    figures = {k: result.get(k) for k in ("gpu_ready_s", "connect_to_frames_s", "first_frame_ms", "fps_rvfc", "in_namespace")}
    figures["say"] = {k: result["say"].get(k) for k in ("acceptedMs", "started", "changed")}
    figures["video"] = {k: (result["stats"]["video"] or {}).get(k) for k in ("framesPerSecond", "jitter", "codec")}
    print("browser figures:", json.dumps(figures))
    return result


def mouth_change(result: dict, names: list[str]) -> list[float]:
    """Mean grey change of the mouth region (lower middle of the face box) from the first idle frame, per frame."""
    from PIL import Image

    width, height = result["video_size"]
    x, y, w, h = result["session"]["face_box"]
    x0, y0, x1, y1 = int((x + .2 * w) * width), int((y + .6 * h) * height), int((x + .8 * w) * width), int((y + h) * height)

    def grey(name: str) -> np.ndarray:
        return np.asarray(Image.open(os.path.join(result["dir"], f"{name}.png")).convert("L"), dtype=np.float32)[y0:y1, x0:x1]

    first = grey(result["idle"][0]["name"])
    return [float(np.abs(grey(n) - first).mean()) for n in names]


@pytest.mark.slow
def test_the_page_connects_and_plays_real_decoded_frames_with_audio(seen):
    assert seen["key_box_visible"]  # the runtime has keys: the page asks for one
    assert seen["state_text"] == "connected"
    assert seen["video_size"] == [256, 256] == [seen["session"]["width"], seen["session"]["height"]]
    # frames counted by requestVideoFrameCallback go on increasing, idle and while speaking
    assert seen["frames_in_1s"] >= 3, seen["frames_in_1s"]
    counts = [f["frames"] for f in seen["idle"] + seen["speaking"]]
    assert counts == sorted(counts) and counts[-1] > counts[0] + 10, counts
    assert seen["frames_after_interrupt"] > counts[-1]  # the stream goes on after an interrupt
    video, audio = seen["stats"]["video"], seen["stats"]["audio"]
    assert video["framesDecoded"] > 50 and video["frameWidth"] == 256, video
    assert seen["stats_later"]["video"]["framesDecoded"] > video["framesDecoded"]
    assert video["codec"] in ("video/H264", "video/VP8"), video
    # the audio track is received and decoded, and keeps coming
    assert audio["codec"] == "audio/opus" and audio["packetsReceived"] > 50 and audio["totalSamplesReceived"] > 48_000, audio
    assert seen["stats_later"]["audio"]["bytesReceived"] > audio["bytesReceived"]
    assert audio["audioLevel"] is not None
    assert not seen["errors"], seen["errors"]
    assert seen["closed"]


@pytest.mark.slow
def test_the_mouth_region_moves_while_speaking_and_not_much_at_rest(seen):
    # the page's own measure: frame-to-frame change of the mouth region, on every decoded frame (canvas pixels)
    says = seen["say"]
    events = seen["events"]
    started = next(e["received_ms"] for e in events if e["event"] == "speech_started")
    finished = next(e["received_ms"] for e in events if e["event"] == "speech_finished")
    idle = [v for t, v in seen["motion"] if says["at"] - 3000 < t < says["at"]]
    speaking = [v for t, v in seen["motion"] if started < t < finished]
    assert len(idle) >= 5 and len(speaking) >= 5, (len(idle), len(speaking))
    assert np.mean(speaking) > 3 * max(np.mean(idle), 0.5), (np.mean(speaking), np.mean(idle))
    # the saved frames: the mouth region while speaking differs from rest far more than rest does from itself
    at_rest = mouth_change(seen, [f["name"] for f in seen["idle"][1:]])
    talking = mouth_change(seen, [f["name"] for f in seen["speaking"]])
    assert max(talking) > max(6.0, 2 * max(at_rest)), (talking, at_rest)


@pytest.mark.slow
def test_the_page_shows_the_latency_and_the_stream_figures(seen):
    shown = seen["figures_text"]
    for row in ("offer \u2192 first frame", "Say \u2192 speech_started", "Say \u2192 first changed frame (mouth)"):
        assert re.fullmatch(r"\d+ ms", shown[row]), (row, shown[row])
    assert float(shown["video fps (getStats)"]) > 0
    assert re.fullmatch(r"\d+ ms / \d+ ms", shown["video jitter / audio jitter"]), shown
    assert "H264" in shown["codecs / bitrate"] or "VP8" in shown["codecs / bitrate"]
    say = seen["say"]
    assert say["changed"] is not None, seen.get("mouth_change_missed")
    assert 0 < say["started"] < 30_000 and 0 < say["changed"] < 30_000, say
    assert 0 < seen["first_frame_ms"] < 30_000


@pytest.mark.slow
def test_each_utterance_starts_and_finishes_once_and_interrupt_cuts_the_second(seen):
    events = [e for e in seen["events"] if e["event"] in ("speech_started", "speech_finished")]
    kinds = [(e["event"], e["utterance_id"]) for e in events]
    first, second = kinds[0][1], kinds[2][1]
    assert kinds == [("speech_started", first), ("speech_finished", first),
                     ("speech_started", second), ("speech_finished", second)], kinds
    assert events[1]["interrupted"] is False and events[1]["position_s"] > 1.0
    assert seen["interrupted_finish"]["interrupted"] is True
    assert 0 < seen["interrupted_finish"]["position_s"] < 5.0


def test_without_chromium_the_reason_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", str(tmp_path / "no-chromium"))
    why = chromium_missing()
    assert why and "apt-get install -y chromium chromium-driver" in why and "CHROMIUM" in why
