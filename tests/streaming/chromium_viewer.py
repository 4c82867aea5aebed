"""Headless Chromium views a test-pattern session through the WebRTC router; prints one JSON line of its stats.

Run by test_webrtc.py as a child process (under `unshare -n` for the loopback case):
    python -m tests.streaming.chromium_viewer HOST
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from avatar_contracts.http import install_error_handlers
from gpu_service.settings import Settings
from gpu_service.streaming import webrtc
from gpu_service.streaming.probe import TestPatternSession
from tests.streaming.test_webrtc import PatternSessions

CHROMIUM = "/usr/bin/chromium"

PAGE = """<html><body><video id=v autoplay muted playsinline></video><script>
window.result = null;
async function run() {
  const pc = new RTCPeerConnection();
  pc.addTransceiver('video', {direction: 'recvonly'});
  pc.addTransceiver('audio', {direction: 'recvonly'});
  const v = document.getElementById('v'), stream = new MediaStream();
  pc.ontrack = e => { stream.addTrack(e.track); v.srcObject = stream; };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === 'complete') r();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); });
  const t0 = performance.now();
  const r = await fetch('/stream/sessions/s/offer', {method: 'POST', headers: {'content-type': 'application/json'},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: 'offer'})});
  await pc.setRemoteDescription(await r.json());
  let first = null;
  v.requestVideoFrameCallback(() => { first = performance.now() - t0; });
  await new Promise(r => setTimeout(r, 5000));
  const out = {first_frame_ms: first, state: pc.connectionState, codecs: {}};
  (await pc.getStats()).forEach(s => {
    if (s.type === 'inbound-rtp') out[s.kind] = {frames: s.framesDecoded, fps: s.framesPerSecond, codec: s.codecId,
      samples: s.totalSamplesReceived, jitter_buffer_s: s.jitterBufferDelay / Math.max(1, s.jitterBufferEmittedCount),
      lost: s.packetsLost};
    if (s.type === 'codec') out.codecs[s.id] = s.mimeType; });
  window.result = out;
}
run().catch(e => window.result = {error: String(e)});
</script></body></html>"""


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.streams.sessions["s"] = TestPatternSession("s", size=(256, 256))
    yield
    await app.state.streams.sessions["s"].close()


def main(host: str) -> int:
    from playwright.sync_api import sync_playwright

    app = FastAPI(lifespan=lifespan)
    app.state.settings = Settings()
    app.state.streams = PatternSessions()
    install_error_handlers(app, logging.getLogger("chromium_viewer"))
    app.include_router(webrtc.router)
    app.get("/")(lambda: HTMLResponse(PAGE))
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):  # bounded: 10 s
        if server.started:
            break
        time.sleep(0.1)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--autoplay-policy=no-user-gesture-required", "--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://{host}:{port}/")
            page.wait_for_function("window.result !== null", timeout=30_000)
            result = page.evaluate("window.result")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    print(json.dumps(result))
    return 0 if result.get("state") == "connected" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
