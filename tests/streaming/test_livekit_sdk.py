"""What of the LiveKit SDK (livekit 1.0.25) runs here without a server, with the worker's own code.

- real ticks of a real session become the SDK's VideoFrame/AudioFrame and are captured into a real
  VideoSource/AudioSource and local tracks; the captured picture converts back to the tick's pixels;
- the SDK's AudioSource paces capture at real time with no room (what keeps the worker's video, captured
  with each tick's audio, in step with the audio's playout);
- the publish options the worker asks for (H.264, one layer, 25 fps, 2 Mbps);
- `LiveKitRoom` on a real `rtc.Room`: the byte-stream handler it registers before connecting is the one
  the SDK's room dispatches a stream header to; room events reach the worker's callbacks as identities;
  a connect that cannot reach a server fails as rtc.ConnectError, and /launch with the real adapter is a 502.

Not here (no LiveKit server): signalling, publishing over WebRTC, libwebrtc's H.264 encoder at work, RPC
over the wire (LocalParticipant needs a connected room). tests/streaming/test_livekit_worker.py drives the
worker through a stand-in at the RoomPort boundary instead.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from livekit import rtc
from livekit.rtc._proto import participant_pb2
from livekit.rtc._proto.room_pb2 import DataStream as proto_DataStream

from gpu_service.streaming.livekit_worker import (LiveKitRoom, PublishSpec, audio_frame, rtc_media, video_frame,
                                                  video_publish_options)
from tests.conftest import running_app
from tests.streaming.livekit_standin import mint_token

PORTRAIT = Path(__file__).resolve().parents[1] / "fixtures" / "media" / "p05_glasses_older_woman_grace_hopper.jpg"


def test_publish_options_are_h264_one_layer_25fps_2mbps():
    options = video_publish_options(PublishSpec(512, 512, 25, 48_000, 2_000_000, 200))
    assert options.video_codec == rtc.VideoCodec.H264
    assert options.HasField("simulcast") and options.simulcast is False
    assert options.video_encoding.max_framerate == 25.0 and options.video_encoding.max_bitrate == 2_000_000
    assert options.source == rtc.TrackSource.SOURCE_CAMERA


def test_real_ticks_into_the_sdks_sources(gpu_settings):
    """Ticks of a real session, captured into the SDK's own sources and tracks; the picture survives the SDK's
    conversion to I420 (what its encoder takes) and the audio is the tick's, sample for sample."""

    async def main():
        async with running_app(gpu_settings) as client:
            b64 = base64.b64encode(PORTRAIT.read_bytes()).decode()
            r = await client.post("/stream/sessions", json={"avatar_image": b64, "size": [128, 128]})
            assert r.status_code == 201, r.text
            session = client.app.state.streams.get(r.json()["session_id"])
            spec = PublishSpec(*session.size, session.fps, session.sample_rate, 2_000_000, 200)
            media, video_track, audio_track = rtc_media(spec)
            assert video_track.kind == rtc.TrackKind.KIND_VIDEO and audio_track.kind == rtc.TrackKind.KIND_AUDIO
            sub = session.subscribe()
            ticks = []
            t0 = time.monotonic()
            try:
                for _ in range(25):
                    tick = await sub.get()
                    frame = video_frame(tick.frame)
                    media.capture_video(frame, int(round(tick.pts_s * 1e6)))
                    a = audio_frame(tick.audio, session.sample_rate)
                    await media.capture_audio(a)
                    assert np.array_equal(np.frombuffer(bytes(a.data), np.int16), tick.audio)
                    assert a.duration == pytest.approx(0.04)
                    ticks.append((tick, frame))
            finally:
                sub.close()
            elapsed = time.monotonic() - t0
            assert [t.index for t, _ in ticks] == list(range(ticks[0][0].index, ticks[0][0].index + 25))
            assert elapsed > 0.7, "the session's clock and the audio source pace the ticks in real time"
            tick, frame = ticks[-1]
            back = frame.convert(rtc.VideoBufferType.I420).convert(rtc.VideoBufferType.RGBA)
            rgb = np.frombuffer(bytes(back.data), np.uint8).reshape(back.height, back.width, 4)[..., :3]
            assert (back.width, back.height) == (128, 128)
            diff = np.abs(rgb.astype(int) - tick.frame.astype(int))
            assert diff.mean() < 6, diff.mean()  # 4:2:0 chroma subsampling costs a little at edges
            await media.aclose()
            await client.delete(f"/stream/sessions/{session.session_id}")

    asyncio.run(main())


