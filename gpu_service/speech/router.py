"""Speech endpoints: whole-text synthesis and a streaming WAV."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from avatar_contracts import TTSRequest, TTSResponse
from gpu_service.http import ClosingStreamingResponse, artifact_url, metrics, registry, require_json, settings
from gpu_service.speech.service import SpeechService

router = APIRouter(tags=["speech"])


def service(request: Request) -> SpeechService:
    """The speech service over the app's registry and settings."""
    return SpeechService(registry(request), settings(request), metrics(request))


@router.post("/tts/generate", response_model=TTSResponse, dependencies=[Depends(require_json)])
async def generate(body: TTSRequest, request: Request):
    """Synthesize speech; JSON with an audio_url, or the WAV itself with `Accept: audio/wav`."""
    outcome = await service(request).synthesize(body)
    wav = await asyncio.to_thread(outcome.wav)
    if "audio/wav" in request.headers.get("accept", ""):
        return Response(
            wav,
            media_type="audio/wav",
            headers={
                "X-Engine": outcome.engine,
                "X-Voice": outcome.result.voice,
                "X-Duration-S": f"{outcome.result.duration_s:.4f}",
                "X-Generation-Time-Ms": f"{outcome.generation_time_ms:.1f}",
            },
        )
    return TTSResponse(
        audio_url=await artifact_url(request, wav, "wav"),
        duration_s=round(outcome.result.duration_s, 4),
        sample_rate=outcome.result.sample_rate,
        generation_time_ms=round(outcome.generation_time_ms, 2),
        engine=outcome.engine,
        voice=outcome.result.voice,
        language=outcome.language,
        device=outcome.device,
        phonemes=outcome.phoneme_timings(),
    )


@router.post("/tts/stream", dependencies=[Depends(require_json)])
async def stream(body: TTSRequest, request: Request):
    """Stream a WAV as it is synthesized: sentence by sentence (the first sentence by clause)."""
    speech = service(request)
    entry, job = await speech.prepare(body)  # validation errors surface before streaming starts
    return ClosingStreamingResponse(
        speech.stream_wav(entry, job),
        media_type="audio/wav",
        headers={"X-Engine": entry.name, "Cache-Control": "no-store"},
    )
