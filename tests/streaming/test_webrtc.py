"""The WebRTC transport: real aiortc peers over this machine's own addresses, real encoding and decoding.

The source is the test-pattern session (gpu_service/streaming/probe.py): ticks on the wall clock
with the tick index drawn into the frame and a flash + tone burst every second, so that what the
viewer decodes can be checked against what was sent. The transport is the thing under test; the
real session's end-to-end test is below them (it needs the stream core).
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import httpx
import numpy as np
import pytest

pytest.importorskip("aiortc")

from fastapi import FastAPI  # noqa: E402

from avatar_contracts.http import install_error_handlers  # noqa: E402
from gpu_service.errors import NotFound  # noqa: E402
from gpu_service.settings import Settings  # noqa: E402
from gpu_service.streaming import webrtc  # noqa: E402
from gpu_service.streaming.probe import (StreamProbe, TestPatternSession, burst_marker, flash_marker,  # noqa: E402
                                         read_pattern_index)

import logging  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class PatternSessions:
    """`app.state.streams` as the transport uses it: get(id) or a 404."""

    def __init__(self) -> None:
        self.sessions: dict[str, TestPatternSession] = {}

    def get(self, session_id: str) -> TestPatternSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise NotFound(f"no stream session {session_id}") from None


@contextlib.asynccontextmanager
async def transport_app(**settings):
    """A FastAPI app with the WebRTC router, the service's error handlers and test-pattern sessions."""
    app = FastAPI(lifespan=None)
    app.state.settings = Settings(stream=settings)
    app.state.streams = PatternSessions()
    install_error_handlers(app, logging.getLogger("test"))
    app.include_router(webrtc.router)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gpu.test",
                                         timeout=10) as client:
                client.app = app  # type: ignore[attr-defined]
                yield client
    finally:
        for s in list(app.state.streams.sessions.values()):
            await s.close()


def poster(client: httpx.AsyncClient, session_id: str):
    async def post(offer: dict) -> dict:
        r = await client.post(f"/stream/sessions/{session_id}/offer", json=offer)
        assert r.status_code == 200, r.text
        return r.json()
    return post


async def viewer(client, session_id: str, **kw) -> StreamProbe:
    probe = StreamProbe(video_marker=flash_marker, audio_marker=burst_marker, **kw)
    await probe.connect(poster(client, session_id))
    return probe


def test_viewer_receives_h264_at_25fps_with_audio_in_sync():
    async def main():
        async with transport_app() as client:
            session = client.app.state.streams.sessions["s1"] = TestPatternSession("s1", size=(256, 256))
            probe = await viewer(client, "s1", keep_video=5)
            try:
                assert await probe.wait_video(1, 10), "no video frame within 10 s"
                first = probe.first_frame_s
                assert await probe.wait_video(110, 15)
                assert await probe.wait_audio(3 * 48_000, 5)
                summary = probe.summary(window_s=3.0)
                print("\nviewer:", summary, "first frame", first)
                assert probe.codec == "H264"
                assert 23.5 <= summary["fps"] <= 26.5, summary
                assert summary["p95_interval_s"] < 0.08, summary
                # the decoded pixels are the ticks sent, in order
                indices = [read_pattern_index(f) for f in probe.kept if not flash_marker(f)]
                assert indices == sorted(indices) and len(set(indices)) == len(indices), indices
                # pts: consecutive frames 3600 apart (a tick skipped only when a busy CPU held the encoder back)
                pts = [p for _, p in probe.video]
                steps = [b - a for a, b in zip(pts, pts[1:])]
                assert all(step > 0 and step % 3600 == 0 for step in steps), set(steps)
                assert steps.count(3600) >= 0.95 * len(steps), steps
                # audio and video of a tick arrive together, and were paired at the sender
                assert abs(summary["av_offset_start_s"]) < 0.04, summary
                assert abs(summary["av_offset_end_s"]) < 0.04, summary
                marks = probe.marker_offsets()
                print("markers:", marks)
                assert len(marks) >= 3, (probe.video_marks, probe.audio_marks)
                for m in marks:
                    assert abs(m["pts_offset_s"]) <= 0.021, m
                    assert abs(m["arrival_offset_s"]) < 0.08, m  # decoded: aiortc holds audio 40 ms longer
                assert session.viewers == 1
            finally:
                await probe.close()
            await asyncio.sleep(0.3)
            assert session.viewers == 0, "the viewer's subscription was not closed"
            assert client.app.state.webrtc.count() == 0
    asyncio.run(main())


