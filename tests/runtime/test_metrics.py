"""The runtime's /metrics and request ids: the app in process with its real worker, against a scripted GPU server.

The server is tests/runtime/test_gpu_client.py's: it answers fixed statuses and records the
X-Request-ID of every call, so the test sees what the GPU service would log.
"""

from __future__ import annotations

import time
import uuid

import pytest
from pydantic import ValidationError

from tests.helpers import parse_metrics as parse
from tests.runtime.test_gpu_client import FAST_RETRIES, scripted_gpu

FAMILIES = {
    "avatar_runtime_http_requests": "counter", "avatar_runtime_http_request_duration_seconds": "histogram",
    "avatar_runtime_stage_duration_seconds": "histogram", "avatar_runtime_jobs": "gauge",
    "avatar_runtime_queue_depth": "gauge", "avatar_runtime_job_retries": "counter",
    "avatar_runtime_gpu_calls": "counter", "process_cpu_seconds": "counter", "python_info": "gauge",
}


def value(values: dict, name: str, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client) -> tuple[dict, dict]:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(resp.text)


def test_families_exist_and_a_retried_job_moves_the_counters(app_client):
    with scripted_gpu(503, "scripted", "overloaded") as (url, calls), app_client(gpu_service_url=url, **FAST_RETRIES) as client:
        types, before = scrape(client)
        for name, kind in FAMILIES.items():
            assert types.get(name) == kind, (name, types.get(name))

        resp = client.post("/api/v1/generate", json={"text": "Hello there.", "avatar_id": "astronaut"},
                           headers={"X-Request-ID": "client-trace-42"})
        assert resp.status_code == 502, resp.text
        task_id = resp.json()["task_id"]
        assert client.get(f"/api/v1/jobs/{task_id}").status_code == 200
        assert client.get("/api/v1/jobs/" + "0" * 32, headers={"X-API-Key": "wrong"}).status_code == 401
        _, after = scrape(client)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # three attempts: two retries of a 5xx, then given up
    assert moved("avatar_runtime_job_retries_total", reason="server_error") == 2
    assert moved("avatar_runtime_gpu_calls_total", endpoint="/tts/generate", outcome="server_error") == 3
    assert moved("avatar_runtime_gpu_calls_total", endpoint="/avatars", outcome="ok") == 1
    assert value(after, "avatar_runtime_jobs", state="failed") == 1
    assert value(after, "avatar_runtime_jobs", state="queued") == 0 and value(after, "avatar_runtime_queue_depth") == 0
    requests = "avatar_runtime_http_requests_total"
    assert moved(requests, method="POST", route="/api/v1/generate", status="502") == 1
    assert moved(requests, method="GET", route="/api/v1/jobs/{task_id}", status="200") == 1
    # refused by the API-key gate before routing, still counted under its template
    assert moved(requests, method="GET", route="/api/v1/jobs/{task_id}", status="401") == 1
    assert not any(task_id in dict(labels).get("route", "") for _, labels in after)
    assert moved("avatar_runtime_http_request_duration_seconds_count", method="POST", route="/api/v1/generate") == 1

    # the id of the request that made the job, on every GPU-service call of every attempt
    assert [rid for path, rid in calls if path == "/tts/generate"] == ["client-trace-42"] * 3
    # (the GPU-service pool's own /health and /ready probes belong to no request)
    assert {rid for path, rid in calls if path not in ("/health", "/ready")} == {"client-trace-42"}


def test_queued_jobs_and_queue_depth_are_read_from_the_record(app_client):
    with app_client(run_worker=False) as client:
        for text in ("One.", "Two."):
            resp = client.post("/api/v1/generate", params={"async": "true"},
                               json={"text": text, "avatar_id": "astronaut"})
            assert resp.status_code == 202, resp.text
        _, values = scrape(client)
        assert value(values, "avatar_runtime_jobs", state="queued") == 2
        assert value(values, "avatar_runtime_queue_depth") == 2
        assert value(values, "avatar_runtime_jobs", state="running") == 0
        # every stage is listed from the start
        assert value(values, "avatar_runtime_stage_duration_seconds_count", stage="assemble") == 0
        assert ("avatar_runtime_stage_duration_seconds_count", (("stage", "mux"),)) in values
        row = client.app.state.runtime.store.get(resp.json()["task_id"])
        assert row["request_id"] == resp.headers["X-Request-ID"]


def test_metrics_are_open_by_default_behind_the_key_when_asked_and_not_in_the_schema(app_client):
    with app_client() as client:
        assert client.get("/metrics", headers={"X-API-Key": ""}).status_code == 200
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    with app_client(metrics_require_key=True) as client:
        refused = client.get("/metrics", headers={"X-API-Key": "wrong"})
        assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
        assert client.get("/metrics").status_code == 200  # with the client's key k1
        _, values = scrape(client)
        assert value(values, "avatar_runtime_http_requests_total", method="GET", route="/metrics", status="401") == 1


def test_metrics_require_key_without_keys_is_refused_at_start():
    from runtime.settings import Settings

    with pytest.raises(ValidationError, match="METRICS_REQUIRE_KEY=true needs RUNTIME_API_KEYS"):
        Settings(metrics_require_key=True, runtime_api_keys=[])


def test_a_job_taken_over_from_a_dead_worker_counts_a_lease_retry_and_keeps_its_request_id(tmp_path):
    from runtime.jobs import Runtime
    from runtime.settings import Settings

    with scripted_gpu(424, "scripted") as (url, calls):
        rt = Runtime(Settings(data_dir=tmp_path, run_worker=False, gpu_service_url=url))
        try:
            job_id = uuid.uuid4().hex
            rt.store.create(job_id, {"text": "Hello there.", "avatar_id": "astronaut"}, None, request_id="made-by-r1")
            assert rt.store.claim(job_id, "a-worker-that-died", lease_s=0.01) is not None
            time.sleep(0.05)  # its lease lapses
            rt._run_job(job_id)
            row = rt.store.get(job_id)
            _, values = parse(_text(rt))
        finally:
            rt.stop()
    assert row["status"] == "failed" and row["error_type"] == "generation_failed"
    assert value(values, "avatar_runtime_job_retries_total", reason="lease_expired") == 1
    assert calls == [("/tts/generate", "made-by-r1")]


def _text(rt) -> str:
    from prometheus_client import generate_latest

    return generate_latest(rt.metrics.registry).decode()


def test_a_job_database_without_request_ids_gains_the_column(tmp_path):
    import sqlite3

    from runtime import db
    from tests.runtime.test_jobstore import UNVERSIONED  # the schema from before request ids were kept

    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(UNVERSIONED)
    store = db.JobStore(path)
    assert store.get("a" * 32)["request_id"] is None and store.get("a" * 32)["status"] == "succeeded"
    store.create("b" * 32, {"text": "x"}, None, request_id="rid-b")
    assert store.get("b" * 32)["request_id"] == "rid-b"
    db.JobStore(path)  # opening it again changes nothing
