"""Speech endpoints and the artifact download they point to."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from avatar_contracts import TTSRequest, TTSResponse
from gpu_service.artifacts import MEDIA_TYPES
from gpu_service.http import require_json
from gpu_service.speech.service import SpeechService

router = APIRouter(tags=["speech"])


def _service(request: Request) -> SpeechService:
    return SpeechService(request.app.state.manager, request.app.state.settings)


@router.post("/tts/generate", response_model=TTSResponse, dependencies=[Depends(require_json)])
async def generate(body: TTSRequest, request: Request):
    """Synthesize speech; JSON with an audio_url, or the WAV itself with `Accept: audio/wav`."""
    outcome = await _service(request).synthesize(body)
    wav = outcome.wav()
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
    art_id = request.app.state.artifacts.put(wav, "wav")
    return TTSResponse(
        audio_url=str(request.url_for("get_artifact", art_id=art_id)),
        duration_s=round(outcome.result.duration_s, 4),
        sample_rate=outcome.result.sample_rate,
        generation_time_ms=round(outcome.generation_time_ms, 2),
        engine=outcome.engine,
        voice=outcome.result.voice,
        language=outcome.language,
        device=request.app.state.device.name,
        phonemes=outcome.phoneme_timings(),
    )


@router.post("/tts/stream", dependencies=[Depends(require_json)])
async def stream(body: TTSRequest, request: Request):
    """Stream a WAV as it is synthesized: sentence by sentence (the first sentence by clause)."""
    service = _service(request)
    entry, speech = service.prepare(body)  # validation errors surface before streaming starts
    return StreamingResponse(
        service.stream_wav(entry, speech),
        media_type="audio/wav",
        headers={"X-Engine": entry.name, "Cache-Control": "no-store"},
    )


@router.get("/artifacts/{art_id}", name="get_artifact")
def get_artifact(art_id: str, request: Request):
    """Download generated media by id; 404 once it has expired or been pruned."""
    path = request.app.state.artifacts.path(art_id)
    return FileResponse(path, media_type=MEDIA_TYPES[art_id.rsplit(".", 1)[1]])
