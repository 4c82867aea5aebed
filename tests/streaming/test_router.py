"""The /stream/sessions endpoints over real HTTP and WebSocket: lifecycle, the cap, events, pushed PCM, bad input."""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import pytest
from skimage import data
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gpu_service.speech.protocol import SpeechRequest
from tests.helpers import parse_metrics
from tests.streaming.conftest import IDLE_TIMEOUT_S, MAX_SESSIONS, create, on_loop, png, start_on_loop


def ws_url(client: httpx.Client, path: str) -> str:
    return str(client.base_url).replace("http://", "ws://").rstrip("/") + path


def active_gauge(client: httpx.Client) -> float:
    _, values = parse_metrics(client.get("/metrics").text)
    return values[("avatar_gpu_stream_sessions_active", ())]


def test_create_describe_delete(service):
    info = create(service, fps=25, size=[256, 256])
    sid = info["session_id"]
    base = f"/stream/sessions/{sid}"
    assert info == {
        "session_id": sid, "avatar_id": "astro", "fps": 25, "width": 256, "height": 256, "sample_rate": 48000,
        "offer_url": f"{base}/offer", "say_url": f"{base}/say", "audio_url": f"{base}/audio",
        "interrupt_url": f"{base}/interrupt", "events_url": f"{base}/events", "expires_after_idle_s": IDLE_TIMEOUT_S,
    }
    session = service.app.state.streams.get(sid)

    async def one_tick():
        sub = session.subscribe()
        tick = await sub.get()
        sub.close()
        return tick

    assert on_loop(session, one_tick).frame.shape == (256, 256, 3)  # rendered at 512, then INTER_AREA down
    got = service.get(base).json()
    assert got["session_id"] == sid and got["width"] == 256 and got["speaking"] is None
    assert service.post(f"{base}/interrupt").json() == {"interrupted": None}
    assert service.delete(base).status_code == 204
    for resp in (service.get(base), service.delete(base), service.post(f"{base}/say", json={"text": "hi"})):
        assert resp.status_code == 404 and sid in resp.json()["error"]


def test_cap_health_and_metrics(service):
    assert service.get("/health").json()["active_sessions"] == 0
    ids = [create(service)["session_id"] for _ in range(MAX_SESSIONS)]
    health = service.get("/health").json()
    assert (health["active_sessions"], health["max_sessions"]) == (MAX_SESSIONS, MAX_SESSIONS)
    assert active_gauge(service) == MAX_SESSIONS
    over = service.post("/stream/sessions", json={"avatar_id": "astro"})
    assert over.status_code == 429 and int(over.headers["Retry-After"]) > 0
    assert "STREAM_MAX_SESSIONS" in over.json()["error"]
    assert service.delete(f"/stream/sessions/{ids[0]}").status_code == 204
    assert service.get("/health").json()["active_sessions"] == MAX_SESSIONS - 1
    assert active_gauge(service) == MAX_SESSIONS - 1
    create(service)  # a place came free