def test_vp8_when_h264_is_not_offered_or_configured():
    async def main():
        async with transport_app(video_codecs=["vp8"]) as client:
            client.app.state.streams.sessions["s"] = TestPatternSession("s", size=(128, 128))
            probe = await viewer(client, "s")
            try:
                assert await probe.wait_video(10, 10)
                assert probe.codec == "VP8"
            finally:
                await probe.close()
    asyncio.run(main())


def test_second_viewer_does_not_disturb_the_first():
    async def main():
        async with transport_app() as client:
            session = client.app.state.streams.sessions["s"] = TestPatternSession("s", size=(256, 256))
            first = await viewer(client, "s")
            second = None
            try:
                assert await first.wait_video(50, 10)
                n_before = len(first.video)
                second = await viewer(client, "s")
                assert await second.wait_video(75, 10)
                assert session.viewers == 2
                # the first viewer's frames while the second joined and ran: no gap, still ~25 fps
                joined = first.video[n_before - 1:]
                gaps = [b[0] - a[0] for a, b in zip(joined, joined[1:])]
                fps = (len(joined) - 1) / (joined[-1][0] - joined[0][0])
                print(f"\nfirst viewer while the second joined: {fps:.2f} fps, max gap {max(gaps) * 1000:.0f} ms")
                assert 22.0 <= fps <= 27.0  # a disturbed first viewer drops to about half
                # No gap: one stall of a loaded machine (0.32 s seen once at the busy end of a CI run, while the
                # other test worker rendered) is not the second viewer's doing; two, or a long one, would be.
                assert sorted(gaps)[-2] < 0.25 and max(gaps) < 0.6, sorted(gaps)[-3:]
                pts = [p for _, p in first.video]
                steps = [b - a for a, b in zip(pts, pts[1:])]
                assert steps.count(3600) >= 0.95 * len(steps), steps
                # the second leaves: the first goes on
                await second.close()
                n = len(first.video)
                await asyncio.sleep(1.0)
                assert 20 <= len(first.video) - n <= 30
                assert session.viewers == 1
            finally:
                await first.close()
                if second is not None:
                    await second.close()
    asyncio.run(main())


def test_session_end_closes_its_viewers():
    async def main():
        async with transport_app() as client:
            session = client.app.state.streams.sessions["s"] = TestPatternSession("s", size=(128, 128))
            probe = await viewer(client, "s")
            try:
                assert await probe.wait_video(5, 10)
                assert client.app.state.webrtc.count("s") == 1
                await session.close()
                for _ in range(50):
                    if client.app.state.webrtc.count("s") == 0:
                        break
                    await asyncio.sleep(0.1)
                assert client.app.state.webrtc.count("s") == 0
                await asyncio.wait_for(probe.ended.wait(), 10)
            finally:
                await probe.close()
    asyncio.run(main())


def test_shutdown_closes_every_peer_connection():
    async def main():
        probe = None
        async with transport_app() as client:
            client.app.state.streams.sessions["s"] = TestPatternSession("s", size=(128, 128))
            probe = await viewer(client, "s")
            assert await probe.wait_video(5, 10)
            peers = client.app.state.webrtc
            pcs = [v.pc for vs in peers.viewers.values() for v in vs.values()]
        assert pcs and all(pc.connectionState == "closed" for pc in pcs)
        assert peers.count() == 0
        await probe.close()
    asyncio.run(main())


