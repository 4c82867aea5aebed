"""Real processes for the runtime's end-to-end tests: the GPU service and runtimes on free ports."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import httpx
import pytest

from tests.helpers import REPO, free_port, stop_process, wait_ready

API_KEY = "test-key-0123456789"
WEBHOOK_SECRET = "webhook-secret-0123456789abcdef"


class Proc:
    """A service process that a test may kill (any signal) and start again on the same port and data."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], url: str, log: Path, ready_timeout_s: float = 120):
        self.name, self.argv, self.env, self.url, self.log = name, argv, env, url, log
        self.ready_timeout_s = ready_timeout_s
        self.proc: Optional[subprocess.Popen] = None

    def start(self, wait: bool = True, **env_overrides: str) -> "Proc":
        """Start it (with optional env changes) and, by default, poll /ready until it answers 200."""
        self.env.update(env_overrides)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if wait:
            try:
                wait_ready(f"{self.url}/ready", self.ready_timeout_s, self.proc)
            except BaseException:
                sys.stderr.write(self.log.read_text(errors="replace")[-4000:])
                raise
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group and reap it."""
        if self.proc is not None:
            stop_process(self.proc, sig)

    def stop(self) -> None:
        """Graceful stop."""
        if self.proc is not None:
            stop_process(self.proc)


def gpu_argv() -> list[str]:
    """How the GPU service is launched: `python -m gpu_service` (RUNTIME_TEST_GPU_ARGV, a JSON list, overrides)."""
    override = os.environ.get("RUNTIME_TEST_GPU_ARGV")
    return json.loads(override) if override else [sys.executable, "-m", "gpu_service"]


@pytest.fixture(scope="session")
def gpu(tmp_path_factory) -> Proc:
    """One real GPU service (Piper speech) for the session; the GPU-restart test kills and restarts it."""
    tmp = tmp_path_factory.mktemp("gpu")
    port = free_port()
    env = {"HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": str(tmp / "data"), "TTS_ENGINES": "piper", "DEVICE": "cpu"}
    proc = Proc("gpu", gpu_argv(), env, f"http://127.0.0.1:{port}", tmp / "gpu.log", ready_timeout_s=180).start()
    probe = httpx.post(f"{proc.url}/video/generate", json={}, timeout=30)
    if probe.status_code != 422:  # a missing route is a routing regression, not a reason to skip
        proc.stop()
        pytest.fail(f"POST /video/generate answered {probe.status_code}: {probe.text[:300]}")
    yield proc
    proc.stop()


def runtime_proc(tmp: Path, gpu_url: str, **env: str) -> Proc:
    """A runtime process description (not started) with its own data dir and port."""
    port = free_port()
    base = {
        "HOST": "127.0.0.1", "PORT": str(port), "GPU_SERVICE_URL": gpu_url, "DATA_DIR": str(tmp / "runtime"),
        "RUNTIME_API_KEYS": API_KEY, "WEBHOOK_SECRET": WEBHOOK_SECRET, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "RETRY_MIN_BACKOFF_S": "0.3", "RETRY_MAX_BACKOFF_S": "2", "JOB_LEASE_S": "3", "REDIS_URL": "",
    }
    return Proc("runtime", [sys.executable, "-m", "runtime"], {**base, **env}, f"http://127.0.0.1:{port}", tmp / "runtime.log")


@pytest.fixture(scope="session")
def runtime(gpu, tmp_path_factory) -> Proc:
    """One real runtime (in-process broker, API keys on) for the session."""
    proc = runtime_proc(tmp_path_factory.mktemp("rt"), gpu.url, CHUNK_CHARS="120").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def avatar(gpu) -> dict:
    """The avatar fields of a request: a preset when the GPU service has one, else the astronaut portrait."""
    listing = httpx.get(f"{gpu.url}/avatars", timeout=30)
    if listing.status_code == 200:
        body = listing.json()
        items = body.get("avatars", []) if isinstance(body, dict) else body
        if items:
            return {"avatar_id": items[0]["avatar_id"]}
    return {"avatar_image": astronaut_b64()}


def astronaut_b64() -> str:
    """skimage's astronaut portrait as base64 PNG."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PG_URL = os.environ.get("RUNTIME_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
