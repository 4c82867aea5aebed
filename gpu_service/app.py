"""The GPU service's FastAPI application: lifespan loads engines, routers stay thin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional

from fastapi import FastAPI

from avatar_contracts.http import RequestContext, install_error_handlers
from avatar_contracts.logs import setup_logging
from avatar_contracts.metrics import HttpMetrics, scrape
from gpu_service.artifacts import ArtifactStore
from gpu_service.device import resolve_device
from gpu_service.metrics import BindMetrics, GpuMetrics
from gpu_service.registry import EngineRegistry
from gpu_service.settings import Settings, get_settings
from gpu_service.streaming.manager import SessionManager

log = logging.getLogger("gpu_service")


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    """Build the app; engines load in the lifespan, so /ready is 503 until they are warm."""
    settings = settings or get_settings()
    setup_logging(settings.log_level)
    device = resolve_device(settings.device, settings.devices)  # an impossible DEVICE(S) fails here, before serving

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("starting", extra={"device": device.name, "devices": ",".join(device.devices), "detail": device.detail,
                                    "placement": settings.placement, "port": settings.port})
        registry: EngineRegistry = app.state.registry
        app.state.metrics.bind()  # the engines' load and warm-up count their OOM retries in this app's metrics
        loader = asyncio.create_task(asyncio.to_thread(registry.load_all, settings.warmup))
        pruner = asyncio.create_task(_prune_forever(app.state.artifacts))
        await app.state.streams.start()
        try:
            yield
        finally:
            await app.state.streams.stop()
            pruner.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(loader, timeout=0.1)
            registry.close()

    app = FastAPI(title="Avatar GPU service", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.device = device
    app.state.registry = EngineRegistry.from_settings(settings, device.devices)
    app.state.artifacts = ArtifactStore(settings.artifacts_dir, settings.artifact_max_bytes, settings.artifact_ttl_s)
    metrics = app.state.metrics = GpuMetrics(app.state.registry, device.name)
    app.state.streams = SessionManager(settings, app.state.registry, metrics)

    def body_limit(path: str) -> int:
        """MAX_REQUEST_BYTES, or lip-sync's own larger limit for its video uploads (each part is also limited)."""
        if path.startswith("/lipsync/"):
            return max(settings.max_request_bytes, settings.lipsync.max_request_bytes)
        return settings.max_request_bytes

    app.add_middleware(BindMetrics, metrics=metrics)
    app.add_middleware(RequestContext, limit_for=body_limit, log=log)
    # outermost: the answers RequestContext gives itself (413, 500) are counted too
    app.add_middleware(HttpMetrics, requests=metrics.http_requests, duration=metrics.http_duration,
                       router=app.router, log=log)
    install_error_handlers(app, log, redact=settings.redact_paths)

    from gpu_service import health, http
    from gpu_service.lipsync import router as lipsync
    from gpu_service.speech import router as speech
    from gpu_service.streaming import router as streaming
    from gpu_service.streaming import webrtc as stream_webrtc
    from gpu_service.talking_head import router as talking_head

    app.include_router(health.router)
    app.include_router(speech.router)
    app.include_router(talking_head.router)
    app.include_router(lipsync.router)
    app.include_router(streaming.router)
    app.include_router(stream_webrtc.router)
    app.include_router(http.router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics():
        """Prometheus text format; gpu_service/metrics.py lists the families."""
        return scrape(metrics.registry)

    return app


async def _prune_forever(store: ArtifactStore, every_s: float = 60.0) -> None:
    """Expire old artifacts even when nothing new is written."""
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(store.prune)
