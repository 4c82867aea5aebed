"""POST /launch and the LiveKit room worker, against a stand-in room at the SDK's boundary.

The GPU service is real (Piper, the landmark talking head, a real stream session made by the real
SessionManager); only the LiveKit server is not: tests/streaming/livekit_standin.py plays the room
and the agent as the SDK delivers them (real ByteStreamReaders and RpcInvocationData, frames
captured into the SDK's real sources). What that leaves untested is said there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.conftest import running_app
from tests.streaming.livekit_standin import StandInRoom, mint_token, tone

PORTRAIT = Path(__file__).resolve().parents[1] / "fixtures" / "media" / "p05_glasses_older_woman_grace_hopper.jpg"
KEY = "launch-key-for-tests-0123456789"
SIZE = "128x128"
AUTH = {"Authorization": f"Bearer {KEY}"}


def lk_settings(tmp_path: Path, **livekit):
    from gpu_service.settings import Settings

    livekit = {"launch_api_key": KEY, "agent_wait_s": 5.0, "finished_fallback_s": 0.5, **livekit}
    return Settings(device="cpu", tts_engines=["piper"], data_dir=tmp_path / "data",
                    preset_avatars_dir=tmp_path / "presets", livekit=livekit)


async def wait_for(pred: Callable[[], object], timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def form(room_name: str = "room-1", token: str | None = None, **extra) -> dict:
    """The fields bitHuman's plugin sends to a custom api_url (its avatar_image goes as a file)."""
    token = token or mint_token(room=room_name, attributes={"lk.publish_on_behalf": "agent-1"})
    return {"livekit_url": "wss://lk.example.test", "livekit_token": token, "room_name": room_name, **extra}


@contextlib.asynccontextmanager
async def service(tmp_path: Path, rooms: list, **livekit):
    """The app with the stand-in room factory; `rooms` collects each room a worker got."""
    async with running_app(lk_settings(tmp_path, **livekit)) as client:
        made: list[StandInRoom] = []

        def factory() -> StandInRoom:
            room = rooms.pop(0) if rooms else StandInRoom()
            made.append(room)
            return room

        client.app.state.livekit_room_factory = factory
        client.made = made  # type: ignore[attr-defined]
        yield client


async def launch(client, *, async_mode: bool | None = None, image: bool = True, **fields):
    data = form(**fields)
    data.setdefault("size", SIZE)
    if async_mode is not None:
        data["async_mode"] = "true" if async_mode else "false"
    files = {"avatar_image": ("avatar.jpg", PORTRAIT.read_bytes(), "image/jpeg")} if image else None
    return await client.post("/launch", data=data, files=files, headers={"Authorization": f"Bearer {KEY}"})


def worker_of(client, body):
    return client.app.state.livekit_workers.get(body["worker_id"])


# --- the whole contract in one room -----------------------------------------------------------------------