def test_offer_errors_name_the_field():
    async def main():
        async with transport_app() as client:
            client.app.state.streams.sessions["s"] = TestPatternSession("s")
            from aiortc import RTCPeerConnection
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            good = pc.localDescription.sdp
            await pc.close()

            r = await client.post("/stream/sessions/nope/offer", json={"sdp": good, "type": "offer"})
            assert r.status_code == 404 and "nope" in r.json()["error"], r.text
            cases = {
                "type": {"sdp": good, "type": "answer"},
                "sdp": {"sdp": "hello", "type": "offer"},
            }
            for field, body in cases.items():
                r = await client.post("/stream/sessions/s/offer", json=body)
                assert r.status_code == 422, r.text
                assert field in r.json()["error"], r.text
            for bad in ["v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",                 # no fingerprint / ice
                        good.replace("a=fingerprint:", "a=fingerprint:x"),           # mangled fingerprint
                        re.sub(r"m=video \d+", "m=video x", good),                    # bad port
                        good.replace("recvonly", "sendonly"),                        # receives nothing
                        good.replace("H264", "H265").replace("VP8", "VP9")]:         # no common codec
                r = await client.post("/stream/sessions/s/offer", json={"sdp": bad, "type": "offer"})
                assert r.status_code == 422, (bad, r.text)
                body = r.json()
                assert body["error"].startswith("sdp"), body
                assert "Traceback" not in body["error"] and "File " not in body["error"]
            r = await client.post("/stream/sessions/s/offer", json={"type": "offer"})
            assert r.status_code == 422 and "sdp" in r.json()["error"]
            r = await client.post("/stream/sessions/s/offer", content=b"{",
                                  headers={"content-type": "application/json"})
            assert r.status_code == 422
            assert client.app.state.webrtc.count() == 0
            assert client.app.state.streams.sessions["s"].viewers == 0
    asyncio.run(main())


def test_loopback_candidates_are_gathered_when_asked():
    import aioice.ice

    webrtc.enable_loopback_candidates(True)
    try:
        assert "127.0.0.1" in aioice.ice.get_host_addresses(True, False)
    finally:
        webrtc.enable_loopback_candidates(False)
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(True, False) or \
        not aioice.ice.get_host_addresses.__wrapped__(True, False)


def test_ice_servers_setting():
    s = Settings(stream={"ice_servers": "stun:stun.example.org:3478,turn:turn.example.org?transport=tcp"})
    servers = webrtc.ice_servers(s)
    assert [x.urls for x in servers] == [["stun:stun.example.org:3478"], ["turn:turn.example.org?transport=tcp"]]
    s = Settings(stream={"ice_servers": '[{"urls": "turn:t.example.org", "username": "u", "credential": "c"}]'})
    assert webrtc.ice_servers(s)[0].credential == "c"
    assert webrtc.ice_servers(Settings()) == []
    with pytest.raises(ValueError, match="ice_servers"):
        Settings(stream={"ice_servers": "http://example.org"})


def test_stream_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("STREAM_ICE_SERVERS", "stun:stun.example.org:3478")
    monkeypatch.setenv("STREAM__VIDEO_CODECS", "VP8,H264")
    monkeypatch.setenv("STREAM_ICE_LOOPBACK", "1")
    s = Settings()
    assert s.stream.ice_servers[0].urls == ["stun:stun.example.org:3478"]
    assert s.stream.video_codecs == ["vp8", "h264"]
    assert s.stream.ice_loopback is True
    monkeypatch.setenv("STREAM__ICE_SERVERS", '[{"urls": ["turn:t.example.org"], "username": "u", "credential": "c"}]')
    assert Settings().stream.ice_servers[0].username == "u"


# -- end to end: the real session --------------------------------------------------------------------------

