"""Tier 2: the runtime app in process, at its boundary: what is refused, who sees what, what it publishes.

No GPU service answers at GPU_SERVICE_URL here, so an accepted job only waits; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from tests.runtime.test_contracts import bomb_png
from tests.runtime.test_units import sql

RAW_JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("raw", [
    b'{"text": "a\\u0000b", "avatar_id": "a"}',
    b'{"text": "ab\\ud800cd", "avatar_id": "a"}',
    b'{"text": "hi", "voice": "v\\ud800", "avatar_id": "a"}',
    '{"text": "\u200b\u200b", "avatar_id": "a"}'.encode(),
    b'{"text": "...", "avatar_id": "a"}',
], ids=["nul", "lone surrogate", "lone surrogate in voice", "zero-width only", "punctuation only"])
def test_broken_or_unspeakable_text_is_a_422_naming_it_before_any_job(app_client, raw):
    with app_client() as client:
        resp = client.post("/api/v1/generate?async=true", content=raw, headers=RAW_JSON)
        assert resp.status_code == 422, resp.text
        body = resp.json()
        assert body["error_type"] == "validation_error" and body["request_id"]
        assert body["error"].startswith(("text: ", "voice: "))
        assert client.app.state.runtime.store.counts() == {}


def test_a_webhook_url_that_does_not_parse_is_a_422(app_client):
    with app_client() as client:
        resp = client.post("/api/v1/generate?async=true", json={"text": "hi", "webhook_url": "http://[::1"})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"].startswith("webhook_url: is not a valid URL")


def test_a_decompression_bomb_avatar_image_is_refused_from_its_header(app_client):
    bomb = bomb_png(30000, 30000)
    assert len(bomb) < 200_000
    with app_client(max_request_bytes=10_000_000) as client:
        resp = client.post("/api/v1/generate?async=true",
                           json={"text": "hi", "avatar_image": base64.b64encode(bomb).decode()})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error_type"] == "bad_media"
        assert "avatar_image is 30000x30000 pixels" in resp.json()["error"]
        assert client.app.state.runtime.store.counts() == {}


def test_the_quick_start_request_uses_the_default_avatar(app_client):
    quick_start = {"text": "Hello from M3 GPU!", "language": "en"}
    with app_client() as client:
        resp = client.post("/api/v1/generate?async=true", json=quick_start)
        assert resp.status_code == 202, resp.text
        row = client.app.state.runtime.store.get(resp.json()["task_id"])
        assert json.loads(row["request_json"])["avatar_id"] == "astronaut"
        both = client.post("/api/v1/generate?async=true", json={**quick_start, "avatar_id": "a", "avatar_image": "aGk="})
        assert both.status_code == 422 and "not both" in both.json()["error"]
    with app_client(default_avatar_id="") as client:
        resp = client.post("/api/v1/generate?async=true", json=quick_start)
        assert resp.status_code == 422 and "DEFAULT_AVATAR_ID" in resp.json()["error"]


def test_health_is_minimal_without_a_key_while_keys_are_set(app_client):
    with app_client() as client:
        anonymous = client.get("/health", headers={"X-API-Key": ""})
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "degraded"}
        wrong = client.get("/health", headers={"X-API-Key": "nope"})
        assert wrong.json() == {"status": "degraded"}
        detailed = client.get("/health").json()
        assert detailed["gpu_service"] == {"url": "http://127.0.0.1:9", "reachable": False}
        assert detailed["jobs"] == {} and detailed["broker"] == "stub"
    with app_client(runtime_api_keys=[]) as client:  # an open runtime has nothing to hide
        assert client.get("/health").json()["gpu_service"]["url"] == "http://127.0.0.1:9"


def test_health_stays_200_while_the_job_database_fails(app_client):
    """/health is the liveness probe: a database that fails under it is a degraded runtime, not a dead one."""
    with app_client() as client:
        sql(client.app.state.runtime.store, "DROP TABLE jobs")  # every count now fails in the database itself
        resp = client.get("/health")
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "degraded" and resp.json().get("jobs") is None


def test_gpu_services_that_share_a_host_and_port_are_refused_by_name():
    from pydantic import ValidationError

    from runtime.settings import Settings

    with pytest.raises(ValidationError, match="share one host:port"):
        Settings(gpu_service_urls="http://gw:8001/a,http://gw:8001/b")
    assert len(Settings(gpu_service_urls="http://gw:8001,http://gw:8002").gpu_urls) == 2


def test_jobs_and_idempotency_keys_belong_to_the_api_key_that_made_them(app_client):
    body = {"text": "Mine.", "avatar_id": "a"}
    with app_client() as client:
        mine = client.post("/api/v1/generate?async=true", json=body, headers={"Idempotency-Key": "order-1"}).json()
        job = f"/api/v1/jobs/{mine['task_id']}"
        assert client.get(job).status_code == 200
        for path in (job, f"{job}/video", f"{job}/timing.json"):
            other = client.get(path, headers={"X-API-Key": "k2"})
            assert other.status_code == 404 and other.json()["error_type"] == "not_found", path
        # the same idempotency key from another API key is another job, even with another body
        theirs = client.post("/api/v1/generate?async=true", json={**body, "text": "Theirs."},
                             headers={"Idempotency-Key": "order-1", "X-API-Key": "k2"})
        assert theirs.status_code == 202 and theirs.json()["task_id"] != mine["task_id"]
        again = client.post("/api/v1/generate?async=true", json=body, headers={"Idempotency-Key": "order-1"})
        assert again.json()["task_id"] == mine["task_id"]
        row = client.app.state.runtime.store.get(mine["task_id"])
        assert row["owner"] and "k1" not in row["owner"] and len(row["owner"]) == 64


def test_openapi_publishes_the_request_and_response_models(app_client):
    with app_client() as client:
        doc = client.get("/openapi.json").json()
    op = doc["paths"]["/api/v1/generate"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/GenerateRequest"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["GenerateRequest"]["properties"]) >= {"text", "avatar_id", "avatar_image", "webhook_url"}

    def ref(response: dict) -> str:
        return response["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]

    assert ref(op["responses"]["200"]) == "JobResult" and ref(op["responses"]["202"]) == "JobAccepted"
    assert ref(op["responses"]["4XX"]) == ref(op["responses"]["5XX"]) == "ErrorResponse"
    assert set(schemas["ErrorResponse"]["required"]) == {"error", "error_type", "request_id"}
    assert ref(doc["paths"]["/api/v1/jobs/{task_id}"]["get"]["responses"]["200"]) == "JobResult"
    assert ref(doc["paths"]["/health"]["get"]["responses"]["200"]) == "RuntimeHealth"
    assert "video/mp4" in doc["paths"]["/api/v1/jobs/{task_id}/video"]["get"]["responses"]["200"]["content"]
    assert {p["name"] for p in op["parameters"]} == {"async", "Idempotency-Key"}
    assert op["security"] and "ApiKey" in doc["components"]["securitySchemes"]


def test_the_request_body_is_parsed_off_the_event_loop(app_client, monkeypatch):
    # a 20 MB body takes a while to parse: on the event loop it would stall every other request
    seen = []
    original = json.loads

    def recording_loads(data, *args, **kwargs):
        if isinstance(data, (bytes, bytearray)) and b"parse-me-off-the-loop" in data:
            try:
                asyncio.get_running_loop()
                seen.append("event loop")
            except RuntimeError:
                seen.append("worker thread")
        return original(data, *args, **kwargs)

    monkeypatch.setattr(json, "loads", recording_loads)
    with app_client() as client:
        resp = client.post("/api/v1/generate?async=true", json={"text": "parse-me-off-the-loop", "avatar_id": "a"})
        assert resp.status_code == 202, resp.text
    assert seen == ["worker thread"]
