"""Lip-sync endpoint: re-voice an uploaded video with new speech (multipart in, MP4 or JSON out)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from avatar_contracts.gpu import LipSyncResponse
from gpu_service.http import artifact_url, artifacts, metrics, mp4_response, registry, settings, wants_json
from gpu_service.lipsync.service import LipSyncService

router = APIRouter(tags=["lipsync"])


def service(request: Request) -> LipSyncService:
    """The lip-sync service over the app's registry, settings and artifacts."""
    return LipSyncService(registry(request), settings(request), artifacts(request), metrics(request))


@router.post("/lipsync/generate", response_model=LipSyncResponse)
async def generate_lipsync(request: Request):
    """Multipart `video` + `audio` (or `audio_url`) [+ `phonemes`, `text`, `fps`, `length_policy`, `response`] -> MP4.

    The body is parsed by the service as it streams (size limits hold while reading), so the
    fields are not declared to FastAPI; see LipSyncResponse for the field list.
    """
    result, kind = await service(request).generate(request)
    if not wants_json(request, kind):
        return mp4_response(
            result.mp4,
            result.timings_ms,
            {
                "X-Frames": str(result.frames),
                "X-Frames-Without-Face": str(result.frames_without_face),
                "X-Frames-As-Filmed": str(result.frames_as_filmed),
                "X-Source-Frames": str(result.source_frames),
                "X-Fps": f"{result.fps:g}",
                "X-Width": str(result.width),
                "X-Height": str(result.height),
                "X-Duration-S": f"{result.duration_s:.4f}",
                "X-Length-Policy": result.length_policy,
                "X-Engine": result.engine,
                "X-Timing-Source": result.timing_source or "",
                "X-Device": result.device,
            },
        )
    return LipSyncResponse(
        video_url=await artifact_url(request, result.mp4, "mp4"),
        duration_s=round(result.duration_s, 4), fps=result.fps, frames=result.frames,
        frames_without_face=result.frames_without_face, frames_as_filmed=result.frames_as_filmed,
        filmed_spans=result.filmed_spans,
        source_frames=result.source_frames,
        width=result.width, height=result.height, length_policy=result.length_policy, engine=result.engine,
        device=request.app.state.device.name, timings_ms=result.timings_ms, timing_source=result.timing_source,
    )
