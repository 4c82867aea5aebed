"""HTTP pieces the capability routers share: request checks, MP4 answers, the registry and artifact downloads."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from gpu_service.artifacts import MEDIA_TYPES, ArtifactStore
from gpu_service.errors import UnsupportedMediaType
from gpu_service.metrics import GpuMetrics
from gpu_service.registry import EngineRegistry
from gpu_service.settings import Settings

router = APIRouter(tags=["artifacts"])


def require_json(request: Request) -> None:
    """Refuse bodies that are not declared as JSON, naming what was sent."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype or 'none'!r}")


def wants_json(request: Request, response: str | None) -> bool:
    """A JSON answer (with a media URL) when the body's `response` field or the Accept header asks for it."""
    return response == "json" or "application/json" in request.headers.get("accept", "")


def mp4_response(mp4: bytes, timings_ms: dict, headers: dict[str, str]) -> Response:
    """The MP4 itself, its facts in X- headers and the stage timings in X-Timings-Ms."""
    timing = ",".join(f"{k}={v}" for k, v in timings_ms.items())
    return Response(mp4, media_type="video/mp4", headers={**headers, "X-Timings-Ms": timing})


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, also when the client left mid-body.

    Starlette stops iterating on a disconnect but leaves the generator to the garbage collector;
    closing it here ends the engine's producer at once and gives its slot back.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def registry(request: Request) -> EngineRegistry:
    """The app's engine registry."""
    return request.app.state.registry


def settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def artifacts(request: Request) -> ArtifactStore:
    """The app's artifact store."""
    return request.app.state.artifacts


def metrics(request: Request) -> GpuMetrics:
    """The app's Prometheus families."""
    return request.app.state.metrics


async def artifact_url(request: Request, data: bytes, ext: str) -> str:
    """Store generated media and return the absolute URL it can be fetched from.

    In a thread: the store writes the whole file and prunes its folder, which must not stall the event loop.
    """
    art_id = await asyncio.to_thread(artifacts(request).put, data, ext)
    return str(request.url_for("get_artifact", art_id=art_id))


@router.get("/artifacts/{art_id}", name="get_artifact")
def get_artifact(art_id: str, request: Request):
    """Download generated media by id; 404 once it has expired or been pruned."""
    path = artifacts(request).path(art_id)
    return FileResponse(path, media_type=MEDIA_TYPES[art_id.rsplit(".", 1)[1]])
