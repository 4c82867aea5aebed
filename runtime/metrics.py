"""The runtime's Prometheus families (served at /metrics; `python -m runtime worker` serves them on PORT).

| family | type | labels |
|---|---|---|
| `avatar_runtime_http_requests_total` | counter | method, route (template), status |
| `avatar_runtime_http_request_duration_seconds` | histogram | method, route |
| `avatar_runtime_stage_duration_seconds` | histogram | stage: tts, video (per chunk), mux, assemble (per job) |
| `avatar_runtime_jobs` | gauge | state: queued, running, succeeded, failed (read from the job record at scrape time) |
| `avatar_runtime_queue_depth` | gauge | (none): jobs queued and not leased |
| `avatar_runtime_job_retries_total` | counter | reason |
| `avatar_runtime_gpu_calls_total` | counter | endpoint (template), outcome |

Plus the process, platform and GC collectors of prometheus-client. The job gauges count the
shared record, so every runtime over one database reports the same figures: aggregate them with
max(), not sum().
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from avatar_contracts.metrics import STAGE_BUCKETS, http_families, new_registry

log = logging.getLogger("runtime.metrics")

PREFIX = "avatar_runtime"
STAGES = ("tts", "video", "mux", "assemble")
JOB_STATES = ("queued", "running", "succeeded", "failed")
RETRY_REASONS = ("timeout", "unreachable", "overloaded", "server_error", "artifact_expired", "lease_expired", "other")
"""Why a job ran again: the GPU call's failure (see `retry_reason`), or `lease_expired` when a worker took
over a running job whose worker had died."""
OUTCOMES = ("ok", "timeout", "unreachable", "overloaded", "client_error", "server_error")
"""How a GPU-service call ended: 2xx, no answer in time, no connection, 429, another 4xx, 5xx."""


def call_outcome(status: Optional[int], timed_out: bool = False) -> str:
    """The outcome label of a GPU-service call from its HTTP status (None: no answer)."""
    if status is None:
        return "timeout" if timed_out else "unreachable"
    if status < 400:
        return "ok"
    if status == 429:
        return "overloaded"
    if status == 408:
        return "timeout"
    return "server_error" if status >= 500 else "client_error"


def endpoint_label(path: str) -> str:
    """A GPU-service path as a template: the id of an artifact or avatar is not a label value."""
    path = path.split("?", 1)[0]
    for prefix in ("/artifacts/", "/avatars/"):
        if path.startswith(prefix) and len(path) > len(prefix):
            return prefix + ("{art_id}" if prefix == "/artifacts/" else "{avatar_id}")
    return path


def retry_reason(exc) -> str:
    """The retry label of a transient GPUServiceError: what went wrong with the call."""
    status = getattr(exc, "status", None)
    if status == 404:
        return "artifact_expired"  # the speech or video expired on the GPU service: made anew on the retry
    outcome = call_outcome(status, "timed out" in getattr(exc, "message", ""))
    return outcome if outcome in RETRY_REASONS else "other"


class JobCollector(Collector):
    """Jobs by state and the queue depth, counted in the job record when scraped (one GROUP BY)."""

    def __init__(self) -> None:
        self.store = None
        """The job store to count in; nothing is reported until one is given (`RuntimeMetrics.watch`)."""

    def describe(self) -> Iterator[Metric]:
        """The families, without values (so registering does not query the database)."""
        yield GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the job record, by state.", labels=["state"])
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Jobs queued and not leased by any worker.")

    def collect(self) -> Iterator[Metric]:
        """Count now; a database that does not answer leaves the families out of this scrape (logged)."""
        if self.store is None:
            return
        try:
            counts = self.store.counts()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail over the job record
            log.warning("job counts unavailable for /metrics", extra={"why": f"{type(exc).__name__}: {exc}"})
            return
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the job record, by state.", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        # a queued job holds no lease in this record: a worker's claim makes it running in the same statement
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Jobs queued and not leased by any worker.",
                                value=counts.get("queued", 0))


class RuntimeMetrics:
    """Every family of the runtime, on a registry of its own."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.http_requests, self.http_duration = http_families(PREFIX, self.registry)
        self.stage_duration = Histogram(
            f"{PREFIX}_stage_duration_seconds", "Time a pipeline stage took: tts and video per chunk (the GPU call), "
            "mux and assemble per job.", ("stage",), buckets=STAGE_BUCKETS, registry=self.registry)
        self.job_retries = Counter(f"{PREFIX}_job_retries_total", "Times a job was put back to run again, by reason.",
                                   ("reason",), registry=self.registry)
        self.gpu_calls = Counter(f"{PREFIX}_gpu_calls_total", "Calls to the GPU service, by endpoint and outcome.",
                                 ("endpoint", "outcome"), registry=self.registry)
        self._jobs = JobCollector()
        self.registry.register(self._jobs)
        for stage in STAGES:  # every stage and retry reason is listed from the first scrape, at zero
            self.stage_duration.labels(stage)
        for reason in RETRY_REASONS:
            self.job_retries.labels(reason)

    def watch(self, store) -> None:
        """Report the jobs of `store` (anything with `counts() -> {state: n}`) from now on."""
        self._jobs.store = store

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One stage's duration."""
        self.stage_duration.labels(stage).observe(max(0.0, seconds))

    def gpu_call(self, path: str, outcome: str) -> None:
        """One GPU-service call and how it ended."""
        self.gpu_calls.labels(endpoint_label(path), outcome).inc()

    def job_retry(self, reason: str) -> None:
        """One job sent to run again."""
        self.job_retries.labels(reason if reason in RETRY_REASONS else "other").inc()