def test_launch_speak_interrupt_and_leave(tmp_path):
    """The multipart launch bitHuman's plugin sends; frames and audio from the same ticks; an utterance answered
    once with interrupted false; lk.clear_buffer interrupts and is answered once with interrupted true, over and
    over, and speech still plays after; the worker leaves with the agent and ends its session."""

    async def main():
        room = StandInRoom(agent_identity="agent-1")
        async with service(tmp_path, [room]) as client:
            r = await launch(client)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["state"] == "running" and body["agent_identity"] == "agent-1"
            assert body["identity"] == "avatar-worker" and body["room_name"] == "room-1"
            worker = worker_of(client, body)
            manager = client.app.state.streams
            assert manager.active == 1
            health = (await client.get("/health")).json()
            assert health["livekit_workers"] == 1 and health["active_sessions"] == 1
            assert room.connected_with[0] == "wss://lk.example.test"
            assert set(room.rpc_handlers) == {"lk.clear_buffer"} and set(room.byte_handlers) == {"lk.audio_stream"}

            media = room.media
            spec = media.spec
            assert (spec.width, spec.height, spec.fps, spec.sample_rate) == (128, 128, 25, 48_000)
            assert spec.audio_queue_ms == 100 and spec.video_max_bitrate == 2_000_000
            vo = media.video_options
            from livekit import rtc
            assert vo.video_codec == rtc.VideoCodec.H264 and vo.simulcast is False
            assert vo.video_encoding.max_framerate == 25 and vo.video_encoding.max_bitrate == 2_000_000
            assert media.audio_options.source == rtc.TrackSource.SOURCE_MICROPHONE

            # idle frames flow before any speech: paired, on the session clock
            await wait_for(lambda: len(media.audio) >= 10, 10, "idle ticks")
            n = min(len(media.video), len(media.audio))
            stamps = [ts for ts, _ in media.video[:n]]
            steps = np.diff(stamps)
            assert np.all(steps > 0) and np.all(steps % 40_000 == 0), stamps  # pts of ticks, 40 ms apart
            assert all(f.sample_rate == 48_000 and f.num_channels == 1 and f.samples_per_channel == 1920
                       for f in media.audio[:n])
            assert all((f.width, f.height) == (128, 128) for _, f in media.video[:n])
            # each frame goes to the room as its audio leaves the audio source's queue
            offsets = np.abs(media.av_offsets())
            assert np.median(offsets) < 0.020 and np.percentile(offsets, 90) < 0.040, offsets

            # one utterance at 24 kHz (livekit-agents' usual TTS rate), sent faster than real time
            before = len(media.audio)
            await room.send_audio_stream(tone(1.2, 24_000), 24_000, realtime=4.0)
            finished = await wait_for(room.finished_calls, 10, "lk.playback_finished")
            assert finished == [{"playback_position": pytest.approx(1.2, abs=0.1), "interrupted": False}]
            heard = media.audio_samples()[before * 1920:]
            assert np.abs(heard.astype(np.int32)).max() > 3000, "the agent's speech is in the published audio"
            started = [c for c in room.rpc_calls if c[1] == "lk.playback_started"]
            assert len(started) == 1, "asked once; the agent answered unsupported, so never again"
            assert all(dest == "agent-1" for dest, *_ in room.rpc_calls)

            # interrupt, five times over: each answered once, interrupted, and the next speech still plays
            for round_ in range(5):
                calls = len(room.finished_calls())
                stop = asyncio.Event()
                sending = asyncio.create_task(room.send_audio_stream(tone(4.0, 24_000), 24_000, realtime=1.5,
                                                                     stop=stop))
                await wait_for(lambda: worker.playing, 5, "speech to start")
                await asyncio.sleep(0.3)
                assert await room.call_rpc("lk.clear_buffer") == "ok"
                got = await wait_for(lambda: room.finished_calls()[calls:], 3, "the interrupted playback_finished")
                assert worker.figures.fallback_answers == 0, "answered from speech_finished, not the fallback"
                assert got[0]["interrupted"] is True and 0.0 < got[0]["playback_position"] < 4.0, got
                stop.set()
                await sending
                await asyncio.sleep(0.7)  # past the fallback: it must not answer a second time
                assert room.finished_calls()[calls:] == got, f"round {round_}: exactly one answer"
            calls = len(room.finished_calls())
            await room.send_audio_stream(tone(0.6, 16_000), 16_000, realtime=4.0)
            last = await wait_for(lambda: room.finished_calls()[calls:], 8, "speech after the interruptions")
            assert last == [{"playback_position": pytest.approx(0.6, abs=0.1), "interrupted": False}]

            offsets = media.av_offsets()
            assert len(offsets) >= 100 and np.percentile(np.abs(offsets), 95) < 0.040, np.sort(np.abs(offsets))[-10:]

            # the agent leaves: the worker leaves the room and ends its session
            room.leave("agent-1")
            await wait_for(lambda: worker.state == "ended", 10, "the worker to end")
            assert room.disconnected and media.closed
            assert manager.active == 0 and (await client.get("/health")).json()["livekit_workers"] == 0
            status = (await client.get(f"/launch/{body['worker_id']}", headers=AUTH)).json()
            assert status["state"] == "ended" and status["reason"] == "the agent left the room"
            assert status["figures"]["finished_sent"] == 7 and status["figures"]["interrupted"] == 5
            assert status["figures"]["fallback_answers"] == 0 and status["figures"]["rpc_failures"] == 0

    asyncio.run(main())


