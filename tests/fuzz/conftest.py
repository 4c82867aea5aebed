"""The real GPU service (Piper speech) and a runtime in front of it, as processes, and their OpenAPI schemas."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.helpers import free_port, service_process

FUZZ_KEY = "fuzz-key-0123456789"


@contextlib.contextmanager
def _serve(module: str, tmp: Path, **env: str) -> Iterator[str]:
    """`python -m module` on a free port with `env`, until the block ends; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": str(tmp / "data"), "LOG_LEVEL": "warning", **env}
    with service_process([sys.executable, "-m", module], env, f"{url}/ready", tmp / f"{module}.log"):
        yield url


@pytest.fixture(scope="session")
def fuzz_gpu_url(tmp_path_factory) -> Iterator[str]:
    """A GPU service with Piper only; short texts keep each accepted speech request quick."""
    with _serve("gpu_service", tmp_path_factory.mktemp("fuzz_gpu"), TTS_ENGINES="piper", DEVICE="cpu",
                MAX_TEXT_CHARS="120") as url:
        yield url


@pytest.fixture(scope="session")
def fuzz_runtime_url(fuzz_gpu_url, tmp_path_factory) -> Iterator[str]:
    """A runtime with API keys on, in front of the fuzz GPU service; a sync submit waits at most 1 s."""
    with _serve("runtime", tmp_path_factory.mktemp("fuzz_runtime"), GPU_SERVICE_URL=fuzz_gpu_url,
                RUNTIME_API_KEYS=FUZZ_KEY, REDIS_URL="", SYNC_TIMEOUT_S="1", MAX_TEXT_CHARS="120",
                WORKER_THREADS="1", JOB_MAX_RETRIES="0") as url:
        yield url


@pytest.fixture(scope="session")
def anchors(fuzz_gpu_url, fuzz_runtime_url) -> dict:
    """Real values the fuzzer cannot guess, so that generated requests get past the first check and deeper:
    a preset avatar, an audio_url (and its artifact id) from the GPU service, a job of the fuzz API key."""
    speech = httpx.post(f"{fuzz_gpu_url}/tts/generate", json={"text": "Hello there, friend."}, timeout=60)
    speech.raise_for_status()
    audio_url = speech.json()["audio_url"]
    job = httpx.post(f"{fuzz_runtime_url}/api/v1/generate", params={"async": "true"}, headers={"X-API-Key": FUZZ_KEY},
                     json={"text": "Hi."}, timeout=60)
    job.raise_for_status()
    return {"avatar_id": "astronaut", "audio_url": audio_url, "art_id": audio_url.rsplit("/", 1)[1],
            "task_id": job.json()["task_id"]}