"""The PostgreSQL the tests use (trust auth); each test gets a schema of its own in it."""


def postgres_unreachable() -> Optional[str]:
    """Why PG_URL cannot be used, or None when it answers."""
    import psycopg

    try:
        with psycopg.connect(PG_URL, connect_timeout=2):
            return None
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL is not reachable at {PG_URL}: {str(exc).strip().splitlines()[0]}"


@contextlib.contextmanager
def pg_schema():
    """A DATABASE_URL on a fresh schema t_<random> of PG_URL (search_path set by the URL); dropped afterwards."""
    import psycopg

    why = postgres_unreachable()
    if why:
        pytest.skip(why)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The job database of one test: a SQLite file, or a schema of its own on the local PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        with pg_schema() as url:
            yield url


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server in a thread on 127.0.0.1 and a free port: the S3-compatible stand-in of these tests."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""Credentials for moto (it takes any), passed the way a deployment passes real ones: the AWS variables."""


@pytest.fixture
def s3(s3_endpoint, monkeypatch) -> dict:
    """A fresh bucket on the moto server; the settings (as Settings fields) that point the runtime at it."""
    import boto3

    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"output_store": "s3", "s3_bucket": bucket, "s3_endpoint_url": s3_endpoint, "s3_region": "us-east-1",
            "s3_prefix": "avatar/"}


@pytest.fixture
def app_client(tmp_path, db_url):
    """A factory: the runtime app in process (lifespan run) with test settings plus overrides, keys k1 and k2,
    on each job database (SQLite, PostgreSQL).

    No GPU service runs at GPU_SERVICE_URL unless a test passes one, so jobs wait (retrying) for it.
    """
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.settings import Settings

    @contextlib.contextmanager
    def make(**overrides):
        base = dict(data_dir=tmp_path, gpu_service_url="http://127.0.0.1:9", runtime_api_keys=["k1", "k2"],
                    max_text_chars=500, max_request_bytes=200_000, webhook_secret="w" * 32,
                    database_url=None if db_url.startswith("sqlite") else db_url)
        with TestClient(create_app(Settings(**{**base, **overrides}))) as c:
            if overrides.get("runtime_api_keys", base["runtime_api_keys"]):
                c.headers["X-API-Key"] = "k1"
            yield c

    return make


def client(url: str) -> httpx.Client:
    """An HTTP client with the test API key."""
    return httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=300)


def wait_job(http: httpx.Client, task_id: str, timeout_s: float = 150, seen: Optional[list] = None) -> dict:
    """Poll a job until it is finished (bounded); every status seen is appended to `seen`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/api/v1/jobs/{task_id}").json()
        if seen is not None:
            seen.append(job)
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {task_id} unfinished after {timeout_s}s: {job}")


def stream_lengths(path: Path) -> dict:
    """Codecs and decoded durations of the video and audio streams, from ffmpeg's own output."""
    from runtime.media import probe, stream_duration

    info = probe(path)
    return {
        "video_codec": info.video_codec, "audio_codec": info.audio_codec,
        "video_s": stream_duration(path, "v"), "audio_s": stream_duration(path, "a"),
    }


def moov_before_mdat(path: Path) -> bool:
    """Whether the MP4's index comes before its media (faststart)."""
    data = path.read_bytes()
    return 0 <= data.find(b"moov") < data.find(b"mdat")


def vtt_cues(text: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each WebVTT cue."""
    def secs(stamp: str) -> float:
        h, m, s = stamp.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    return [(secs(a), secs(b), t) for a, b, t in re.findall(r"([\d:.]+) --> ([\d:.]+)\n(.+)", text)]