def test_json_launch_async_streams_from_strangers_lost_trailers_and_server_disconnect(tmp_path):
    """JSON with avatar_id and async_mode: 202 at once; no publish_on_behalf, so the first agent is ours; a
    stream from someone else is not played; a stream whose trailer never comes is ended by the next one (both
    answered); a stream with bad attributes is refused but still answered; the room going away ends the worker."""

    async def main():
        room = StandInRoom(agent_identity="agent-7", agent_present=False)
        async with service(tmp_path, [room]) as client:
            up = await client.post("/avatars", files={"image": ("p.jpg", PORTRAIT.read_bytes(), "image/jpeg")})
            avatar_id = up.json()["avatar_id"]
            token = mint_token(room="room-9")
            r = await client.post("/launch", json={"livekit_url": "https://lk.example.test:7880",
                                                   "livekit_token": token, "room_name": "room-9",
                                                   "avatar_id": avatar_id, "async_mode": True, "size": [128, 128]},
                                  headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 202, r.text
            body = r.json()
            assert body["state"] in ("starting", "joining", "running")
            worker = worker_of(client, body)
            await wait_for(lambda: worker.state == "running", 10, "the async join")
            assert room.connected_with[0] == "wss://lk.example.test:7880", "https is connected as wss"
            assert worker.agent_identity is None
            room.join("viewer-1", is_agent=False)
            room.join("agent-7", is_agent=True)
            assert worker.agent_identity == "agent-7"

            assert await room.call_rpc("lk.clear_buffer", caller="viewer-1") == "reject"
            await room.send_audio_stream(tone(0.5, 24_000), 24_000, sender="viewer-1")
            await asyncio.sleep(1.0)
            assert worker.figures.utterances == 0 and room.finished_calls() == []

            await room.send_audio_stream(tone(0.4, 24_000), 24_000, trailer=False)  # its trailer was lost
            await room.send_audio_stream(tone(0.4, 48_000, channels=2), 48_000, channels=2)
            got = await wait_for(lambda: len(room.finished_calls()) >= 2 and room.finished_calls(), 10,
                                 "both streams answered")
            assert [c["interrupted"] for c in got] == [False, False]
            assert [c["playback_position"] for c in got] == [pytest.approx(0.4, abs=0.1)] * 2

            await room.send_audio_stream(b"\0" * 4800, 24_000, attributes={"sample_rate": "lots"})
            got = await wait_for(lambda: len(room.finished_calls()) >= 3 and room.finished_calls(), 5, "refusal")
            assert got[2] == {"playback_position": 0.0, "interrupted": True}
            assert worker.figures.streams_refused == 1

            room.server_disconnects("ROOM_DELETED")
            await wait_for(lambda: worker.state == "ended", 10, "the worker to end")
            assert "ROOM_DELETED" in worker.reason and client.app.state.streams.active == 0

    asyncio.run(main())


def test_agent_never_comes_join_failures_and_the_limit(tmp_path):
    async def main():
        lonely = StandInRoom(agent_present=False)
        refusing = StandInRoom(refuse="engine: signal failure: 401 Unauthorized")
        refusing_async = StandInRoom(refuse="engine: signal failure: could not reach the server")
        async with service(tmp_path, [lonely, refusing, refusing_async], agent_wait_s=1.0, max_workers=1) as client:
            r = await launch(client)
            assert r.status_code == 200, r.text
            worker = worker_of(client, r.json())
            # LIVEKIT__MAX_WORKERS=1: a second launch while it runs is a 429
            busy = await launch(client)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "5", busy.text
            await wait_for(lambda: worker.state == "ended", 10, "the lonely worker to leave")
            assert worker.reason == "no agent joined within 1 s" and lonely.disconnected
            assert client.app.state.streams.active == 0

            r = await launch(client)
            assert r.status_code == 502 and r.json()["error_type"] == "livekit_join_failed", r.text
            assert "401 Unauthorized" in r.json()["error"]
            assert client.app.state.streams.active == 0, "the session of a failed join is ended"

            r = await launch(client, async_mode=True)
            assert r.status_code == 202
            worker = worker_of(client, r.json())
            await wait_for(lambda: worker.state == "failed", 10, "the async join to fail")
            status = (await client.get(f"/launch/{worker.worker_id}", headers=AUTH)).json()
            assert status["state"] == "failed" and "could not reach the server" in status["reason"]
            assert (await client.get("/launch")).status_code == 401
            listing = (await client.get("/launch", headers=AUTH)).json()
            assert listing["running"] == 0 and listing["max_workers"] == 1 and len(listing["workers"]) == 3
            assert (await client.get("/launch/lkw_nope", headers=AUTH)).status_code == 404

    asyncio.run(main())


def test_delete_stops_a_worker(tmp_path):
    async def main():
        room = StandInRoom()
        async with service(tmp_path, [room]) as client:
            body = (await launch(client)).json()
            worker = worker_of(client, body)
            r = await client.delete(f"/launch/{body['worker_id']}", headers=AUTH)
            assert r.status_code == 200
            await wait_for(lambda: worker.state == "ended", 10, "the worker to end")
            assert worker.reason == "stopped by DELETE /launch" and room.disconnected

    asyncio.run(main())


# --- the boundary: 4xx naming the field, before anything heavy ---------------------------------------------

BAD = [
    ({"livekit_url": "ftp://lk.example.test"}, 422, "livekit_url must be a ws://"),
    ({"livekit_url": "wss://"}, 422, "livekit_url must be a ws://"),
    ({"livekit_url": None}, 422, "livekit_url is required"),
    ({"livekit_url": 7, "_json_only": True}, 422, "livekit_url must be a string"),
    ({"livekit_token": "not-a-jwt"}, 422, "livekit_token is not a JWT"),
    ({"livekit_token": "a.b.c"}, 422, "livekit_token is not a JWT"),
    ({"livekit_token": None}, 422, "livekit_token is required"),
    ({"livekit_token": mint_token(room_join=False)}, 422, "roomJoin"),
    ({"livekit_token": mint_token(ttl_s=-10)}, 422, "livekit_token has expired"),
    ({"livekit_token": mint_token(room="other-room")}, 422, "room_name 'room-1' is not the room"),
    ({"room_name": None, "livekit_token": mint_token(room=None)}, 422, "room_name is required"),
    ({"room_name": "bad\x01name"}, 422, "room_name contains the control character"),
    ({"avatar_id": "someone"}, 422, "exactly one of avatar_image, avatar_image_url or avatar_id (got avatar_image, avatar_id)"),
    ({"avatar_image_url": "file:///etc/passwd", "_no_image": True}, 422, "avatar_image_url must be an http(s) URL"),
    ({"avatar_image_url": "http://127.0.0.1:9/a.jpg", "_no_image": True}, 422, "is not a public address"),
    ({"_no_image": True}, 422, "send exactly one of avatar_image, avatar_image_url or avatar_id"),
    ({"async_mode": "maybe"}, 422, "async_mode must be true or false"),
    ({"avatar_id": "nobody", "_no_image": True}, 404, "nobody"),
]


def test_bad_requests_are_4xx_naming_the_field(tmp_path):
    async def main():
        async with service(tmp_path, []) as client:
            headers = {"Authorization": f"Bearer {KEY}"}
            for change, status, text in BAD:
                data = {**form(), **{k: v for k, v in change.items() if not k.startswith("_")}}
                data = {k: v for k, v in data.items() if v is not None}
                if change.get("_json_only"):
                    data["avatar_image"] = base64.b64encode(PORTRAIT.read_bytes()).decode()
                    r = await client.post("/launch", json=data, headers=headers)
                    assert r.status_code == status and text in r.json()["error"], (change, r.text)
                    continue
                files = None if change.get("_no_image") else {
                    "avatar_image": ("a.jpg", PORTRAIT.read_bytes(), "image/jpeg")}
                r = await client.post("/launch", data=data, files=files, headers=headers)
                assert r.status_code == status and text in r.json()["error"], (change, r.status_code, r.text)
                # the same through JSON, where it applies
                if files is None:
                    r = await client.post("/launch", json=data, headers=headers)
                    assert r.status_code == status and text in r.json()["error"], (change, r.text)

            r = await client.post("/launch", data=form(), files={"avatar_image": ("a.jpg", b"GIF89a....", "image/gif")},
                                  headers=headers)
            assert r.status_code == 422 and "avatar_image is not a JPEG, PNG or WebP" in r.json()["error"]
            r = await client.post("/launch", json={**form(), "avatar_image": "@@@"}, headers=headers)
            assert r.status_code == 422 and "avatar_image is not valid base64" in r.json()["error"]
            r = await client.post("/launch", content=b"x", headers={**headers, "Content-Type": "text/plain"})
            assert r.status_code == 415
            r = await client.post("/launch", json=[1], headers=headers)
            assert r.status_code == 422 and "JSON object" in r.json()["error"]

            # the key
            for auth in (None, "Bearer wrong-key-0123456789abcdef", f"Basic {KEY}"):
                r = await client.post("/launch", data=form(), headers={"Authorization": auth} if auth else {})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", auth
            assert client.made == [] and client.app.state.streams.active == 0, "nothing started for a bad request"

    asyncio.run(main())


def test_avatar_image_url_is_fetched_within_limits(tmp_path):
    """avatar_image_url (the plugin's form field for a URL) through real HTTP on 127.0.0.1, which
    LIVEKIT__IMAGE_URL_ALLOW_PRIVATE allows; no redirects; an oversized image is refused mid-body."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    portrait = PORTRAIT.read_bytes()

    class Images(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/portrait.jpg":
                body, code, extra = portrait, 200, {}
            elif self.path == "/big.jpg":
                body, code, extra = portrait + b"\0" * (200 * 1024), 200, {}
            elif self.path == "/moved":
                body, code, extra = b"", 302, {"Location": "/portrait.jpg"}
            else:
                body, code, extra = b"no", 404, {}
            self.send_response(code)
            for k, v in extra.items():
                self.send_header(k, v)
            if self.path != "/big.jpg":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    async def main():
        room = StandInRoom()
        async with service(tmp_path, [room], image_url_allow_private=True) as client:
            client.app.state.settings.talking_head.max_image_bytes = len(portrait) + 64 * 1024
            headers = {"Authorization": f"Bearer {KEY}"}
            for path, text in (("/big.jpg", "larger than"), ("/moved", "answered HTTP 302"),
                               ("/missing.jpg", "answered HTTP 404")):
                r = await client.post("/launch", data={**form(), "avatar_image_url": base + path}, headers=headers)
                assert r.status_code == 422 and text in r.json()["error"], (path, r.text)
            r = await client.post("/launch", json={**form(), "avatar_image_url": base + "/portrait.jpg",
                                                   "size": SIZE}, headers=headers)
            assert r.status_code == 200, r.text
            worker = worker_of(client, r.json())
            assert worker.session.avatar_id
            worker.stop("test over")
            await wait_for(lambda: worker.state == "ended", 10, "the worker to end")

    try:
        asyncio.run(main())
    finally:
        server.shutdown()


def test_token_claims_unit():
    from gpu_service.errors import ValidationFailed
    from gpu_service.streaming.launch import check_livekit_url, token_claims

    claims = token_claims(mint_token(identity="me", room="r", attributes={"lk.publish_on_behalf": "agent"}))
    assert claims["sub"] == "me" and claims["video"] == {"roomJoin": True, "room": "r"}
    assert claims["attributes"] == {"lk.publish_on_behalf": "agent"}
    unsigned = "eyJhbGciOiJub25lIn0." + mint_token().split(".")[1] + ".x"
    with pytest.raises(ValidationFailed, match="not a signed JWT"):
        token_claims(unsigned)
    assert check_livekit_url("http://h:7880/x") == "ws://h:7880/x"
    assert check_livekit_url("wss://h") == "wss://h"
    with pytest.raises(ValidationFailed, match="not a valid URL"):
        check_livekit_url("ws://h:99999")
    assert json.loads(json.dumps(claims))  # plain JSON
