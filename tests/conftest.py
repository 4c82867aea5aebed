"""Fixtures shared by every test tier. Engines are real; nothing here mocks a model."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import pytest


@pytest.fixture(scope="session")
def piper_engine():
    """The real Piper engine with the bundled voice, loaded once for the session.

    Its duration noise is off, so every run of a text gets the same phoneme timings and a timing
    assertion judges the same speech in every run; the audio itself is still sampled.
    tests/talking_head/test_driving.py checks the guarantees over speech with the voice's own noise.
    """
    from gpu_service.speech.engines.piper import PiperEngine

    engine = PiperEngine(noise_w_scale=0.0)
    engine.load("cpu")
    return engine


@pytest.fixture(scope="session")
def still_piper():
    """The real Piper engine with all its sampling noise off, durations and audio: every run of a text gets the
    same samples, for assertions on what is heard in them. With the audio sampled (piper_engine), an aligner's
    worst word start moved between 0.10 and 0.16 s over 20 runs (tests/gpu_service/test_alignment.py, one CI
    run past its bound), and the share of vowels read open on a rendered clip between 0.77 and 0.87 over 10
    (tests/talking_head/test_sync_on_output.py, one run in a full session past its 0.75 bound)."""
    from gpu_service.speech.engines.piper import PiperEngine

    engine = PiperEngine(noise_scale=0.0, noise_w_scale=0.0)
    engine.load("cpu")
    return engine


@contextlib.asynccontextmanager
async def running_app(settings) -> AsyncIterator[httpx.AsyncClient]:
    """The GPU service app in process (lifespan run), ready, behind an httpx client."""
    from gpu_service.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gpu.test", timeout=120) as client:
            for _ in range(1200):  # bounded: 120 s
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError("app never became ready: " + (await client.get("/health")).text)
            client.app = app  # type: ignore[attr-defined]
            yield client


@contextlib.contextmanager
def serving_app(settings, timeout_s: float = 120.0) -> Iterator[str]:
    """The GPU service app behind a real uvicorn server on a free port, in a thread of this process, until ready.

    Real HTTP (chunked bodies, disconnects) while the test can still reach into the app (monkeypatch
    an engine); yields the base URL, with the app as `serving_app.app`.
    """
    import threading
    import time

    import uvicorn

    from gpu_service.app import create_app
    from tests.helpers import free_port, wait_ready

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/ready", timeout_s)
        serving_app.app = app
        yield url
    finally:
        server.should_exit = True
        deadline = time.monotonic() + 15
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)


@pytest.fixture
def gpu_settings(tmp_path: Path):
    """Settings for an in-process GPU service on the CPU, with only Piper and a private data dir.

    The device is pinned: the tests assert CPU results and must hold on a host with a GPU too.
    """
    from gpu_service.settings import Settings

    return Settings(device="cpu", tts_engines=["piper"], data_dir=tmp_path / "data",
                    preset_avatars_dir=tmp_path / "presets")