def test_sse_events_for_say(service):
    info = create(service)
    sid = info["session_id"]
    events = []
    with service.stream("GET", info["events_url"], timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        assert next(lines).startswith(": connected")
        said = service.post(info["say_url"], json={"text": "Events, please."})
        assert said.status_code == 202
        uid = said.json()["utterance_id"]
        deadline = time.monotonic() + 30
        for line in lines:  # bounded: the stream keeps alive every 15 s, the deadline ends the loop
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["event"] == "speech_finished" or time.monotonic() > deadline:
                    break
    assert [e["event"] for e in events] == ["speech_started", "speech_finished"]
    assert all(e["utterance_id"] == uid for e in events)
    assert events[1]["interrupted"] is False and events[1]["position_s"] > 0.3
    assert events[1]["t"] - events[0]["t"] == pytest.approx(events[1]["position_s"], abs=0.05 + 0.04 * service.app.state.streams.get(sid).underruns)


def test_pushed_pcm_over_the_websocket(service):
    engine = service.app.state.registry.speech_engine(None).engine
    speech = engine.synthesize(SpeechRequest(text="The mouth follows pushed audio."))
    pcm24 = (np.clip(speech.audio, -1, 1) * 32767).astype("<i2")  # Piper's 22.05 kHz, sent as it is
    info = create(service)
    session = service.app.state.streams.get(info["session_id"])

    async def watch(seconds):
        sub = session.subscribe()
        ticks = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ticks.append(await sub.get())
        sub.close()
        return ticks

    watching = start_on_loop(session, watch, speech.duration_s + 2.0)
    events = []
    with connect(ws_url(service, info["audio_url"]), open_timeout=10) as ws:
        ws.send(json.dumps({"sample_rate": speech.sample_rate, "channels": 1}))
        assert json.loads(ws.recv(timeout=10))["event"] == "ready"
        step = speech.sample_rate // 10 * 2  # 100 ms of s16
        raw = pcm24.tobytes()
        for i in range(0, len(raw), step):
            ws.send(raw[i:i + step])
        ws.send(json.dumps({"type": "end"}))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            events.append(json.loads(ws.recv(timeout=20)))
            if events[-1]["event"] == "speech_finished":
                break
    ticks = watching.result(30)
    kinds = [e["event"] for e in events]
    assert kinds == ["utterance", "speech_started", "speech_finished"], events
    uid = events[0]["utterance_id"]
    assert events[2]["position_s"] == pytest.approx(speech.duration_s, abs=0.03) and not events[2]["interrupted"]
    spoken = [t for t in ticks if t.utterance_id == uid]
    assert spoken and max(t.mouth_open for t in spoken) > 0.15
    assert sum(t.audio.any() for t in spoken) > 0.5 * len(spoken)


def test_websocket_interrupt(service):
    t = np.arange(3 * 16000) / 16000  # 3 s of a voiced, syllable-like buzz at 16 kHz
    buzz = (0.3 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) * 32767).astype("<i2")
    info = create(service)
    events = []
    with connect(ws_url(service, info["audio_url"]), open_timeout=10) as ws:
        ws.send(json.dumps({"sample_rate": 16000}))
        assert json.loads(ws.recv(timeout=10))["event"] == "ready"
        ws.send(buzz.tobytes())  # no end: an open utterance, faster than real time
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(e["event"] == "speech_started" for e in events):
            events.append(json.loads(ws.recv(timeout=20)))
        time.sleep(0.3)
        ws.send(json.dumps({"type": "interrupt"}))
        while time.monotonic() < deadline and events[-1]["event"] != "speech_finished":
            events.append(json.loads(ws.recv(timeout=20)))
        ws.send(buzz[:8000].tobytes())  # the next frame starts a new utterance
        ws.send(json.dumps({"type": "end"}))
        while time.monotonic() < deadline and not (events[-1]["event"] == "speech_finished"
                                                   and events[-1]["utterance_id"] != events[0]["utterance_id"]):
            events.append(json.loads(ws.recv(timeout=20)))
    first, second = events[0]["utterance_id"], events[-1]["utterance_id"]
    assert first != second
    finished = {e["utterance_id"]: e for e in events if e["event"] == "speech_finished"}
    assert [e["event"] for e in events].count("speech_finished") == 2
    assert finished[first]["interrupted"] is True and 0.2 < finished[first]["position_s"] < 3.0
    assert finished[second]["interrupted"] is False and finished[second]["position_s"] == pytest.approx(0.5, abs=0.03)


