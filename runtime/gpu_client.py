"""The runtime's HTTP clients of its GPU services, speaking the shared contracts, and where each chunk goes.

Every failure is classified once, here: connection errors, timeouts, 5xx, 408 and 429 are
transient (the job waits and retries); any other 4xx is final and the job fails at once with
the GPU service's own message: the inputs are wrong (422), or the engine failed on them in a
way that will recur (424 generation_failed).

With several services (GPU_SERVICE_URLS), `GPUClient` polls each one's /health in a background
thread and places every chunk (its speech, then its video, both on one service: the video reads
the speech's audio_url there) with `place`:

1. Candidates are the ready services: the last /health said healthy and no call failed since.
   When none is, every service is tried anyway, so one URL behaves exactly as it always has.
2. They are ranked by rendezvous hashing of the avatar (its id, or a hash of the uploaded image):
   every runtime ranks them alike, and a portrait keeps going where its encoding is cached.
3. Bounded load: the first in that order is skipped while it runs more jobs than
   GPU_BALANCE_FACTOR times the average, or has no free slot while another has; the next one in
   the order is asked the same. A job's own chunks never count against it (they run one after
   another), so one job stays on its service unless others crowd it.

Free slots are the service's own figures (the lesser of its speech and video engines' free slots,
less what waits), corrected for the chunks this runtime started or finished there since.

A call that finds its service down (unreachable, timed out, 5xx) marks it down until its /health
answers again, and `failover` places the chunk on another ready service at once; a 429 moves the
chunk too, without marking the service down. A 4xx is never sent elsewhere: it would recur.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional
from urllib.parse import urlsplit

import httpx

from avatar_contracts.gpu import TTSRequest, TTSResponse, VideoRequest, VideoResponse
from avatar_contracts.logs import current_request_id
from runtime.errors import GPUServiceError
from runtime.metrics import RuntimeMetrics, call_outcome
from runtime.settings import Settings

log = logging.getLogger("runtime.gpu")

State = Literal["unknown", "ready", "not_ready", "down"]


def _retry_after(response: httpx.Response) -> Optional[float]:
    """Seconds from a Retry-After header (delta form only; dates are rare from our own service)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def transport_failure(exc: httpx.TransportError, label: str, what: str) -> tuple[str, GPUServiceError]:
    """(the metric's outcome, the transient GPUServiceError) of a call that got no answer: timed out or unreachable."""
    if isinstance(exc, httpx.TimeoutException):
        return "timeout", GPUServiceError(f"{what}: GPU service {label} timed out ({type(exc).__name__})",
                                          transient=True, down=True)
    return "unreachable", GPUServiceError(f"{what}: GPU service {label} is unreachable ({type(exc).__name__})",
                                          transient=True, down=True)


def answer_failure(response: httpx.Response, label: str, what: str) -> GPUServiceError:
    """A non-2xx answer as a GPUServiceError: transient for 5xx, 408 and 429 (a 424 fails the same way again),
    the service down for 5xx; `.text` holds the service's own words."""
    text, etype = _message(response)
    status = response.status_code
    error = GPUServiceError(f"{what}: GPU service {label} answered {status} {etype}: {text}",
                            transient=status >= 500 or status in (408, 429), status=status, error_type=etype,
                            retry_after_s=_retry_after(response), down=status >= 500)
    error.text = text  # type: ignore[attr-defined]
    return error


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


def service_label(url: str) -> str:
    """host:port of a service URL: how it is named in logs, errors and /health (no credentials, no path)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rendezvous_score(key: str, url: str) -> int:
    """Rank of one service for one affinity key (highest first); the same on every runtime and every run."""
    return int.from_bytes(hashlib.blake2b(f"{key}\n{url}".encode(), digest_size=8).digest(), "big")


def affinity_key(avatar_id: Optional[str], avatar_image: Optional[str]) -> str:
    """What places a job's chunks: its avatar id, or a hash of its uploaded portrait."""
    if avatar_id:
        return f"id:{avatar_id}"
    return "image:" + hashlib.sha256((avatar_image or "").encode("ascii", "replace")).hexdigest()[:32]


