"""Talking-head endpoints: avatars (upload, list, delete) and video generation."""

from __future__ import annotations

import asyncio
import base64
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from avatar_contracts.gpu import AvatarInfo, VideoRequest, VideoResponse
from gpu_service.errors import BadMedia, ValidationFailed
from gpu_service.http import (artifact_url, artifacts, metrics, mp4_response, registry, require_json, settings,
                              wants_json)
from gpu_service.talking_head.service import TalkingHeadService

router = APIRouter(tags=["video"])


def service(request: Request) -> TalkingHeadService:
    """The talking-head service over the app's registry, settings and artifacts."""
    return TalkingHeadService(registry(request), settings(request), artifacts(request), metrics(request))


@router.post("/avatars", response_model=AvatarInfo)
async def upload_avatar(request: Request, image: UploadFile = File(...),
                        face_index: Optional[int] = Form(None, ge=0, le=63),
                        background: Optional[str] = Form(None),
                        background_image: Optional[UploadFile] = File(None),
                        pick_largest: bool = Form(False)) -> AvatarInfo:
    """Encode an uploaded portrait (multipart field `image`) once; later videos name it by avatar_id.

    `face_index` picks a face by size: 0, the default, is the largest, then the next largest. A
    transparent PNG or WebP is composited on `background` (`#rrggbb` or a base64 image) or on the
    file `background_image`; without either, on #e9e6e1. Each face and each background of an image
    is its own avatar. `pick_largest` is accepted for older clients: the largest face is the default.
    """
    heads = service(request)
    heads.entry()  # an unavailable engine is refused before the upload is read
    limit = settings(request).talking_head.max_image_bytes
    raw = await image.read(limit + 1)
    if len(raw) > limit:
        raise BadMedia(f"image is larger than {limit} bytes (the limit)")
    if background is not None and background_image is not None:
        raise ValidationFailed("send one of background (a colour or base64 image) or background_image (a file), not both")
    if background_image is not None:
        bg_raw = await background_image.read(limit + 1)
        if len(bg_raw) > limit:
            raise BadMedia(f"background_image is larger than {limit} bytes (the limit)")
        bg = await asyncio.to_thread(heads.background, base64.b64encode(bg_raw).decode() if bg_raw else "",
                                     "background_image")
    else:
        bg = await asyncio.to_thread(heads.background, background)
    record = await heads.add_avatar(raw, face_index=face_index, background=bg)
    return AvatarInfo(**record.info())


@router.get("/avatars", response_model=list[AvatarInfo])
def list_avatars(request: Request) -> list[AvatarInfo]:
    """Every known avatar: presets first, then uploads."""
    return [AvatarInfo(**r.info()) for r in service(request).list_avatars()]


@router.delete("/avatars/{avatar_id}")
async def delete_avatar(avatar_id: str, request: Request) -> dict:
    """Forget an uploaded avatar and its cached encoding."""
    await service(request).delete_avatar(avatar_id)
    return {"deleted": avatar_id}


@router.post("/video/generate", response_model=VideoResponse, dependencies=[Depends(require_json)])
async def generate_video(body: VideoRequest, request: Request):
    """A talking-head MP4 the length of the audio; JSON with video_url when asked (response=json or Accept)."""
    result = await service(request).generate(body)
    if not wants_json(request, body.response):
        return mp4_response(
            result.mp4,
            result.timings_ms,
            {"X-Frames": str(result.frames), "X-Duration-S": f"{result.duration_s:.4f}", "X-Avatar-Id": result.avatar_id,
             "X-Timing-Source": result.timing_source or "", "X-Device": result.device},
        )
    return VideoResponse(
        video_url=await artifact_url(request, result.mp4, "mp4"),
        duration_s=round(result.duration_s, 4),
        fps=result.fps,
        frames=result.frames,
        width=result.width,
        height=result.height,
        avatar_id=result.avatar_id,
        device=request.app.state.device.name,
        timings_ms=result.timings_ms,
        timing_source=result.timing_source,
    )
