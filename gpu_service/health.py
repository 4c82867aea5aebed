"""/health and /ready: the service's state, asked of the engines on every call."""

from __future__ import annotations

from typing import Callable, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from avatar_contracts import HealthResponse
from avatar_contracts.gpu import EngineInfo, SlotFigures
from gpu_service.registry import CAPABILITIES, AnyEntry, DeviceFigures, EngineRegistry

router = APIRouter(tags=["health"])


class EngineReport(EngineInfo):
    """EngineInfo plus where the engine really computes (clients reading EngineInfo ignore the extra fields)."""

    device: Optional[str] = None
    providers: list[str] = Field(default_factory=list)
    precision: Optional[str] = None
    """The float precision of a torch render path (float16 on CUDA/MPS by default)."""
    replicas: list[str] = Field(default_factory=list)
    """The devices it has a copy on; its slots, busy and queued are summed over them."""


class HealthReport(HealthResponse):
    """HealthResponse whose engines carry EngineReport's device and providers, plus a line per device."""

    engines: list[EngineReport] = Field(default_factory=list)
    devices: list[DeviceFigures] = Field(default_factory=list)
    active_sessions: int = 0
    """Streaming sessions open now (/stream/sessions)."""
    max_sessions: int = 0
    """The most streaming sessions this service holds (STREAM_MAX_SESSIONS); one more is a 429."""


def engine_report(entry: AnyEntry, redact: Callable[[str], str]) -> EngineReport:
    """One engine's line of /health: its own health report (no server path in its reason) and its slots."""
    h = entry.health()
    return EngineReport(
        name=entry.name, capability=entry.capability, available=h.available, loaded=entry.loaded,
        reason=redact(h.reason) if h.reason else h.reason, voices=list(h.voices), languages=list(h.languages),
        slots=entry.slots.slots, busy=entry.slots.busy, queued=entry.slots.waiting,
        device=h.device, providers=list(h.providers), precision=h.precision,
        replicas=[r.device for r in entry.replicas],
    )


def slot_figures(entries: list[AnyEntry]) -> SlotFigures:
    """Slots of these (loaded) engines: total, running, free and waiting."""
    total = sum(e.slots.slots for e in entries)
    busy = sum(e.slots.busy for e in entries)
    return SlotFigures(total=total, busy=busy, free=max(0, total - busy), queued=sum(e.slots.waiting for e in entries))


@router.get("/health", response_model=HealthReport)
def health(request: Request) -> HealthReport:
    """Always 200 while the process runs: device, accelerators, engines and slots."""
    registry: EngineRegistry = request.app.state.registry
    device = request.app.state.device
    ready = registry.readiness()
    loaded = [e for e in registry.entries() if e.loaded]
    return HealthReport(
        status="healthy" if ready.ready else ("loading" if ready.loading else "unhealthy"),
        device=device.name,
        capabilities={"cuda": device.cuda, "mps": device.mps},
        models={cap: registry.capability_ready(cap) for cap in CAPABILITIES},
        active_workers=sum(e.slots.busy for e in loaded),
        available_slots=sum(e.slots.slots - e.slots.busy for e in loaded),
        engines=[engine_report(e, request.app.state.settings.redact_paths) for e in registry.entries()],
        devices=registry.device_figures(),
        slots=slot_figures(loaded),
        slots_by_capability={cap: slot_figures([e for e in loaded if e.capability == cap]) for cap in CAPABILITIES},
        active_sessions=request.app.state.streams.active,
        max_sessions=request.app.state.streams.max_sessions,
    )


@router.get("/ready")
def ready(request: Request) -> JSONResponse:
    """200 while every loaded engine reports itself available (asked on each call); 503 naming the one that is not."""
    state = request.app.state.registry.readiness()
    if state.ready:
        return JSONResponse({"ready": True})
    body = {"ready": False, "reason": request.app.state.settings.redact_paths(state.reason or ""), "engine": state.engine, "capability": state.capability}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