def test_the_sdks_audio_source_paces_capture_without_a_room():
    async def main():
        media, _, _ = rtc_media(PublishSpec(64, 64, 25, 48_000, 2_000_000, 200))
        silence = np.zeros(1920, np.int16)
        t0 = time.monotonic()
        for _ in range(25):  # one second of audio
            await media.capture_audio(audio_frame(silence, 48_000))
        elapsed = time.monotonic() - t0
        await media.aclose()
        return elapsed

    elapsed = asyncio.run(main())
    assert 0.65 < elapsed < 1.3, elapsed  # 1 s of audio less the 200 ms queue


def test_the_adapter_on_a_real_room():
    async def main():
        adapter = LiveKitRoom()
        got: list = []
        adapter.register_byte_stream_handler("lk.audio_stream", lambda reader, who: got.append((reader, who)))
        with pytest.raises(ValueError):
            adapter.register_byte_stream_handler("lk.audio_stream", lambda r, w: None)  # the SDK's own rule
        # The SDK's room dispatches a stream header to the handler, then its chunks and trailer to the reader.
        header = proto_DataStream.Header(stream_id="s1", topic="lk.audio_stream", timestamp=1,
                                         attributes={"sample_rate": "24000", "num_channels": "1"},
                                         byte_header=proto_DataStream.ByteHeader(name="AUDIO_x"))
        adapter.room._handle_stream_header(header, "agent-1")
        await adapter.room._handle_stream_chunk(proto_DataStream.Chunk(stream_id="s1", chunk_index=0, content=b"\1\0" * 8))
        await adapter.room._handle_stream_trailer(proto_DataStream.Trailer(stream_id="s1"))
        (reader, who), = got
        assert who == "agent-1" and isinstance(reader, rtc.ByteStreamReader)
        assert reader.info.attributes == {"sample_rate": "24000", "num_channels": "1"}
        assert [c async for c in reader] == [b"\1\0" * 8]

        events: list = []
        adapter.on("participant_connected", lambda identity, is_agent: events.append(("in", identity, is_agent)))
        adapter.on("participant_disconnected", lambda identity: events.append(("out", identity)))
        adapter.on("disconnected", lambda reason: events.append(("gone", reason)))
        agent = rtc.RemoteParticipant(participant_pb2.OwnedParticipant(
            info=participant_pb2.ParticipantInfo(identity="agent-1", kind=participant_pb2.PARTICIPANT_KIND_AGENT)))
        viewer = rtc.RemoteParticipant(participant_pb2.OwnedParticipant(
            info=participant_pb2.ParticipantInfo(identity="viewer", kind=participant_pb2.PARTICIPANT_KIND_STANDARD)))
        adapter.room.emit("participant_connected", viewer)
        adapter.room.emit("participant_connected", agent)
        adapter.room.emit("participant_disconnected", agent)
        adapter.room.emit("disconnected", rtc.DisconnectReason.ROOM_DELETED)
        assert events == [("in", "viewer", False), ("in", "agent-1", True), ("out", "agent-1"),
                          ("gone", "ROOM_DELETED")]

        t0 = time.monotonic()
        with pytest.raises(rtc.ConnectError):
            await adapter.connect(f"ws://127.0.0.1:{_closed_port()}", mint_token())
        assert time.monotonic() - t0 < 15

    asyncio.run(main())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_with_the_real_sdk_and_no_server_is_a_502(tmp_path):
    from gpu_service.settings import Settings

    settings = Settings(device="cpu", tts_engines=["piper"], data_dir=tmp_path / "data",
                        preset_avatars_dir=tmp_path / "presets")

    async def main():
        async with running_app(settings) as client:
            r = await client.post("/launch", data={"livekit_url": f"ws://127.0.0.1:{_closed_port()}",
                                                   "livekit_token": mint_token(), "room_name": "room-1",
                                                   "size": "128x128"},
                                  files={"avatar_image": ("a.jpg", PORTRAIT.read_bytes(), "image/jpeg")})
            assert r.status_code == 502 and r.json()["error_type"] == "livekit_join_failed", r.text
            assert "Connection refused" in r.json()["error"]
            assert client.app.state.streams.active == 0

    asyncio.run(main())
