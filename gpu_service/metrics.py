"""The GPU service's Prometheus families, served at /metrics.

| family | type | labels |
|---|---|---|
| `avatar_gpu_http_requests_total` | counter | method, route (template), status |
| `avatar_gpu_http_request_duration_seconds` | histogram | method, route |
| `avatar_gpu_stage_duration_seconds` | histogram | stage: tts, align, render, encode, lipsync |
| `avatar_gpu_slots` | gauge | device, state: busy, free (engine slots of loaded engines, at scrape time) |
| `avatar_gpu_queue_depth` | gauge | (none): requests waiting for a slot |
| `avatar_gpu_stream_sessions_active` | gauge | (none) |
| `avatar_gpu_oom_retries_total` | counter | device |
| `avatar_gpu_chunks_generated_total` | counter | kind: tts, video, lipsync (one per successful generation) |
| `avatar_gpu_memory_used_bytes`, `avatar_gpu_memory_total_bytes`, `avatar_gpu_utilization_ratio` | gauge | device (NVML; torch's CUDA memory figures without it; absent on CPU) |

Plus the process, platform and GC collectors of prometheus-client. Stage times are the engine's
own work (a request's wait for a slot is not in them; `queue_depth` shows the waiting).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import sys
import time
import weakref
from typing import Callable, Iterator, Optional, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from avatar_contracts.metrics import STAGE_BUCKETS, http_families, new_registry
from gpu_service import oom

log = logging.getLogger("gpu_service.metrics")

PREFIX = "avatar_gpu"
STAGES = ("tts", "align", "render", "encode", "lipsync")
KINDS = ("tts", "video", "lipsync")

T = TypeVar("T")


def device_label(name: str) -> str:
    """A device as the families name it: `cuda` is torch's current device, `cuda:0` unless told otherwise."""
    return "cuda:0" if name == "cuda" else name


def slot_usage(engines) -> dict[str, dict[str, int]]:
    """{device: {busy, free, waiting}} summed over the loaded replicas' slots, each on its own device.

    Engines and replicas that are not loaded are left out: their slots can take no work (as /health's
    available_slots).
    """
    usage: dict[str, dict[str, int]] = {}
    for entry in engines.entries():
        for replica in entry.replicas:
            if not replica.loaded:
                continue
            slots = replica.slots
            row = usage.setdefault(device_label(replica.device), {"busy": 0, "free": 0, "waiting": 0})
            row["busy"] += slots.busy
            row["free"] += max(0, slots.slots - slots.busy)
            row["waiting"] += slots.waiting
    return usage


class SlotCollector(Collector):
    """Slots busy and free per device and the requests waiting for one, read from the engines' slots when scraped."""

    def __init__(self, engines) -> None:
        self.engines = engines

    def describe(self) -> Iterator[Metric]:
        """The families, without values."""
        yield GaugeMetricFamily(f"{PREFIX}_slots", "Engine slots of loaded engines, by device and state.",
                                labels=["device", "state"])
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for an engine slot.")

    def collect(self) -> Iterator[Metric]:
        """Read the slots now (plain integers the event loop updates; a scrape may see them mid-request)."""
        usage = slot_usage(self.engines)
        slots = GaugeMetricFamily(f"{PREFIX}_slots", "Engine slots of loaded engines, by device and state.",
                                  labels=["device", "state"])
        for device, row in sorted(usage.items()):
            slots.add_metric([device, "busy"], row["busy"])
            slots.add_metric([device, "free"], row["free"])
        yield slots
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for an engine slot.",
                                value=sum(row["waiting"] for row in usage.values()))


