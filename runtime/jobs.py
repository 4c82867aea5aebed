"""Job execution on Dramatiq: the same actors on the in-process StubBroker or on Redis.

The broker carries only job ids. Delivery is at-least-once; the job table decides: an actor
takes a lease on a queued job (or on a running one whose lease lapsed, its worker being dead),
renews it while it works, and finishes it only while it still holds it. Transient failures
(GPU service down, 5xx, 429) put the job back to queued and send it again after a backoff
(Retry-After honoured); invalid inputs (the GPU service's 4xx) fail it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from typing import Optional

import dramatiq
from dramatiq.brokers.stub import StubBroker
from sqlalchemy.exc import SQLAlchemyError

from avatar_contracts.errors import redact_paths
from avatar_contracts.logs import REQUEST_ID
from avatar_contracts.runtime import JobResult, WebhookEvent
from runtime import pipeline, storage, webhooks
from runtime.db import TERMINAL, JobStore
from runtime.errors import GPUServiceError, StoreUnavailable
from runtime.gpu_client import GPUClient
from runtime.metrics import RuntimeMetrics, retry_reason
from runtime.settings import Settings

log = logging.getLogger("runtime.jobs")

QUEUE = "avatar_jobs"


def job_view(row: dict, base_url: Optional[str]) -> JobResult:
    """The public view of a job row; URLs are rooted at the runtime's public base."""
    base = (base_url or row.get("base_url") or "").rstrip("/")
    result = json.loads(row["result_json"]) if row.get("result_json") else {}
    done = row["status"] == "succeeded"
    total = row["chunks_total"] or 0
    prefix = f"{base}/api/v1/jobs/{row['id']}"
    return JobResult(
        task_id=row["id"],
        status=row["status"],
        progress=1.0 if done else (row["chunks_done"] / total if total else 0.0),
        chunks_done=row["chunks_done"],
        chunks_total=total,
        detail=row.get("detail"),
        reason=row.get("reason"),
        error_type=row.get("error_type"),
        attempts=row["attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        video_url=f"{prefix}/video" if done else None,
        captions_url=f"{prefix}/captions.vtt" if done else None,
        thumbnail_url=f"{prefix}/thumbnail.jpg" if done else None,
        # jobs finished before timing.json existed have none: no URL rather than one that 404s
        timing_url=f"{prefix}/timing.json" if done and result.get("speech_timing") else None,
        duration_s=result.get("duration_s"),
        timings=result.get("timings_ms", {}),
    )


class Runtime:
    """Process-wide job machinery: store, GPU client, broker, actors and (optionally) the worker."""

    def __init__(self, settings: Settings, metrics: Optional[RuntimeMetrics] = None) -> None:
        self.settings = settings
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self.store = JobStore(settings.database, settings.database_pool_size)
        self.outputs = storage.build(settings)
        self.metrics = metrics if metrics is not None else RuntimeMetrics()
        self.metrics.watch(self.store)
        self.gpu = GPUClient(settings, self.metrics)
        self.broker = self._make_broker()
        self.worker: Optional[dramatiq.Worker] = None
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._watch_lock = threading.Lock()
        # actors are bound to this runtime through closures: no module-global state to leak between apps
        self.run_job = dramatiq.actor(
            self._run_job, broker=self.broker, actor_name="run_job", queue_name=QUEUE, max_retries=0,
            time_limit=int(settings.job_time_limit_s * 1000),
        )
        self.deliver_webhook = dramatiq.actor(
            self._deliver_webhook, broker=self.broker, actor_name="deliver_webhook", queue_name=QUEUE,
            max_retries=0, time_limit=int((settings.webhook_timeout_s + 30) * 1000),
        )

    def _make_broker(self) -> dramatiq.Broker:
        if self.settings.redis_url:
            from dramatiq.brokers.redis import RedisBroker

            broker: dramatiq.Broker = RedisBroker(url=self.settings.redis_url, namespace=self.settings.redis_namespace)
        else:
            broker = StubBroker()
            broker.emit_after("process_boot")
        dramatiq.set_broker(broker)
        return broker

    @property
    def broker_name(self) -> str:
        """redis or stub."""
        return "redis" if self.settings.redis_url else "stub"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the GPU services' health polls, the in-process worker (if configured), and re-enqueue unfinished jobs."""
        self.gpu.start()
        if self.settings.run_worker:
            self.worker = dramatiq.Worker(self.broker, worker_threads=self.settings.worker_threads, worker_timeout=200)
            self.worker.start()
        self.recover()

    def stop(self) -> None:
        """Stop the worker (running jobs keep their DB state and resume on the next start)."""
        if self.worker is not None:
            self.worker.stop(timeout=2000)
            self.worker = None
        self.broker.close()
        self.gpu.close()
        self.store.close()

    def recover(self) -> int:
        """Send every queued or running job again; the lease check drops the ones alive elsewhere."""
        now = time.time()
        rows = self.store.unfinished()
        for row in rows:
            delay = 0
            if row["status"] == "running" and row["lease_until"] and row["lease_until"] > now:
                delay = int((row["lease_until"] - now) * 1000) + 100  # retake it once its old lease lapses
            self.run_job.send_with_options(args=(row["id"],), delay=delay or None)
        if rows:
            log.info("recovered unfinished jobs", extra={"jobs": len(rows), "owner": self.owner})
        return len(rows)

    def reap(self) -> int:
        """Re-send jobs nobody is working on: running under a lapsed lease, or queued past any retry delay.

        Covers a worker (or a whole runtime) that died without recording an outcome, or a send lost
        between the DB update and the broker. Runtimes sharing the database sweep at the same time;
        each stalled job goes to one of them (`JobStore.take_stalled`), and a duplicate send would be
        harmless anyway: the lease decides who runs.
        """
        now = time.time()
        stale_queued = now - (self.settings.retry_max_backoff_s + self.settings.job_lease_s + 5)
        stalled = self.store.take_stalled(lapsed_before=now, queued_before=stale_queued)
        for job in stalled:
            if job.lapsed:  # its worker died mid-job: taken over (the claim then finds it queued, not running)
                self.metrics.job_retry("lease_expired")
            self.run_job.send(job.job_id)
        if stalled:
            log.warning("re-sent stalled jobs", extra={"jobs": len(stalled)})
        return len(stalled)

    def sweep_scratch(self) -> int:
        """Remove the chunk files that finished jobs left in the output store; how many jobs were tidied.

        The runtime that records a success or a failure removes its chunks at once (nothing resumes a
        finished job); this catches the rest: a runtime that died between recording the end and removing
        them, a store that did not answer then, or an attempt that lost its lease and wrote a chunk after
        the job had finished elsewhere. A job is swept once its note is a lease period old, so the runtime
        that noted it goes first; two runtimes removing the same files is harmless.
        """
        tidied = sum(self._drop_scratch(job_id) for job_id in self.store.with_scratch(time.time() - self.settings.job_lease_s))
        if tidied:
            log.info("removed chunk files finished jobs left", extra={"jobs": tidied})
        return tidied

    def _drop_scratch(self, job_id: str) -> bool:
        """Remove a finished job's chunk files and say so in its record; False (the record still noting them,
        for the next sweep) when the store or the record did not answer."""
        listed_at = time.time()
        try:
            pipeline.drop_scratch(self.outputs, job_id)
            self.store.scratch_removed(job_id, listed_at)
            return True
        except (StoreUnavailable, SQLAlchemyError) as exc:
            log.warning("chunk files left for a later sweep", extra={"job_id": job_id, "why": type(exc).__name__})
            return False

    def enqueue(self, job_id: str) -> None:
        """Send a job to the workers."""
        self.run_job.send(job_id)

    def watch(self, job_id: str) -> asyncio.Event:
        """An event set when this process finishes the job (sync submits wake at once, not on a poll)."""
        event = asyncio.Event()
        with self._watch_lock:
            self._watchers.setdefault(job_id, []).append((asyncio.get_running_loop(), event))
        return event

    def unwatch(self, job_id: str, event: asyncio.Event) -> None:
        """Forget a watcher."""
        with self._watch_lock:
            left = [w for w in self._watchers.get(job_id, []) if w[1] is not event]
            if left:
                self._watchers[job_id] = left
            else:
                self._watchers.pop(job_id, None)

    def _wake(self, job_id: str) -> None:
        with self._watch_lock:
            watchers = self._watchers.pop(job_id, [])
        for loop, event in watchers:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(event.set)

    # -- actors ---------------------------------------------------------------------------

    def _backoff_s(self, attempts: int, retry_after: Optional[float]) -> float:
        base = min(self.settings.retry_max_backoff_s, self.settings.retry_min_backoff_s * 2 ** max(0, attempts - 1))
        return max(base, retry_after or 0.0)

    def _run_job(self, job_id: str) -> None:
        """Actor: run one job if it still needs running and we can take its lease."""
        row = self.store.get(job_id)
        if row is None or row["status"] in TERMINAL:
            return
        claimed = self.store.claim(job_id, self.owner, self.settings.job_lease_s)
        if claimed is None:
            log.info("job held elsewhere; skipping", extra={"job_id": job_id})
            return
        if row["status"] == "running" and row["lease_owner"] != self.owner:  # its worker died: taken over
            self.metrics.job_retry("lease_expired")
        started = time.perf_counter()
        lost = threading.Event()
        stop = threading.Event()

        def heartbeat() -> None:
            renewed = time.monotonic()
            while not stop.wait(self.settings.job_lease_s / 3):
                try:
                    if not self.store.renew(job_id, self.owner, self.settings.job_lease_s):
                        lost.set()
                        return
                    renewed = time.monotonic()
                except Exception as exc:  # noqa: BLE001 - the database blinked: try again while the lease holds
                    log.warning("lease renewal failed", extra={"job_id": job_id, "why": type(exc).__name__})
                    if time.monotonic() - renewed > self.settings.job_lease_s * 0.8:  # it may lapse: stop working
                        lost.set()
                        return

        beat = threading.Thread(target=heartbeat, name=f"lease-{job_id[:8]}", daemon=True)
        beat.start()

        def progress(done: int, total: int, detail: str) -> None:
            if lost.is_set():
                raise GPUServiceError("lease lost to another worker", transient=False, error_type="lease_lost")
            try:
                ours = self.store.progress(job_id, self.owner, done, total, detail)
            except SQLAlchemyError as exc:  # the job database is unreachable: as transient as a GPU service that is down
                raise GPUServiceError(f"the job database did not answer ({type(exc).__name__})", transient=True,
                                      error_type="database_unavailable") from exc
            if not ours:  # another worker has taken the job over: stop before making anything more
                lost.set()
                raise GPUServiceError("lease lost to another worker", transient=False, error_type="lease_lost")

        # the id of the request that made the job: on every log line of this attempt and every GPU-service call
        bound = REQUEST_ID.set(claimed.get("request_id") or job_id)
        log.info("job started", extra={"job_id": job_id, "attempt": claimed["attempts"], "owner": self.owner})
        recorded = False
        try:
            result = pipeline.run(self.gpu, self.settings, job_id, json.loads(claimed["request_json"]), progress,
                                  self.outputs, observe=self.metrics.observe_stage)
            result["timings_ms"]["queue"] = round(max(0.0, (claimed["started_at"] - claimed["created_at"]) * 1000), 1)
            result["timings_ms"]["total"] = round((time.perf_counter() - started) * 1000, 1)
            if self.store.succeed(job_id, self.owner, result):
                recorded = True
                self._drop_scratch(job_id)  # a crash before this leaves them to another runtime's sweep
                log.info("job succeeded", extra={"job_id": job_id, "duration_s": result["duration_s"]})
                self._notify(job_id)
        except (GPUServiceError, StoreUnavailable) as exc:
            if isinstance(exc, StoreUnavailable):  # the bucket is unreachable: as transient as a GPU service that is down
                exc = GPUServiceError(exc.message, transient=True, error_type=exc.error_type)
            if exc.error_type == "lease_lost":
                log.warning("job lease lost; another worker has it", extra={"job_id": job_id})
            elif exc.transient and claimed["attempts"] <= self.settings.job_max_retries:
                delay = self._backoff_s(claimed["attempts"], exc.retry_after_s)
                detail = redact_paths(f"waiting {delay:.1f}s to retry (attempt {claimed['attempts']}): {exc.message}")
                if self.store.release(job_id, self.owner, detail):
                    log.warning("job will retry", extra={"job_id": job_id, "why": exc.message, "delay_s": delay})
                    self.metrics.job_retry(retry_reason(exc))
                    self.run_job.send_with_options(args=(job_id,), delay=int(delay * 1000))
            else:
                reason = exc.message if not exc.transient else f"gave up after {claimed['attempts']} attempts: {exc.message}"
                unavailable = "output_store_unavailable" if exc.error_type == "output_store_unavailable" else "gpu_service_unavailable"
                self._fail(job_id, reason, exc.error_type if not exc.transient else unavailable)
        except Exception as exc:  # noqa: BLE001 - a job must end in a recorded state, never vanish
            log.exception("job crashed", extra={"job_id": job_id})
            self._fail(job_id, f"internal error while generating ({type(exc).__name__}: {exc})"[:500], "internal_error")
        finally:
            stop.set()
            if not recorded:  # failed here, or finished by another attempt after this one wrote a chunk
                with contextlib.suppress(SQLAlchemyError):
                    if self.store.scratch_left(job_id):
                        self._drop_scratch(job_id)
            REQUEST_ID.reset(bound)

    def _fail(self, job_id: str, reason: str, error_type: str) -> None:
        # reasons reach clients (status, webhook); the GPU service's messages may name its model files
        reason = redact_paths(reason)
        if self.store.fail(job_id, reason, error_type, owner=self.owner):
            log.warning("job failed", extra={"job_id": job_id, "why": reason, "error_type": error_type})
            self._notify(job_id)

    def _notify(self, job_id: str) -> None:
        self._wake(job_id)
        row = self.store.get(job_id)
        if row and row.get("webhook_url"):
            self.store.webhook_state(job_id, "pending", 0)
            self.deliver_webhook.send(job_id, 1)

    def _deliver_webhook(self, job_id: str, attempt: int) -> None:
        """Actor: POST the signed job event; retried with backoff up to WEBHOOK_MAX_ATTEMPTS."""
        row = self.store.get(job_id)
        if row is None or not row.get("webhook_url") or row["status"] not in TERMINAL:
            return
        event = WebhookEvent(
            event=f"job.{row['status']}",
            timestamp=int(time.time()),
            job=job_view(row, self.settings.public_url),
        )
        body = event.model_dump_json().encode("utf-8")
        try:
            status = webhooks.deliver(row["webhook_url"], body, event.event, event.timestamp, self.settings)
            ok, why = 200 <= status < 300, f"status {status}"
        except Exception as exc:  # noqa: BLE001 - any failure to deliver is retried the same way
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if ok:
            self.store.webhook_state(job_id, "delivered", attempt)
            log.info("webhook delivered", extra={"job_id": job_id, "attempt": attempt})
        elif attempt < self.settings.webhook_max_attempts:
            self.store.webhook_state(job_id, "retrying", attempt)
            delay = self._backoff_s(attempt, None)
            log.warning("webhook failed; will retry", extra={"job_id": job_id, "why": why, "delay_s": delay})
            self.deliver_webhook.send_with_options(args=(job_id, attempt + 1), delay=int(delay * 1000))
        else:
            self.store.webhook_state(job_id, "gave_up", attempt)
            log.error("webhook given up", extra={"job_id": job_id, "why": why, "attempts": attempt})
