"""One job through the runtime and the real GPU service (Piper and the talking head, in this process): both
/metrics show its work, one request id runs through every GPU-service log line, and no text or media is logged.

The GPU service is served by uvicorn on a free port (real HTTP between the two), the runtime by its
TestClient; every logger of the process is captured at debug level, the most that can be logged.
"""

from __future__ import annotations

import io
import json
import time
import logging

import pytest
from fastapi.testclient import TestClient

from avatar_contracts.logs import JsonFormatter
from tests.conftest import serving_app
from tests.runtime.conftest import astronaut_b64
from tests.runtime.test_metrics import parse, value

pytestmark = pytest.mark.slow

WORDS = ("Quizzical", "vortexed", "marmalade", "glockenspiels", "Zanzibar")
TEXT = "Quizzical zebras vortexed the marmalade at dawn. Seven glockenspiels hummed over Zanzibar."


def test_a_job_is_counted_on_both_sides_traced_by_one_id_and_never_logged_in_words(gpu_settings, tmp_path):
    from runtime.app import create_app
    from runtime.settings import Settings

    gpu_settings.log_level = "debug"
    portrait = astronaut_b64()
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    with serving_app(gpu_settings) as gpu_url:
        settings = Settings(data_dir=tmp_path / "runtime", gpu_service_url=gpu_url, runtime_api_keys=[],
                            log_level="debug", chunk_chars=50, first_chunk_chars=0, fps=10, sync_timeout_s=300,
                            default_avatar_id=None)
        with TestClient(create_app(settings)) as runtime:
            root = logging.getLogger()
            root.addHandler(handler)
            try:
                refused = runtime.post("/api/v1/generate", json={"text": f"{TEXT} \u0001", "avatar_image": portrait})
                done = runtime.post("/api/v1/generate", json={"text": TEXT, "avatar_image": portrait})
            finally:
                root.removeHandler(handler)
            assert refused.status_code == 422, refused.text
            assert done.status_code == 200, done.text
            job = done.json()
            rid = done.headers["X-Request-ID"]
            _, ours = parse(runtime.get("/metrics").text)
        import httpx

        _, theirs = parse(httpx.get(f"{gpu_url}/metrics", timeout=30).text)

    chunks = job["chunks_total"]
    assert chunks == 2, job
    # the runtime: per-chunk stages, per-job stages, the calls it made
    for stage, count in (("tts", chunks), ("video", chunks), ("mux", 1), ("assemble", 1)):
        assert value(ours, "avatar_runtime_stage_duration_seconds_count", stage=stage) == count, stage
        assert value(ours, "avatar_runtime_stage_duration_seconds_sum", stage=stage) > 0, stage
    assert value(ours, "avatar_runtime_gpu_calls_total", endpoint="/tts/generate", outcome="ok") == chunks
    assert value(ours, "avatar_runtime_gpu_calls_total", endpoint="/video/generate", outcome="ok") == chunks
    assert value(ours, "avatar_runtime_gpu_calls_total", endpoint="/artifacts/{art_id}", outcome="ok") == 2 * chunks
    assert value(ours, "avatar_runtime_jobs", state="succeeded") == 1
    assert value(ours, "avatar_runtime_http_requests_total", method="POST", route="/api/v1/generate", status="422") == 1
    assert value(ours, "avatar_runtime_http_requests_total", method="POST", route="/api/v1/generate", status="200") == 1
    # the GPU service: each chunk made exactly once, its stages timed
    assert value(theirs, "avatar_gpu_chunks_generated_total", kind="tts") == chunks
    assert value(theirs, "avatar_gpu_chunks_generated_total", kind="video") == chunks
    for stage in ("tts", "render", "encode"):
        assert value(theirs, "avatar_gpu_stage_duration_seconds_count", stage=stage) >= chunks, stage
    assert value(theirs, "avatar_gpu_http_requests_total", method="POST", route="/video/generate",
                 status="200") == chunks

    # the worker logs "job succeeded" just after it records the job as done: wait (bounded) for that line
    deadline = time.monotonic() + 10
    while '"job succeeded"' not in lines.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = lines.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) > 20, "too few lines captured to judge"
    for word in WORDS:
        assert word.lower() not in text.lower(), (word, [l[:400] for l in text.splitlines() if word.lower() in l.lower()][:5])
    assert portrait[100:160] not in text, "the portrait's base64 was logged"
    # the runtime's GPU-service pool polls /health on its own, under no request of anyone's
    gpu_lines = [r for r in records if r["logger"].startswith("gpu_service") and r.get("route") not in ("/health", "/ready")]
    assert {"request done", "avatar registered", "driven"} <= {r["msg"] for r in gpu_lines}, gpu_lines
    assert {r.get("request_id") for r in gpu_lines} == {rid}, [r for r in gpu_lines if r.get("request_id") != rid]
    job_lines = [r for r in records if r.get("job_id") == job["task_id"]]
    assert {"job started", "chunk done", "job succeeded"} <= {r["msg"] for r in job_lines}
    assert {r.get("request_id") for r in job_lines} == {rid}
