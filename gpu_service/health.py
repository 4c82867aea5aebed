"""/health and /ready."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from avatar_contracts import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
def health(request: Request) -> HealthResponse:
    """Always 200 while the process runs: device, accelerators, engines and slots."""
    manager = request.app.state.manager
    device = request.app.state.device
    counts = manager.health()
    status = "healthy" if manager.ready else ("unhealthy" if manager.failed else "loading")
    return HealthResponse(
        status=status,
        device=device.name,
        capabilities={"cuda": device.cuda, "mps": device.mps},
        models={cap: manager.capability_ready(cap) for cap in ("tts", "video", "lipsync")},
        active_workers=counts["active_workers"],
        available_slots=counts["available_slots"],
        engines=counts["engines"],
    )


@router.get("/ready")
def ready(request: Request) -> JSONResponse:
    """200 once every configured engine has loaded (or is known unavailable) and been warmed; 503 before."""
    manager = request.app.state.manager
    if manager.ready:
        return JSONResponse({"ready": True})
    body = {"ready": False, "reason": manager.failed or "engines are loading"}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