def test_real_session_end_to_end(tmp_path):
    """A real StreamSession (the landmark talking head, Piper) viewed over WebRTC: idle frames at 25 fps,
    speech arrives as audio, and deleting the session closes the viewer's connection."""
    from tests.conftest import running_app

    settings = Settings(device="cpu", tts_engines=["piper"], lipsync_engines=[], data_dir=tmp_path / "data",
                        warmup=False)

    async def main():
        async with running_app(settings) as client:
            r = await client.post("/stream/sessions", json={"avatar_id": "astronaut", "size": [256, 256]})
            assert r.status_code == 201, r.text
            created = r.json()
            sid = created["session_id"]
            probe = StreamProbe()

            async def post(offer):
                answer = await client.post(created["offer_url"], json=offer)
                assert answer.status_code == 200, answer.text
                return answer.json()

            try:
                await probe.connect(post)
                assert await probe.wait_video(1, 10), "no frame within 10 s"
                assert await probe.wait_video(75, 10)
                print("\nreal session, idle:", probe.summary(window_s=2.0))
                assert probe.codec == "H264"
                assert 22 <= probe.fps_received(2.0) <= 27
                quiet = probe.audio_level()
                r = await client.post(created["say_url"], json={"text": "Hello there, how are you today?"})
                assert r.status_code == 202, r.text
                # speech reaches the viewer as audio (bounded wait: 10 s)
                for _ in range(100):
                    await asyncio.sleep(0.1)
                    if probe.audio_level(0.5) > max(10 * quiet, 300):
                        break
                else:
                    raise AssertionError(f"no speech in the received audio (level {probe.audio_level(0.5)})")
                await asyncio.sleep(1.0)
                summary = probe.summary(window_s=2.0)
                offsets = [o for _, o in probe.rtp_av_offsets()]
                print("real session, speaking:", summary)
                print("A/V offsets (ms, every 5th frame):", [round(o * 1000) for o in offsets[::5]])
                # The median over the run; single frames wait longer when the 2 shared cores are busy with
                # speech synthesis and rendering (the benchmark reports the start and end figures).
                assert abs(float(np.median(offsets))) < 0.04, offsets
                # The session's own pace while it synthesises speech is the core's (on 2 busy cores it has
                # released ticks late); the transport passes on every tick it is given, in time.
                viewer = next(iter(client.app.state.webrtc.viewers[sid].values()))
                print("ticks in", viewer.feed.ticks_in, "frames sent", viewer.video.frames_sent,
                      "received", len(probe.video), "skipped", viewer.feed.skipped, "dropped", viewer.feed.dropped,
                      viewer.feed.subscription.dropped)
                # Every tick is sent or counted: video drops (its encoder behind on a starved CPU) are the
                # viewer's own; audio is sent in full.
                feed = viewer.feed
                pending = len(feed._buffers["video"])
                assert viewer.video.frames_sent + feed.dropped["video"] + feed.skipped["video"] + pending \
                    >= feed.ticks_in - 1
                assert len(probe.video) >= viewer.video.frames_sent - 3
                assert feed.subscription.dropped == 0 and feed.dropped["audio"] == 0
                assert viewer.audio.samples_sent >= (feed.ticks_in - feed.skipped["audio"] - 3) * 1920
                # the session ends: its viewers' connections close
                r = await client.delete(f"/stream/sessions/{sid}")
                assert r.status_code == 204
                await asyncio.wait_for(probe.ended.wait(), 10)
                for _ in range(50):
                    if client.app.state.webrtc.count(sid) == 0:
                        break
                    await asyncio.sleep(0.1)
                assert client.app.state.webrtc.count(sid) == 0
            finally:
                await probe.close()
    asyncio.run(main())


