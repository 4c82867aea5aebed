"""One real GPU service (uvicorn on 127.0.0.1, real Piper and landmark engines) for the streaming tests.

Sessions are reached over HTTP and, for their ticks, in process: `on_loop` runs a coroutine on the
server's event loop, where a session's subscriptions and event feeds live.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Awaitable, Callable, TypeVar

import cv2
import httpx
import numpy as np
import pytest
from skimage import data

from tests.conftest import serving_app

T = TypeVar("T")

MAX_SESSIONS = 3
IDLE_TIMEOUT_S = 3.0


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="session")
def stream_service(tmp_path_factory):
    """(base URL, app) of a service with the `astro` preset, STREAM_MAX_SESSIONS=3, a 3 s idle timeout and a
    1 s viewer buffer (the default is 8 ticks: a test's event loop, starved by the parallel tests on shared
    CPUs, once fell 9 ticks behind and its subscription dropped one, which the clock checks read as a skip)."""
    from gpu_service.settings import Settings

    root = tmp_path_factory.mktemp("stream")
    (root / "presets" / "astro").mkdir(parents=True)
    (root / "presets" / "astro" / "portrait.png").write_bytes(png(data.astronaut()))
    settings = Settings(device="cpu", tts_engines=["piper"], data_dir=root / "data", preset_avatars_dir=root / "presets",
                        stream={"max_sessions": MAX_SESSIONS, "idle_timeout_s": IDLE_TIMEOUT_S, "viewer_buffer_ticks": 25},
                        piper={"noise_w_scale": 0.0})
    with serving_app(settings) as url:
        yield url, serving_app.app


@pytest.fixture
def service(stream_service):
    """The service, with every session closed after the test (so the cap test starts from none)."""
    url, app = stream_service
    with httpx.Client(base_url=url, timeout=30) as client:
        client.app = app
        yield client
        for session in app.state.streams.sessions():
            on_loop(session, session.close)


def on_loop(session, fn: Callable[..., Awaitable[T]], *args, timeout: float = 60.0) -> T:
    """Run `fn(*args)` on the event loop that serves `session` and wait for its result."""
    return start_on_loop(session, fn, *args).result(timeout)


def start_on_loop(session, fn: Callable[..., Awaitable[T]], *args) -> concurrent.futures.Future:
    """Start `fn(*args)` on the session's loop; a concurrent Future of its result."""
    return asyncio.run_coroutine_threadsafe(fn(*args), session._loop)


def create(client: httpx.Client, **body) -> dict:
    resp = client.post("/stream/sessions", json={"avatar_id": "astro", **body})
    assert resp.status_code == 201, resp.text
    return resp.json()
