"""HTTP clients of the two services the evaluator drives: the runtime (public API) and the GPU service.

Every call returns plain data or raises ``EndpointMissing`` (404/405 on a route the evaluator
needs, so the scenario is skipped with that reason) or ``ServiceError`` (any other refusal,
carrying the service's own error message).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import httpx

log = logging.getLogger(__name__)

WAV_HEADER_BYTES = 44


class ServiceError(RuntimeError):
    """A service answered with an error; the message is its status and error text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class EndpointMissing(ServiceError):
    """The route does not exist on this service (404/405 with no typed error of the service)."""


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and "error" in body:
            return f"{body.get('error_type', 'error')}: {body['error']}"
    except ValueError:
        pass
    return resp.text[:300]


def check(resp: httpx.Response, route: str) -> httpx.Response:
    """Raise EndpointMissing/ServiceError for a non-2xx answer; return it otherwise."""
    if resp.is_success:
        return resp
    text = _error_text(resp)
    # A route that exists but names a missing thing answers 404 with a typed error (not_found);
    # an absent route answers FastAPI's generic "Not Found".
    if resp.status_code == 405 or (resp.status_code == 404 and text.endswith("Not Found")):
        raise EndpointMissing(resp.status_code, f"{route} is not served here")
    raise ServiceError(resp.status_code, f"{route}: {text}")


class GpuClient:
    """The GPU service's routes the evaluator uses."""

    def __init__(self, url: str, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))

    def health(self) -> dict:
        """GET /health as a dict."""
        return check(self.http.get("/health"), "GET /health").json()

    def avatars(self) -> list[dict]:
        """GET /avatars: every known avatar (presets first)."""
        body = check(self.http.get("/avatars"), "GET /avatars").json()
        return body.get("avatars", []) if isinstance(body, dict) else body

    def upload_avatar(self, png: bytes) -> dict:
        """POST /avatars (multipart) and return the AvatarInfo; encode_time_ms and cached tell cold from warm."""
        resp = self.http.post("/avatars", files={"image": ("portrait.png", png, "image/png")})
        return check(resp, "POST /avatars").json()

    def tts(self, text: str, engine: Optional[str] = None) -> dict:
        """POST /tts/generate as JSON: audio_url, duration, generation time and phoneme timings."""
        body: dict[str, Any] = {"text": text}
        if engine:
            body["engine"] = engine
        return check(self.http.post("/tts/generate", json=body), "POST /tts/generate").json()

    def tts_stream_first_audio(self, text: str, engine: Optional[str] = None) -> dict:
        """POST /tts/stream: seconds until the first audio bytes past the WAV header, and in total."""
        body: dict[str, Any] = {"text": text}
        if engine:
            body["engine"] = engine
        t0 = time.perf_counter()
        first = None
        size = 0
        with self.http.stream("POST", "/tts/stream", json=body) as resp:
            if not resp.is_success:
                resp.read()
                check(resp, "POST /tts/stream")
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if first is None and size > WAV_HEADER_BYTES:
                    first = time.perf_counter() - t0
        return {"first_audio_s": first, "total_s": time.perf_counter() - t0, "bytes": size}

    def video(self, body: dict) -> dict:
        """POST /video/generate with response=json: the VideoResponse (video_url, frames, timings_ms)."""
        return check(self.http.post("/video/generate", json={**body, "response": "json"}), "POST /video/generate").json()

    def lipsync(self, video_mp4: bytes, audio_url: str, phonemes: Optional[list] = None) -> dict:
        """POST /lipsync/generate (multipart: video file, audio_url, phonemes JSON) -> LipSyncResponse dict."""
        import json

        data = {"audio_url": audio_url, "response": "json"}
        if phonemes:
            data["phonemes"] = json.dumps(phonemes)
        resp = self.http.post("/lipsync/generate", data=data, files={"video": ("clip.mp4", video_mp4, "video/mp4")})
        return check(resp, "POST /lipsync/generate").json()

    def download(self, url: str) -> bytes:
        """GET an artifact URL of this service."""
        return check(self.http.get(url), "GET artifact").content

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()


class RuntimeClient:
    """The runtime's public API (``/api/v1``)."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout_s: float = 900.0) -> None:
        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))

    def health(self) -> dict:
        """GET /health as a dict."""
        return check(self.http.get("/health"), "GET /health").json()

    def submit(self, body: dict) -> dict:
        """POST /api/v1/generate?async=true: the JobAccepted answer."""
        resp = self.http.post("/api/v1/generate", params={"async": "true"}, json=body)
        return check(resp, "POST /api/v1/generate").json()

    def job(self, task_id: str) -> dict:
        """GET /api/v1/jobs/{id}."""
        return check(self.http.get(f"/api/v1/jobs/{task_id}"), "GET /api/v1/jobs/{id}").json()

    def wait(self, task_id: str, timeout_s: float = 900.0, poll_s: float = 0.1) -> dict:
        """Poll a job until it has succeeded or failed (bounded by timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(task_id)
            if job["status"] in ("succeeded", "failed"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {task_id} unfinished after {timeout_s:.0f}s (status {job['status']})")
            time.sleep(poll_s)

    def download(self, url: str) -> bytes:
        """GET one of a job's outputs (video, captions, thumbnail)."""
        return check(self.http.get(url), "GET job output").content

    def json(self, url: str) -> dict:
        """GET a job's JSON output (timing.json); ValueError when the body is not a JSON object."""
        body = check(self.http.get(url), "GET job output").json()
        if not isinstance(body, dict):
            raise ValueError(f"{url} is not a JSON object")
        return body

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()