class GpuMemoryCollector(Collector):
    """GPU memory and utilisation per CUDA device from NVML (pynvml), else torch's CUDA memory figures.

    On a CPU or MPS service it reports nothing and touches neither NVML nor torch. A failing NVML
    call leaves that figure (or device) out of the scrape; a scrape never fails over it.
    """

    def __init__(self, device: str, nvml=None) -> None:
        self.enabled = device.startswith("cuda")
        self.device = device_label(device)
        self._nvml = nvml
        """The NVML module (pynvml); imported and initialised on the first scrape when not given."""
        self._nvml_ok: Optional[bool] = None if nvml is None else True

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: whether these families exist is known only when NVML or torch answers."""
        return iter(())

    def _init_nvml(self):
        """The initialised NVML module, or None when it is missing or finds no driver (tried once)."""
        if self._nvml_ok is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml, self._nvml_ok = pynvml, True
            except Exception as exc:  # noqa: BLE001 - no NVML here: torch's figures, or none
                log.info("NVML unavailable; GPU memory from torch", extra={"why": f"{type(exc).__name__}: {exc}"})
                self._nvml_ok = False
        return self._nvml if self._nvml_ok else None

    def _handles(self, nvml) -> list[tuple[str, object]]:
        """(torch's device name, NVML handle) of every device this process can see, CUDA_VISIBLE_DEVICES applied.

        NVML counts every GPU of the machine; torch numbers the visible ones from 0 in the order the
        variable lists them (by index or UUID), stopping at the first entry it cannot resolve.
        """
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return [(f"cuda:{i}", nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
        handles = []
        for position, item in enumerate(part.strip() for part in visible.split(",")):
            try:
                handle = (nvml.nvmlDeviceGetHandleByIndex(int(item)) if item.isdigit()
                          else nvml.nvmlDeviceGetHandleByUUID(item))
            except Exception:  # noqa: BLE001 - torch too stops at the first device it cannot find
                break
            handles.append((f"cuda:{position}", handle))
        return handles

    def _nvml_samples(self, nvml) -> list[tuple[str, Optional[float], Optional[float], Optional[float]]]:
        samples = []
        for name, handle in self._handles(nvml):
            used = total = ratio = None
            with contextlib.suppress(Exception):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used, total = float(memory.used), float(memory.total)
            with contextlib.suppress(Exception):  # not supported on MIG slices, for one
                ratio = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            samples.append((name, used, total, ratio))
        return samples

    def _torch_samples(self) -> list[tuple[str, Optional[float], Optional[float], Optional[float]]]:
        """The service's own CUDA device from torch (no utilisation without NVML); only when torch is loaded
        already, and only that device, so a scrape never creates a CUDA context on another GPU."""
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        index = int(self.device.split(":", 1)[1]) if ":" in self.device else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return [(f"cuda:{index}", float(total - free), float(total), None)]

    def collect(self) -> Iterator[Metric]:
        """The figures now; nothing on a service that does not run on CUDA."""
        if not self.enabled:
            return
        try:
            nvml = self._init_nvml()
            samples = self._nvml_samples(nvml) if nvml is not None else self._torch_samples()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail over GPU figures
            log.warning("GPU figures unavailable for /metrics", extra={"why": f"{type(exc).__name__}: {exc}"})
            return
        families = (
            (1, GaugeMetricFamily(f"{PREFIX}_memory_used_bytes", "GPU memory in use on the device (all processes).",
                                  labels=["device"])),
            (2, GaugeMetricFamily(f"{PREFIX}_memory_total_bytes", "GPU memory of the device.", labels=["device"])),
            (3, GaugeMetricFamily(f"{PREFIX}_utilization_ratio",
                                  "Share of the last sample period the GPU was busy (NVML), 0..1.", labels=["device"])),
        )
        for column, family in families:
            for sample in samples:
                if sample[column] is not None:
                    family.add_metric([sample[0]], sample[column])
            if family.samples:
                yield family


_CURRENT: contextvars.ContextVar[Optional["GpuMetrics"]] = contextvars.ContextVar("gpu_metrics", default=None)
_LATEST: Optional["weakref.ReferenceType[GpuMetrics]"] = None


class GpuMetrics:
    """Every family of the GPU service, on a registry of its own."""

    def __init__(self, engines=None, device: str = "cpu", registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.http_requests, self.http_duration = http_families(PREFIX, self.registry)
        self.stage_duration = Histogram(
            f"{PREFIX}_stage_duration_seconds", "Time an engine stage took (without the wait for a slot).",
            ("stage",), buckets=STAGE_BUCKETS, registry=self.registry)
        self.chunks_generated = Counter(
            f"{PREFIX}_chunks_generated_total", "Successful generations, by kind: one per speech, video or lip-sync "
            "answer made (a chunk made twice counts twice).", ("kind",), registry=self.registry)
        self.oom_retries = Counter(f"{PREFIX}_oom_retries_total", "GPU out-of-memory errors recovered from by "
                                   "retrying with a smaller batch, by device.", ("device",), registry=self.registry)
        self.stream_sessions = Gauge(f"{PREFIX}_stream_sessions_active", "Streaming sessions open now.",
                                     registry=self.registry)
        for stage in STAGES:  # listed from the first scrape, at zero
            self.stage_duration.labels(stage)
        for kind in KINDS:
            self.chunks_generated.labels(kind)
        if engines is not None:
            self.registry.register(SlotCollector(engines))
        self.registry.register(GpuMemoryCollector(device))

    def observe(self, stage: str, seconds: float) -> None:
        """One stage's duration."""
        self.stage_duration.labels(stage).observe(max(0.0, seconds))

    def timed(self, stage: str, fn: Callable[..., T]) -> Callable[..., T]:
        """`fn`, observed as `stage` when it returns (only its own run: called inside the engine's slot)."""

        @functools.wraps(fn)
        def run(*args, **kwargs) -> T:
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            self.observe(stage, time.perf_counter() - started)
            return result

        return run

    def generated(self, kind: str) -> None:
        """One successful generation of `kind` (tts, video, lipsync)."""
        self.chunks_generated.labels(kind).inc()

    @contextlib.contextmanager
    def stream_session(self) -> Iterator[None]:
        """Count a streaming session as active for the duration of the block."""
        self.stream_sessions.inc()
        try:
            yield
        finally:
            self.stream_sessions.dec()

    def bind(self) -> contextvars.Token:
        """Make these the metrics `record_oom_retry` counts in: in this context (each request, the start-up
        load) and, outside any, as the ones bound last."""
        global _LATEST
        _LATEST = weakref.ref(self)
        return _CURRENT.set(self)


def record_oom_retry(device: str) -> None:
    """Count one out-of-memory retry on `device` (e.g. "cuda:0"); for engine code, which holds no app state.

    Counted in the metrics of the app serving the current request or loading its engines (the context
    reaches the engine's worker thread), else in those bound last (one app per process in production).
    """
    metrics = _CURRENT.get() or (_LATEST() if _LATEST is not None else None)
    if metrics is not None:
        metrics.oom_retries.labels(device_label(device)).inc()


class BindMetrics:
    """ASGI middleware: bind the app's metrics for each request, so engine code can count in them."""

    def __init__(self, app, metrics: GpuMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        token = self.metrics.bind()
        try:
            await self.app(scope, receive, send)
        finally:
            _CURRENT.reset(token)


oom.RETRY_HOOKS.append(record_oom_retry)  # the renderer's batch halvings (gpu_service/oom.py) count here