def test_viewer_over_loopback_in_a_namespace_with_only_lo():
    """No interface but `lo` (a browser test's namespace): loopback host candidates are gathered, and it streams."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a network namespace here (unshare -n)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = "ip link set lo up && exec \"$0\" -m tests.streaming.loopback_viewer"
    done = subprocess.run(["unshare", "-n", "sh", "-c", script, sys.executable], cwd=root, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["candidates"] and all("127.0.0.1" in c for c in result["candidates"]), result["candidates"]
    assert result["frames"] >= 25 and result["codec"] == "H264"


def test_viewer_that_never_connects_is_closed():
    async def main():
        async with transport_app(connect_timeout_s=1.0) as client:
            session = client.app.state.streams.sessions["s"] = TestPatternSession("s", size=(128, 128))
            from aiortc import RTCPeerConnection
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            r = await client.post("/stream/sessions/s/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
            assert r.status_code == 200
            await pc.close()  # it never applies the answer
            assert client.app.state.webrtc.count("s") == 1 and session.viewers == 1
            for _ in range(40):
                if client.app.state.webrtc.count("s") == 0:
                    break
                await asyncio.sleep(0.1)
            assert client.app.state.webrtc.count("s") == 0
            assert session.viewers == 0
    asyncio.run(main())


def test_viewers_past_the_limit_are_a_429():
    async def main():
        async with transport_app(max_viewers=1) as client:
            client.app.state.streams.sessions["s"] = TestPatternSession("s", size=(128, 128))
            first = await viewer(client, "s")
            try:
                from aiortc import RTCPeerConnection
                pc = RTCPeerConnection()
                pc.addTransceiver("video", direction="recvonly")
                await pc.setLocalDescription(await pc.createOffer())
                r = await client.post("/stream/sessions/s/offer",
                                      json={"sdp": pc.localDescription.sdp, "type": "offer"})
                await pc.close()
                assert r.status_code == 429 and r.headers.get("retry-after"), r.text
                assert "STREAM_MAX_VIEWERS" in r.json()["error"]
                assert client.app.state.streams.sessions["s"].viewers == 1
            finally:
                await first.close()
    asyncio.run(main())


def test_audio_track_fills_lost_ticks_with_silence_and_keeps_the_clocks_equal():
    """Ticks a viewer lost (0, 1, then 4): the audio goes on in 20 ms frames whose pts stay index * 1920."""
    from gpu_service.streaming.media import Subscription

    async def main():
        sub = Subscription(buffer=16)
        pattern = TestPatternSession("g", size=(64, 64))
        sub._deliver(pattern.tick(0))
        feed = webrtc.ViewerFeed(sub, 25)
        feed.start()
        video_cls, audio_cls = webrtc._tracks()
        audio, video = audio_cls(feed), video_cls(feed)
        frames = [await asyncio.wait_for(audio.recv(), 2)]  # the track starts at tick 0 (the newest then)
        for index in (1, 4, 5):
            sub._deliver(pattern.tick(index))
        sub._end()
        from aiortc.mediastreams import MediaStreamError
        with contextlib.suppress(MediaStreamError):
            for _ in range(20):
                frames.append(await asyncio.wait_for(audio.recv(), 2))
        assert [f.pts for f in frames] == [i * 960 for i in range(12)]
        assert all(f.samples == 960 and f.sample_rate == 48_000 and f.format.name == "s16" for f in frames)
        silent = [i for i, f in enumerate(frames) if not f.to_ndarray().any()]
        assert silent == [4, 5, 6, 7]  # ticks 2 and 3
        assert audio.silence_filled == 2 * 1920
        vpts = []
        with contextlib.suppress(MediaStreamError):
            for _ in range(10):
                vpts.append((await asyncio.wait_for(video.recv(), 2)).pts)
        # video read late keeps only its 2 newest ticks, and its pts jump with the index: both clocks agree
        assert vpts == [4 * 3600, 5 * 3600]
        assert feed.ended and feed.end_reason == "session closed"
    asyncio.run(main())


@pytest.mark.parametrize("where", ["host address", "namespace with only lo"])
def test_chromium_receives_h264_and_opus(where):
    """Real headless Chromium (Debian's) as the viewer: H.264 and Opus negotiated, frames decoded, audio played."""
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from tests.streaming.chromium_viewer import CHROMIUM

    pytest.importorskip("playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    if where == "host address":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("192.0.2.1", 9))  # no packet is sent: this picks the address of the default route
                host = s.getsockname()[0]
            except OSError:
                pytest.skip("no network interface but loopback")
        cmd = [sys.executable, "-m", "tests.streaming.chromium_viewer", host]
    else:
        if not shutil.which("unshare") or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
            pytest.skip("cannot make a network namespace here (unshare -n)")
        script = "ip link set lo up && exec \"$0\" -m tests.streaming.chromium_viewer 127.0.0.1"
        cmd = ["unshare", "-n", "sh", "-c", script,
               sys.executable]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nChromium ({where}):", result)
    assert result["codecs"][result["video"]["codec"]] == "video/H264"
    assert result["codecs"][result["audio"]["codec"]] == "audio/opus"
    # interop, not rate (the aiortc viewers above check the rate): on 2 shared cores Chromium decodes what it gets
    assert result["video"]["frames"] >= 75, result
    assert result["audio"]["samples"] >= 2 * 48_000 and result["video"]["lost"] == 0


def test_a_viewer_whose_video_encoder_is_slow_keeps_its_audio_and_others_keep_theirs():
    """One viewer's encoder takes 100 ms a frame (a starved CPU): it gets fewer frames, each close to its audio,
    its audio in full and on time, and the other viewer of the session keeps 25 fps."""
    import time as _time

    async def main():
        async with transport_app() as client:
            client.app.state.streams.sessions["s"] = TestPatternSession("s", size=(128, 128))
            slow, other = await viewer(client, "s"), await viewer(client, "s")
            try:
                assert await slow.wait_video(5, 10) and await other.wait_video(5, 10)
                peers = client.app.state.webrtc
                slow_side = next(v for v in peers.viewers["s"].values()
                                 if v.pc.localDescription.sdp == slow.answer_sdp)
                encoder = slow_side.video_sender._RTCRtpSender__encoder
                encode = encoder.encode

                def slow_encode(frame, force_keyframe=False):
                    _time.sleep(0.1)  # in aiortc's encoder thread, as a busy CPU would
                    return encode(frame, force_keyframe)

                encoder.encode = slow_encode
                n_video, n_audio, n_other = len(slow.rtp["video"]), len(slow.rtp["audio"]), len(other.video)
                await asyncio.sleep(4.0)
                video_fps = (len(slow.rtp["video"]) - n_video) / 4.0
                audio_pps = (len(slow.rtp["audio"]) - n_audio) / 4.0
                other_fps = (len(other.video) - n_other) / 4.0
                offsets = [o for t, o in slow.rtp_av_offsets() if t > _time.monotonic() - 3.0]
                print(f"\nslow viewer: video {video_fps:.1f} fps, audio {audio_pps:.0f} packets/s, A/V offset "
                      f"median {np.median(offsets) * 1000:.0f} ms max {max(offsets) * 1000:.0f} ms; "
                      f"other viewer {other_fps:.1f} fps; feed {slow_side.feed.dropped}")
                assert 5 <= video_fps <= 11
                assert audio_pps >= 47  # 50 a second: all of it
                # the encode, a tick queued, jitter of 2 busy cores; one late frame while the other test worker
                # renders (0.61 s seen once at the loaded end of a run) is jitter, a queue that grows is not
                assert np.percentile(offsets, 90) < 0.1 + 2 / 25 + 0.1 and max(offsets) < 1.0, sorted(offsets)[-5:]
                assert 22.0 <= other_fps <= 27.0
                assert slow_side.feed.dropped["video"] > 30 and slow_side.feed.dropped["audio"] == 0
            finally:
                await slow.close()
                await other.close()
    asyncio.run(main())
