"""Talking-head endpoints: avatars (upload, list, delete) and video generation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from avatar_contracts.gpu import AvatarInfo, VideoRequest, VideoResponse
from gpu_service.errors import BadMedia
from gpu_service.http import mp4_response, require_json, wants_json
from gpu_service.talking_head.service import VideoService

router = APIRouter(tags=["video"])


def _service(request: Request) -> VideoService:
    return VideoService(request.app.state.manager, request.app.state.settings, request.app.state.artifacts)


@router.post("/avatars", response_model=AvatarInfo)
async def upload_avatar(request: Request, image: UploadFile = File(...), pick_largest: bool = Form(False)) -> AvatarInfo:
    """Encode an uploaded portrait (multipart field `image`) once; later videos name it by avatar_id."""
    service = _service(request)
    entry = service.entry()
    limit = request.app.state.settings.max_image_bytes
    raw = await image.read(limit + 1)
    if len(raw) > limit:
        raise BadMedia(f"image is larger than {limit} bytes (the limit)")
    record = await entry.slots.run(entry.engine.avatars.add, raw, pick_largest=pick_largest)
    return AvatarInfo(**record.info())


@router.get("/avatars", response_model=list[AvatarInfo])
def list_avatars(request: Request) -> list[AvatarInfo]:
    """Every known avatar: presets first, then uploads."""
    entry = _service(request).entry()
    return [AvatarInfo(**r.info()) for r in entry.engine.avatars.list()]


@router.delete("/avatars/{avatar_id}")
async def delete_avatar(avatar_id: str, request: Request) -> dict:
    """Forget an uploaded avatar and its cached encoding."""
    entry = _service(request).entry()
    await entry.slots.run(entry.engine.avatars.delete, avatar_id)
    return {"deleted": avatar_id}


@router.post("/video/generate", response_model=VideoResponse, dependencies=[Depends(require_json)])
async def generate_video(body: VideoRequest, request: Request):
    """A talking-head MP4 the length of the audio; JSON with video_url when asked (response=json or Accept)."""
    result, avatar_id = await _service(request).generate(body)
    if not wants_json(request, body.response):
        return mp4_response(
            result.mp4,
            result.timings_ms,
            {"X-Frames": str(result.frames), "X-Duration-S": f"{result.duration_s:.4f}", "X-Avatar-Id": avatar_id or ""},
        )
    art_id = request.app.state.artifacts.put(result.mp4, "mp4")
    return VideoResponse(
        video_url=str(request.url_for("get_artifact", art_id=art_id)),
        duration_s=round(result.duration_s, 4),
        fps=result.fps,
        frames=result.frames,
        width=result.width,
        height=result.height,
        avatar_id=avatar_id,
        device=request.app.state.device.name,
        timings_ms=result.timings_ms,
    )
