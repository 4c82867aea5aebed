"""Tier 2: the runtime's live-stream front (`POST /api/v1/stream` and the session's relayed URLs).

The runtime is the real app behind uvicorn; the GPU service is a scripted stand-in speaking the
`/stream/sessions` contract of STREAMING.md (its answers chosen by the test: 429, 404, an unreachable
address, events sent on cue), so that every path of the relay is seen over real HTTP. The real GPU
service behind the real runtime, and a real browser, are tests/browser/test_demo_browser.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import uuid
from typing import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.helpers import free_port, wait_ready

KEY = "stream-test-key"


class StandIn:
    """What the scripted GPU service has seen and will answer."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict] = {}
        self.create_status = 201
        self.calls: list[tuple[str, str, dict]] = []
        self.listeners = 0
        self.queues: dict[str, list[asyncio.Queue]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def push(self, session_id: str, event: dict) -> None:
        """Send one event to every listener of a session (from the test's thread)."""
        for q in self.queues.get(session_id, []):
            self.loop.call_soon_threadsafe(q.put_nowait, event)


def stand_in_app(state: StandIn) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next):
        state.loop = asyncio.get_running_loop()
        state.calls.append((request.method, request.url.path, dict(request.headers)))
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "healthy", "active_sessions": len(state.sessions), "max_sessions": 4}

    @app.get("/ready")
    def ready():
        return {"ready": True}

    @app.get("/avatars")
    def avatars():
        return [{"avatar_id": "astronaut", "face_box": [128, 64, 256, 320], "image_size": [512, 512], "preset": True}]

    @app.post("/stream/sessions")
    async def create(request: Request):
        body = await request.json()
        if state.create_status == 429:
            return JSONResponse({"error": "4 sessions are running (STREAM_MAX_SESSIONS=4)", "error_type": "overloaded"},
                                status_code=429, headers={"Retry-After": "7"})
        if state.create_status == 422:
            return JSONResponse({"error": "size must be [width, height] or \"WxH\", got 'big'",
                                 "error_type": "validation_error"}, status_code=422)
        sid = uuid.uuid4().hex
        state.sessions[sid] = body
        base = f"/stream/sessions/{sid}"
        return JSONResponse({"session_id": sid, "avatar_id": body.get("avatar_id", "astronaut"), "fps": 25,
                             "width": 256, "height": 256, "sample_rate": 48000, "offer_url": f"{base}/offer",
                             "say_url": f"{base}/say", "audio_url": f"{base}/audio", "interrupt_url": f"{base}/interrupt",
                             "events_url": f"{base}/events", "expires_after_idle_s": 30}, status_code=201)

    def missing(sid: str) -> JSONResponse:
        return JSONResponse({"error": f"no session {sid!r}", "error_type": "not_found"}, status_code=404)

    @app.post("/stream/sessions/{sid}/offer")
    async def offer(sid: str, request: Request):
        if sid not in state.sessions:
            return missing(sid)
        body = await request.json()
        return {"sdp": "v=0 answer to " + body["sdp"], "type": "answer"}

    @app.post("/stream/sessions/{sid}/say")
    async def say(sid: str, request: Request):
        if sid not in state.sessions:
            return missing(sid)
        body = await request.json()
        if body["text"] == "overload":
            return JSONResponse({"error": "speech queue is full", "error_type": "overloaded"}, status_code=429,
                                headers={"Retry-After": "2"})
        return JSONResponse({"utterance_id": "u1", "text": body["text"]}, status_code=202)

    @app.post("/stream/sessions/{sid}/interrupt")
    def interrupt(sid: str):
        return missing(sid) if sid not in state.sessions else {"interrupted": "u1"}

    @app.get("/stream/sessions/{sid}/events")
    async def events(sid: str, request: Request):
        if sid not in state.sessions:
            return missing(sid)
        q: asyncio.Queue = asyncio.Queue()
        state.queues.setdefault(sid, []).append(q)

        async def pieces():
            state.listeners += 1
            try:
                while True:
                    event = await q.get()
                    if event.get("split"):  # one event in two writes: no keep-alive may land inside it
                        text = f"data: {json.dumps(event['event'])}\n\n"
                        yield text[:7]
                        await asyncio.sleep(0.6)
                        yield text[7:]
                        continue
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                    if event["event"] == "session_closed":
                        return
            finally:
                state.listeners -= 1
                state.queues[sid].remove(q)

        return StreamingResponse(pieces(), media_type="text/event-stream")

    @app.delete("/stream/sessions/{sid}")
    def delete(sid: str):
        if state.sessions.pop(sid, None) is None:
            return missing(sid)
        return Response(status_code=204)

    return app


