"""The runtime's HTTP client of the GPU service, speaking the shared contracts.

Every failure is classified once, here: connection errors, timeouts, 5xx, 408 and 429 are
transient (the job waits and retries); any other 4xx is final and the job fails at once with
the GPU service's own message: the inputs are wrong (422), or the engine failed on them in a
way that will recur (424 generation_failed).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional
from urllib.parse import urlsplit

import httpx

from avatar_contracts.gpu import TTSRequest, TTSResponse, VideoRequest, VideoResponse
from avatar_contracts.logs import current_request_id
from runtime.errors import GPUServiceError
from runtime.metrics import RuntimeMetrics, call_outcome
from runtime.settings import Settings

log = logging.getLogger("runtime.gpu")


def _retry_after(response: httpx.Response) -> Optional[float]:
    """Seconds from a Retry-After header (delta form only; dates are rare from our own service)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _message(response: httpx.Response) -> tuple[str, str]:
    """The GPU service's error text and type, from its {error, error_type} body when it has one."""
    try:
        body = response.json()
        return str(body.get("error") or response.text[:300]), str(body.get("error_type") or "gpu_service_error")
    except ValueError:
        return response.text[:300] or response.reason_phrase, "gpu_service_error"


def _send_request_id(request: httpx.Request) -> None:
    """Carry the id of the request (or job) being served to the GPU service, which logs it on every line."""
    rid = current_request_id()
    if rid:
        request.headers["X-Request-ID"] = rid


class GPUClient:
    """Thread-safe, connection-pooling client; one per process."""

    def __init__(self, settings: Settings, metrics: Optional[RuntimeMetrics] = None) -> None:
        self.base = settings.gpu_service_url.rstrip("/")
        self.metrics = metrics if metrics is not None else RuntimeMetrics()
        timeout = httpx.Timeout(settings.gpu_timeout_s, connect=settings.gpu_connect_timeout_s)
        self._http = httpx.Client(base_url=self.base, timeout=timeout, event_hooks={"request": [_send_request_id]})
        self._avatar_cache_s = settings.avatar_cache_s
        self._avatars: tuple[float, Optional[set[str]]] = (0.0, None)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release pooled connections."""
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------

    def _local(self, url: str) -> str:
        """A URL the GPU service returned, re-rooted on GPU_SERVICE_URL (its own idea of its host may differ)."""
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        """One request; raises GPUServiceError (transient or not) for anything but 2xx."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            self.metrics.gpu_call(path, "timeout")
            raise GPUServiceError(f"{what}: GPU service timed out ({type(exc).__name__})", transient=True) from exc
        except httpx.TransportError as exc:
            self.metrics.gpu_call(path, "unreachable")
            raise GPUServiceError(
                f"{what}: GPU service at {self.base} is unreachable ({type(exc).__name__})", transient=True
            ) from exc
        self.metrics.gpu_call(path, call_outcome(response.status_code))
        if response.is_success:
            return response
        text, etype = _message(response)
        status = response.status_code
        transient = status >= 500 or status in (408, 429)  # 424: the same input fails the same way again
        raise GPUServiceError(
            f"{what}: GPU service answered {status} {etype}: {text}",
            transient=transient,
            status=status,
            error_type=etype,
            retry_after_s=_retry_after(response),
        )

    # -- probes ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, Optional[dict]]:
        """(answers, /health body) of the GPU service; never raises."""
        try:
            response = self._http.get("/health", timeout=3.0)
            return True, response.json()
        except (httpx.HTTPError, ValueError):
            return False, None

    def ready(self) -> bool:
        """Whether the GPU service's /ready is 200; never raises."""
        try:
            return self._http.get("/ready", timeout=3.0).status_code == 200
        except httpx.HTTPError:
            return False

    def avatar_ids(self) -> Optional[set[str]]:
        """Known avatar ids (cached briefly); None when the GPU service cannot tell right now."""
        with self._lock:
            at, ids = self._avatars
            if ids is not None and time.monotonic() - at < self._avatar_cache_s:
                return ids
        try:
            body = self._call("GET", "/avatars", "list avatars", timeout=5.0).json()
        except (GPUServiceError, ValueError) as exc:
            log.warning("avatar list unavailable", extra={"why": str(exc)})
            return None
        items = body.get("avatars", body.get("items", [])) if isinstance(body, dict) else body
        ids = {item["avatar_id"] if isinstance(item, dict) else str(item) for item in items or []}
        with self._lock:
            self._avatars = (time.monotonic(), ids)
        return ids

    # -- generation -----------------------------------------------------------------------

    def tts(self, request: TTSRequest) -> TTSResponse:
        """Synthesize one chunk; the phonemes come back in the JSON."""
        response = self._call("POST", "/tts/generate", "speech", json=request.model_dump(exclude_none=True))
        return TTSResponse.model_validate(response.json())

    def video(self, request: VideoRequest) -> tuple[Optional[VideoResponse], bytes]:
        """Render one chunk; returns the JSON answer (when given) and the MP4 bytes."""
        payload = request.model_dump(exclude_none=True)
        payload["response"] = "json"
        response = self._call(
            "POST", "/video/generate", "video", json=payload, headers={"Accept": "application/json"}
        )
        if response.headers.get("content-type", "").startswith("video/"):
            return None, response.content
        meta = VideoResponse.model_validate(response.json())
        return meta, self.fetch(meta.video_url, "video download")

    def fetch(self, url: str, what: str) -> bytes:
        """Download an artifact the GPU service just made; a 404 (expired, service restarted) is transient."""
        try:
            return self._call("GET", self._local(url), what).content
        except GPUServiceError as exc:
            if exc.status == 404:
                exc.transient = True
            raise