def test_websocket_refuses_a_bad_header_and_an_unknown_session(service):
    info = create(service)
    with connect(ws_url(service, info["audio_url"]), open_timeout=10) as ws:
        ws.send(json.dumps({"channels": 1}))
        error = json.loads(ws.recv(timeout=10))
        assert error["event"] == "error" and "sample_rate" in error["error"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 4422
    with connect(ws_url(service, info["audio_url"]), open_timeout=10) as ws:
        ws.send(json.dumps({"sample_rate": 2000}))
        assert "sample_rate" in json.loads(ws.recv(timeout=10))["error"]
    with connect(ws_url(service, "/stream/sessions/sess_nope/audio"), open_timeout=10) as ws:
        assert "sess_nope" in json.loads(ws.recv(timeout=10))["error"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 4404


@pytest.mark.parametrize("body, status, field", [
    ({"avatar_id": "nobody"}, 404, "nobody"),
    ({"avatar_image": "!!not base64!!"}, 422, "avatar_image"),
    ({"avatar_id": "astro", "fps": 5}, 422, "fps"),
    ({"avatar_id": "astro", "fps": 35}, 422, "fps"),  # 48000 / 35 is no whole number of samples
    ({"avatar_id": "astro", "size": [511, 512]}, 422, "size"),
    ({"avatar_id": "astro", "size": "big"}, 422, "size"),
    ({"avatar_id": "astro", "emotion": "bored"}, 422, "emotion"),
    ({"avatar_id": "astro", "voice": "nobody"}, 422, "voice"),
    ({"avatar_id": "astro", "avatar_image": "aGk="}, 422, "avatar_image"),
    ({}, 422, "avatar_id"),
    ({"avatar_id": "astro", "colour": "red"}, 422, "colour"),
])
def test_bad_session_requests(service, body, status, field):
    resp = service.post("/stream/sessions", json=body)
    assert resp.status_code == status, resp.text
    assert field in resp.json()["error"]
    assert service.get("/health").json()["active_sessions"] == 0


def test_bad_say_and_content_type(service):
    info = create(service)
    for body, field in (({"text": "   "}, "text"), ({"text": "hi", "voice": "nobody"}, "voice"),
                        ({"text": "hi", "emotion": "bored"}, "emotion"), ({}, "text")):
        resp = service.post(info["say_url"], json=body)
        assert resp.status_code == 422 and field in resp.json()["error"], resp.text
    resp = service.post("/stream/sessions", content=b"avatar_id=astro", headers={"content-type": "text/plain"})
    assert resp.status_code == 415


def test_inline_portrait(service):
    image = base64.b64encode(png(data.astronaut()[::2, ::2])).decode()  # 256x256
    info = create(service, avatar_id=None, avatar_image=image)
    assert info["avatar_id"] != "astro" and (info["width"], info["height"]) == (256, 256)


def test_unwatched_sessions_are_reaped(service):
    never = create(service)["session_id"]
    watched = create(service)
    started = time.monotonic()
    with service.stream("GET", watched["events_url"], timeout=30) as resp:
        lines = resp.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        time.sleep(IDLE_TIMEOUT_S + 1.0)  # watched all along: still there, while the unwatched one went
        assert service.get(f"/stream/sessions/{watched['session_id']}").status_code == 200
    assert service.get(f"/stream/sessions/{never}").status_code == 404
    left = time.monotonic()
    while service.get(f"/stream/sessions/{watched['session_id']}").status_code == 200:
        assert time.monotonic() - left < IDLE_TIMEOUT_S + 3.0, "never reaped"
        time.sleep(0.2)
    assert time.monotonic() - left >= IDLE_TIMEOUT_S - 1.0  # reaped after the timeout, not at once
    assert time.monotonic() - started < 3 * IDLE_TIMEOUT_S + 6
    assert service.get("/health").json()["active_sessions"] == 0


def test_emotion_shows_on_the_idle_face(service):
    frames = {}
    for emotion in ("neutral", "happy"):
        info = create(service, emotion=emotion, seed=7, head_motion=False)
        session = service.app.state.streams.get(info["session_id"])

        async def first_ticks():
            sub = session.subscribe()
            ticks = [await sub.get() for _ in range(12)]
            sub.close()
            return ticks

        frames[emotion] = {t.index: t.frame for t in on_loop(session, first_ticks)}
        assert service.delete(f"/stream/sessions/{info['session_id']}").status_code == 204
    common = sorted(set(frames["neutral"]) & set(frames["happy"]))[-1]  # the emotion has eased in by then
    diff = np.abs(frames["neutral"][common].astype(int) - frames["happy"][common]).sum(axis=2)
    assert (diff > 12).sum() > 50, "a happy face looks like a neutral one"  # same seed: same blinks and breaths
