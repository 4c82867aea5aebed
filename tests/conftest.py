"""Fixtures shared by every test tier. Engines are real; nothing here mocks a model."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator

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


@pytest.fixture
def gpu_settings(tmp_path: Path):
    """Settings for an in-process GPU service on the CPU, with only Piper and a private data dir.

    The device is pinned: the tests assert CPU results and must hold on a host with a GPU too.
    """
    from gpu_service.settings import Settings

    return Settings(device="cpu", tts_engines=["piper"], data_dir=tmp_path / "data",
                    preset_avatars_dir=tmp_path / "presets")
