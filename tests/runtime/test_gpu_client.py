"""Tier 2: how the runtime treats each kind of GPU-service failure, against a real (scripted) HTTP server.

The server answers fixed statuses, as the GPU service does for failures that no engine is needed
to produce; the runtime runs in process with its real worker, store and client.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections import Counter
from typing import Iterator

import pytest

MODEL_MESSAGE = "piper failed on this text (model /srv/avatar/models/piper/en_US-joe-medium.onnx)"


@contextlib.contextmanager
def scripted_gpu(tts_status: int, message: str = "no", error_type: str = "generation_failed") -> Iterator[tuple[str, list]]:
    """A server on 127.0.0.1 answering every POST with `tts_status` (GETs: healthy, the astronaut listed); yields
    its URL and the (path, X-Request-ID) of each call."""
    calls: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, status: int, body: object) -> None:
            calls.append((self.path, self.headers.get("X-Request-ID", "")))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - the http.server API
            self._answer(200, [{"avatar_id": "astronaut"}] if self.path == "/avatars" else {"status": "healthy"})

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer(tts_status, {"error": message, "error_type": error_type, "request_id": "r"})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", calls
    finally:
        server.shutdown()


def per_path(calls: list[tuple[str, str]]) -> Counter:
    """How many calls the scripted server had on each path."""
    return Counter(path for path, _ in calls)


FAST_RETRIES = dict(job_max_retries=2, retry_min_backoff_s=0.05, retry_max_backoff_s=0.1, sync_timeout_s=60)


def test_a_424_fails_the_job_at_once_with_the_gpu_services_message(app_client):
    with scripted_gpu(424, MODEL_MESSAGE) as (url, calls), app_client(gpu_service_url=url, **FAST_RETRIES) as client:
        resp = client.post("/api/v1/generate", json={"text": "Hello there.", "avatar_id": "astronaut"})
        assert resp.status_code == 424, resp.text
        body = resp.json()
        assert body["status"] == "failed" and body["attempts"] == 1 and body["error_type"] == "generation_failed"
        assert "piper failed on this text" in body["error"] and body["reason"] == body["error"]
        assert per_path(calls)["/tts/generate"] == 1 and per_path(calls)["/video/generate"] == 0
        # the GPU service's message named its model file: the client sees the file's name, not the disk
        assert "/srv/avatar" not in resp.text and "…/en_US-joe-medium.onnx" in body["reason"]


@pytest.mark.parametrize("status", [503, 429])
def test_503_and_429_are_retried_then_given_up(app_client, status):
    with scripted_gpu(status, "busy", "overloaded") as (url, calls), app_client(gpu_service_url=url, **FAST_RETRIES) as client:
        resp = client.post("/api/v1/generate", json={"text": "Hello there.", "avatar_id": "astronaut"})
        assert resp.status_code == 502, resp.text
        body = resp.json()
        assert body["attempts"] == 3 and body["error_type"] == "gpu_service_unavailable"
        assert body["reason"].startswith("gave up after 3 attempts") and "busy" in body["reason"]
        assert per_path(calls)["/tts/generate"] == 3
