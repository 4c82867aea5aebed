"""Run inside a network namespace with only `lo` up: a test-pattern session viewed over 127.0.0.1.

Prints one JSON line with the figures; exits 0 when frames and audio arrived. Used by test_webrtc.py
(`unshare -n`); aioice alone would gather no host candidate at all here.
"""

from __future__ import annotations

import asyncio
import json
import sys

from tests.streaming.test_webrtc import transport_app, viewer
from gpu_service.streaming.probe import TestPatternSession


async def main(loopback: bool) -> int:
    async with transport_app(ice_loopback=loopback) as client:
        client.app.state.streams.sessions["lo"] = TestPatternSession("lo", size=(128, 128))
        probe = await viewer(client, "lo")
        try:
            ok = await probe.wait_video(25, 10) and await probe.wait_audio(48_000, 5)
            candidates = [line for line in probe.answer_sdp.splitlines() if line.startswith("a=candidate")]
            print(json.dumps({"ok": ok, "frames": len(probe.video), "candidates": candidates, **probe.summary(2.0)}))
            return 0 if ok else 1
        finally:
            await probe.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:] == ["--loopback"])))