@contextlib.contextmanager
def serve(app, ready_path: str = "/ready") -> Iterator[str]:
    """An ASGI app behind uvicorn on a free port in a thread, until the block ends."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + ready_path, 30)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def stand_in():
    state = StandIn()
    with serve(stand_in_app(state)) as url:
        state.url = url
        yield state


@contextlib.contextmanager
def runtime_app(tmp_path, gpu_urls: list[str], **overrides) -> Iterator[str]:
    from runtime.app import create_app
    from runtime.settings import Settings

    settings = Settings(data_dir=tmp_path / "rt", gpu_service_urls=gpu_urls, runtime_api_keys=[KEY],
                        gpu_health_interval_s=0.2, **overrides)
    with serve(create_app(settings), "/health") as url:
        yield url


def keyed(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30)


def create(http: httpx.Client, **body) -> dict:
    resp = http.post("/api/v1/stream", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_a_session_is_created_with_the_key_and_driven_with_its_token_alone(stand_in, tmp_path):
    with runtime_app(tmp_path, [stand_in.url]) as url, keyed(url) as http:
        assert httpx.post(f"{url}/api/v1/stream", json={}).status_code == 401  # creating needs the API key
        made = create(http)
        assert made["width"] == 256 and made["fps"] == 25 and made["sample_rate"] == 48000
        assert made["avatar_id"] == "astronaut"  # DEFAULT_AVATAR_ID
        assert made["face_box"] == [0.25, 0.125, 0.5, 0.625]  # the avatar's face box, as fractions of the frame
        sid = made["stream_id"]
        assert made["offer_url"] == f"{url}/api/v1/stream/{sid}/offer"
        # nothing in the answer leads to the GPU service
        assert stand_in.url.split("//")[1] not in json.dumps(made)
        assert len(made["token"]) >= 40

        anon = httpx.Client(timeout=30)  # no API key from here on
        token = {"X-Stream-Token": made["token"]}
        answer = anon.post(made["offer_url"], json={"sdp": "v=0 offer", "type": "offer"}, headers=token)
        assert answer.status_code == 200 and answer.json() == {"sdp": "v=0 answer to v=0 offer", "type": "answer"}
        said = anon.post(made["say_url"], json={"text": "Hello there."}, headers=token)
        assert said.status_code == 202 and said.json()["utterance_id"] == "u1"
        assert anon.post(made["interrupt_url"], headers=token).json() == {"interrupted": "u1"}

        # the request id travels to the GPU service, as for jobs
        anon.post(made["say_url"], json={"text": "Again."}, headers={**token, "X-Request-ID": "rid-stream-1"})
        assert any(c[1].endswith("/say") and c[2].get("x-request-id") == "rid-stream-1" for c in stand_in.calls)

        # without the token: 401; another session's token, or a made-up id: 404 (as a session that does not exist)
        assert anon.post(made["say_url"], json={"text": "Hi."}).status_code == 401
        other = create(http)
        wrong = anon.post(made["say_url"], json={"text": "Hi."}, headers={"X-Stream-Token": other["token"]})
        assert wrong.status_code == 404 and wrong.json()["error_type"] == "not_found"
        assert anon.post(f"{url}/api/v1/stream/nope/say", json={"text": "Hi."}, headers=token).status_code == 404
        # the API key is no token
        assert http.post(made["say_url"], json={"text": "Hi."}).status_code == 401

        # bad bodies are refused here, naming the field
        bad = anon.post(made["say_url"], json={"txt": "Hi."}, headers=token)
        assert bad.status_code == 422 and "txt" in bad.json()["error"]
        assert anon.post(made["offer_url"], json={"sdp": "x", "type": "answer"}, headers=token).status_code == 422

        assert anon.delete(made["stream_url"], headers=token).status_code == 204
        gone = anon.post(made["say_url"], json={"text": "Hi."}, headers=token)
        assert gone.status_code == 404 and sid in gone.json()["error"]


def test_events_are_passed_on_as_they_come_and_the_upstream_closes_when_the_viewer_leaves(stand_in, tmp_path):
    with runtime_app(tmp_path, [stand_in.url], stream_keepalive_s=0.3) as url, keyed(url) as http:
        made = create(http)
        sid = made["stream_id"].split(".", 1)[1]
        with httpx.stream("GET", made["events_url"], params={"token": made["token"]}, timeout=10) as events:
            assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
            lines = events.iter_lines()
            deadline = time.monotonic() + 5
            while stand_in.listeners < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            stand_in.push(sid, {"event": "speech_started", "utterance_id": "u1", "t": 1.0})
            # the first event arrives on its own, long before the stream ends
            assert next(lines) == "event: speech_started"
            assert json.loads(next(lines)[6:])["utterance_id"] == "u1"
            assert next(lines) == ""
            # a quiet stream gets keep-alive comments, never inside an event
            assert next(lines) == ": keep-alive"
            stand_in.push(sid, {"split": True, "event": {"event": "speech_finished", "utterance_id": "u1"}})
            seen = [next(lines) for _ in range(8)]
            data = [line for line in seen if line.startswith("data: ")]
            assert json.loads(data[0][6:])["event"] == "speech_finished", seen
        deadline = time.monotonic() + 5  # the viewer left: the runtime closes its upstream request
        while stand_in.listeners and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stand_in.listeners == 0
        unknown = httpx.get(made["events_url"].replace(made["stream_id"], made["stream_id"][:9] + "x" * 32),
                            headers={"X-Stream-Token": made["token"]})
        assert unknown.status_code == 404


def test_429_is_passed_on_with_retry_after_and_a_4xx_with_the_services_words(stand_in, tmp_path):
    with runtime_app(tmp_path, [stand_in.url]) as url, keyed(url) as http:
        made = create(http)
        busy = httpx.post(made["say_url"], json={"text": "overload"}, headers={"X-Stream-Token": made["token"]})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "2", busy.text
        stand_in.create_status = 429
        full = http.post("/api/v1/stream", json={})
        assert full.status_code == 429 and full.headers["retry-after"] == "7"
        assert "STREAM_MAX_SESSIONS" in full.json()["error"]
        stand_in.create_status = 422
        bad = http.post("/api/v1/stream", json={"size": "big"})
        assert bad.status_code == 422 and "size" in bad.json()["error"]
        # what needs no network is refused before the GPU service is asked
        stand_in.calls.clear()
        for body, word in (({"avatar": "x"}, "avatar"), ({"emotion": "bored"}, "emotion"),
                           ({"avatar_id": "a", "avatar_image": "eA=="}, "one of"), ({"fps": 0}, "fps")):
            refused = http.post("/api/v1/stream", json=body)
            assert refused.status_code == 422 and word in refused.json()["error"], refused.text
        # an avatar the GPU services do not know, named with the ones they do
        unknown = http.post("/api/v1/stream", json={"avatar_id": "nobody"})
        assert unknown.status_code == 422 and "'nobody'" in unknown.json()["error"], unknown.text
        assert "known avatars: astronaut" in unknown.json()["error"]
        assert not [c for c in stand_in.calls if c[1] == "/stream/sessions"]


def test_an_unreachable_service_is_named_in_a_503_and_a_down_one_is_passed_over(stand_in, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with runtime_app(tmp_path, [dead]) as url, keyed(url) as http:
        resp = http.post("/api/v1/stream", json={"avatar_id": "astronaut"})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error_type"] == "gpu_service_unavailable" and dead.split("//")[1] in resp.json()["error"]
    with runtime_app(tmp_path, [dead, stand_in.url]) as url, keyed(url) as http:
        for _ in range(3):  # whichever the avatar's affinity puts first, the session lands on the live one
            made = create(http, avatar_id="astronaut")
            assert httpx.post(made["say_url"], json={"text": "Hi."},
                              headers={"X-Stream-Token": made["token"]}).status_code == 202


def test_any_runtime_with_the_same_secret_serves_the_session(stand_in, tmp_path):
    secret = "s" * 32
    with runtime_app(tmp_path / "a", [stand_in.url], stream_token_secret=secret) as first, keyed(first) as http:
        made = create(http)
    with runtime_app(tmp_path / "b", [stand_in.url], stream_token_secret=secret) as second:
        said = httpx.post(f"{second}/api/v1/stream/{made['stream_id']}/say", json={"text": "Hi."},
                          headers={"X-Stream-Token": made["token"]})
        assert said.status_code == 202, said.text
    with runtime_app(tmp_path / "c", [stand_in.url]) as third:  # its own random secret: the token is not its
        said = httpx.post(f"{third}/api/v1/stream/{made['stream_id']}/say", json={"text": "Hi."},
                          headers={"X-Stream-Token": made["token"]})
        assert said.status_code == 404


def test_the_demo_page_is_served_without_a_key_and_asks_for_one_when_keys_are_set(tmp_path):
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.settings import Settings

    for keys, shown in (([KEY], "true"), ([], "false")):
        with TestClient(create_app(Settings(data_dir=tmp_path / f"k{len(keys)}", runtime_api_keys=keys))) as c:
            page = c.get("/demo")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert f'data-api-key-required="{shown}"' in page.text
            assert 'src="/demo/demo.js"' in page.text and "http" not in page.text.split("<body")[1]  # no CDN
            script = c.get("/demo/demo.js")
            assert script.status_code == 200 and "javascript" in script.headers["content-type"]
            assert "requestVideoFrameCallback" in script.text and "getStats" in script.text
            doc = c.get("/openapi.json").json()
            assert doc["paths"]["/api/v1/stream/{stream_id}/say"]["post"]["security"] == [{"StreamToken": []}]


def test_a_runtime_stopping_ends_its_open_event_streams_instead_of_waiting_on_them(stand_in, tmp_path):
    from tests.runtime.conftest import API_KEY, runtime_proc

    (tmp_path / "p").mkdir()
    proc = runtime_proc(tmp_path / "p", stand_in.url, STREAM_KEEPALIVE_S="0.5").start()
    try:
        made = httpx.post(f"{proc.url}/api/v1/stream", json={}, headers={"X-API-Key": API_KEY}, timeout=30).json()
        with httpx.stream("GET", made["events_url"], headers={"X-Stream-Token": made["token"]}, timeout=30) as events:
            assert events.status_code == 200
            proc.proc.send_signal(signal.SIGTERM)
            t = time.monotonic()
            for _ in events.iter_lines():  # ends: the runtime closed it, cleanly (keep-alives until then)
                if time.monotonic() - t > 8:
                    break
            waited = time.monotonic() - t
        assert waited < 5
        assert proc.proc.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    finally:
        proc.kill()


def test_the_face_box_follows_the_frames_crop_to_their_aspect():
    from runtime.streams import crop_box

    # a square frame of a square portrait: the portrait's own fractions
    assert crop_box((128, 64, 256, 320), (512, 512), (256, 256)) == [0.25, 0.125, 0.5, 0.625]
    # a wide frame of a square portrait: its middle 512x256 band is kept (rows 128..384)
    assert crop_box((128, 192, 256, 128), (512, 512), (512, 256)) == [0.25, 0.25, 0.5, 0.5]
    # a tall frame of a wide portrait: its middle columns (100..300 of 400x200 for a 1:1 frame)
    assert crop_box((150, 50, 100, 100), (400, 200), (64, 64)) == [0.25, 0.25, 0.5, 0.5]
    # partly outside the crop: clipped to the frame
    assert crop_box((0, 0, 200, 100), (400, 200), (200, 200)) == [0.0, 0.0, 0.5, 0.5]