def slot_headroom(body: dict) -> tuple[Optional[int], Optional[int]]:
    """(free slots less waiting requests, total slots) for a chunk, from a GPU service's /health body.

    A chunk needs speech and then video, so the lesser of the two capabilities counts; a service
    too old to report per-capability figures is judged by its overall available_slots.
    """
    caps = body.get("slots_by_capability") or {}
    figures = [caps[c] for c in ("tts", "video") if isinstance(caps.get(c), dict)]
    try:
        if figures:
            return (min(int(f["free"]) - int(f["queued"]) for f in figures), min(int(f["total"]) for f in figures))
        if "available_slots" in body:
            free = int(body["available_slots"])
            return free, free + int(body.get("active_workers", 0))
    except (KeyError, TypeError, ValueError):
        pass
    return None, None


class ServiceClient:
    """Thread-safe, connection-pooling client of one GPU service."""

    def __init__(self, url: str, settings: Settings, metrics: Optional[RuntimeMetrics] = None) -> None:
        self.base = url.rstrip("/")
        self.label = service_label(self.base)
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
        """A URL the GPU service returned, re-rooted on this client's base (its own idea of its host may differ)."""
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        """One request; raises GPUServiceError (transient or not) for anything but 2xx."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            outcome, error = transport_failure(exc, self.label, what)
            self.metrics.gpu_call(path, outcome)
            raise error from exc
        self.metrics.gpu_call(path, call_outcome(response.status_code))
        if response.is_success:
            return response
        raise answer_failure(response, self.label, what)

    # -- probes ---------------------------------------------------------------------------

    def health(self, timeout_s: float = 3.0) -> tuple[bool, Optional[dict]]:
        """(answers, /health body) of the GPU service; never raises. A 5xx from a proxy is no answer."""
        try:
            response = self._http.get("/health", timeout=timeout_s)
            body = response.json()
        except (httpx.HTTPError, ValueError):
            return False, None
        return response.status_code == 200 and isinstance(body, dict), body if isinstance(body, dict) else None

    def ready(self, timeout_s: float = 3.0) -> bool:
        """Whether the GPU service's /ready is 200; never raises."""
        try:
            return self._http.get("/ready", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def known_avatars(self) -> Optional[set[str]]:
        """The avatar ids this service last listed (however old); None when it never said."""
        return self._avatars[1]

    def avatar_ids(self) -> Optional[set[str]]:
        """Known avatar ids (cached briefly); None when the GPU service cannot tell right now."""
        with self._lock:
            at, ids = self._avatars
            if ids is not None and time.monotonic() - at < self._avatar_cache_s:
                return ids
        try:
            body = self._call("GET", "/avatars", "list avatars", timeout=5.0).json()
        except (GPUServiceError, ValueError) as exc:
            log.warning("avatar list unavailable", extra={"why": str(exc), "gpu_service": self.label})
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
        """Render one chunk; returns the JSON answer (when given) and the MP4 bytes, fetched from this service."""
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
        """Download an artifact this service just made; a 404 (expired, service restarted) is transient."""
        try:
            return self._call("GET", self._local(url), what).content
        except GPUServiceError as exc:
            if exc.status == 404:
                exc.transient = True
            raise


@dataclass
class ServiceState:
    """What this runtime knows of one GPU service: its state, its last slot figures, our chunks on it."""

    client: ServiceClient
    state: State = "unknown"
    reason: Optional[str] = None
    headroom: Optional[int] = None
    """Free slots less waiting requests at the last poll (None: not reported)."""
    total: Optional[int] = None
    ours_at_poll: int = 0
    """Our chunks in flight there when that poll was sent: its figures already count them."""
    down_at: float = 0.0
    inflight: collections.Counter = field(default_factory=collections.Counter)
    """Chunks in flight there, by job."""
    placed: int = 0
    moved_away: int = 0

    @property
    def label(self) -> str:
        return self.client.label

    def jobs_besides(self, job: str) -> int:
        """Jobs other than `job` with chunks in flight there: the load bounded load compares."""
        return sum(1 for j, n in self.inflight.items() if n > 0 and j != job)

    def free_for(self, job: str) -> Optional[int]:
        """Slots a chunk of `job` would find free now: the polled figure, corrected for our chunks started or
        finished since, with the job's own chunks not counted against it. None when the service gives no figures."""
        if self.headroom is None:
            return None
        estimate = self.headroom + self.ours_at_poll - sum(self.inflight.values()) + self.inflight[job]
        return min(estimate, self.total) if self.total is not None else estimate


class Placement:
    """One chunk's service, counted in flight there until `release` (idempotent)."""

    def __init__(self, pool: "GPUClient", state: ServiceState, job: str) -> None:
        self._pool, self._state, self.job = pool, state, job
        self.service = state.client
        self._held = True

    def release(self) -> None:
        """The chunk is done there (finished, failed or abandoned)."""
        with self._pool._lock:
            if self._held:
                self._held = False
                self._state.inflight[self.job] -= 1
                if self._state.inflight[self.job] <= 0:
                    del self._state.inflight[self.job]


def choose(states: list[ServiceState], key: str, job: str, factor: float,
           avatar_id: Optional[str] = None) -> tuple[ServiceState, str]:
    """The service for one chunk of `job` among `states` (all assumed ready), and why, as the module says."""
    candidates = states
    if avatar_id is not None:  # an avatar uploaded to one service directly exists only there
        having = [s for s in states if s.client.known_avatars is None or avatar_id in s.client.known_avatars]
        candidates = having or states
    order = sorted(candidates, key=lambda s: rendezvous_score(key, s.client.base), reverse=True)
    loads = {s.label: s.jobs_besides(job) for s in order}
    bound = factor * sum(loads.values()) / len(order)
    free = {s.label: s.free_for(job) for s in order}

    def has_free(s: ServiceState) -> bool:
        return free[s.label] is None or free[s.label] > 0

    for rank, s in enumerate(order):
        if loads[s.label] > bound:
            continue
        if not has_free(s) and any(has_free(o) for o in order if o is not s):
            continue
        return s, "affinity" if rank == 0 else "spilled"
    # nobody within the bound has a free slot: the one with the most, then the least loaded
    best = max(order, key=lambda s: (has_free(s), free[s.label] or 0, -loads[s.label]))
    return best, "most free"


class GPUClient:
    """The GPU services of this runtime: a client and a state for each, the /health poller, and placement."""

    def __init__(self, settings: Settings, metrics: Optional[RuntimeMetrics] = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else RuntimeMetrics()
        self.services = [ServiceClient(url, settings, self.metrics) for url in settings.gpu_urls]
        self._states = {s.label: ServiceState(s) for s in self.services}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._probes = ThreadPoolExecutor(max_workers=len(self.services), thread_name_prefix="gpu-probe")

    @property
    def primary(self) -> ServiceClient:
        """The first (with one URL: the only) service."""
        return self.services[0]

    def start(self) -> None:
        """Poll every service's /health in the background (idempotent)."""
        if self._threads:
            return
        for service in self.services:
            thread = threading.Thread(target=self._poll_forever, args=(service,), daemon=True,
                                      name=f"gpu-health-{service.label}")
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop polling and release pooled connections."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.gpu_health_timeout_s + 1)
        self._probes.shutdown(wait=False, cancel_futures=True)
        for service in self.services:
            service.close()

    # -- state ----------------------------------------------------------------------------

    def _poll_forever(self, service: ServiceClient) -> None:
        while not self._stop.is_set():
            try:
                self.poll(service)
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad answer
                log.exception("GPU health poll failed", extra={"gpu_service": service.label})
            self._stop.wait(self.settings.gpu_health_interval_s)

    def poll(self, service: ServiceClient) -> tuple[bool, Optional[dict]]:
        """Ask one service's /health now and record its state and slot figures; returns (answers, body)."""
        st = self._states[service.label]
        sent = time.monotonic()
        with self._lock:
            ours = sum(st.inflight.values())
        answers, body = service.health(self.settings.gpu_health_timeout_s)
        with self._lock:
            if st.down_at > sent:  # a call failed while this poll was out: its answer is older than that
                return answers, body
            before = st.state
            if not answers or body is None:
                st.state, st.reason = "down", "no answer to /health"
                st.headroom = st.total = None
            else:
                status = body.get("status")
                st.state = "ready" if status == "healthy" else "not_ready"
                st.reason = None if st.state == "ready" else f"/health status {status!r}"
                st.headroom, st.total = slot_headroom(body)
                st.ours_at_poll = ours
        if st.state != before and (before, st.state) != ("unknown", "ready"):  # start-up going well is no news
            log.info("GPU service state", extra={"gpu_service": service.label, "state": st.state, "was": before,
                                                 "why": st.reason})
        return answers, body

    def poll_all(self) -> list[tuple[bool, Optional[dict]]]:
        """Poll every service now, in parallel."""
        return list(self._map(self.poll, self.services))

    def _map(self, fn, items: Iterable) -> Iterable:
        items = list(items)
        if len(items) == 1:
            return [fn(items[0])]
        return self._probes.map(fn, items)

    def mark_down(self, service: ServiceClient, why: str) -> None:
        """A call found the service failing: no chunk goes there until its /health answers again."""
        st = self._states[service.label]
        with self._lock:
            st.state, st.reason, st.down_at = "down", why, time.monotonic()
        log.warning("GPU service marked down", extra={"gpu_service": service.label, "why": why})

    def state(self, service: ServiceClient) -> State:
        """What is known of a service now."""
        return self._states[service.label].state

    # -- placement ------------------------------------------------------------------------

    def place(self, key: str, job: str, avatar_id: Optional[str] = None,
              exclude: Iterable[ServiceClient] = ()) -> Optional[Placement]:
        """A service for one chunk of `job`, counted in flight there until the placement is released.

        With nothing excluded there is always an answer (with no service ready, the best of the others: the call
        will say what is wrong). A failover excludes the services already tried and gets None when no other is
        ready or not yet polled.
        """
        skip = {s.label for s in exclude}
        with self._lock:
            states = [st for label, st in self._states.items() if label not in skip]
            ready = [st for st in states if st.state == "ready"]
            if ready:
                st, why = choose(ready, key, job, self.settings.gpu_balance_factor, avatar_id)
            elif skip:
                unknown = [st for st in states if st.state == "unknown"]
                if not unknown:
                    return None
                st, why = choose(unknown, key, job, self.settings.gpu_balance_factor, avatar_id)
            else:
                rank = {"unknown": 0, "not_ready": 1, "down": 2}
                st = min(states, key=lambda s: (rank[s.state], -rendezvous_score(key, s.client.base)))
                why = "none ready"
            st.inflight[job] += 1
            st.placed += 1
        if len(self._states) > 1:
            log.debug("chunk placed", extra={"job_id": job, "gpu_service": st.label, "why": why})
        return Placement(self, st, job)

    def failover(self, placement: Placement, exc: GPUServiceError, key: str, tried: list[ServiceClient],
                 avatar_id: Optional[str] = None) -> Optional[Placement]:
        """After `exc` on the placement's service: another service for the chunk, or None (then `exc` stands).

        Only a service failure (down: unreachable, timed out, 5xx) or a 429 moves a chunk; the first marks the
        service down until its /health answers again. A 4xx stays: it would recur anywhere.
        """
        placement.release()
        if not (exc.down or exc.status == 429):
            return None
        if exc.down:
            self.mark_down(placement.service, exc.message)
        moved = self.place(key, placement.job, avatar_id, exclude=tried)
        if moved is not None:
            with self._lock:
                self._states[placement.service.label].moved_away += 1
            log.warning("chunk moved to another GPU service", extra={
                "job_id": placement.job, "gpu_service": moved.service.label, "from": placement.service.label,
                "why": exc.message})
        return moved

    # -- the runtime's own probes ---------------------------------------------------------

    def report(self) -> list[dict]:
        """Every service polled now: its host:port, state, our chunks in flight, its slot figures, and whether it
        answered (`answers`) with what /health body (`health`)."""
        answers = self.poll_all()
        rows = []
        with self._lock:
            for service, (answered, body) in zip(self.services, answers):
                st = self._states[service.label]
                rows.append({
                    "service": st.label, "state": st.state, "reason": st.reason,
                    "in_flight": sum(st.inflight.values()), "jobs": len(st.inflight),
                    "placed": st.placed, "moved_away": st.moved_away,
                    "free_slots": st.headroom, "slots": (body or {}).get("slots") if st.state != "down" else None,
                    "answers": answered, "health": body,
                })
        return rows

    def ready(self) -> dict[str, bool]:
        """Each service's /ready, asked now."""
        timeout = self.settings.gpu_health_timeout_s
        return dict(zip((s.label for s in self.services), self._map(lambda s: s.ready(timeout), self.services)))

    def avatar_ids(self) -> Optional[set[str]]:
        """Avatar ids known to any service (each list cached briefly); None when none can tell right now."""
        lists = [ids for ids in self._map(lambda s: s.avatar_ids(), self.services) if ids is not None]
        return set().union(*lists) if lists else None
