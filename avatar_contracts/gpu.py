"""Wire models of the GPU service (speech, health; video and lip-sync join them later).

Only pydantic lives here: no torch, no engine code, so the runtime can import it.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from avatar_contracts.checks import CleanText, Seconds, SpeakableText, UrlOrPath

CONTRACT_VERSION = "1.0"
"""Bumped on any incompatible change of the models below."""

DeviceName = Literal["cpu", "cuda", "mps"]


class PhonemeTiming(BaseModel):
    """One phoneme of the synthesized speech and where it lies in the audio.

    ``phoneme`` is IPA; ``" "`` marks a word boundary and ``"_"`` a pause (sentence start or
    end, punctuation). Stress and length marks are folded into the phoneme they modify.
    """

    phoneme: CleanText = Field(max_length=32)
    start_s: Seconds
    end_s: Seconds

    @model_validator(mode="after")
    def _ordered(self) -> "PhonemeTiming":
        if self.end_s < self.start_s:
            raise PydanticCustomError("phoneme_order", "end_s is before start_s")
        return self


class TTSRequest(BaseModel):
    """Body of ``POST /tts/generate`` and ``POST /tts/stream``."""

    model_config = ConfigDict(extra="forbid")

    text: SpeakableText = Field(
        max_length=100_000,
        description="Text to speak, with at least one letter or digit; at most the service's max_text_chars.",
    )
    language: CleanText = Field(default="en", max_length=16, description="Language code, e.g. en, de, fr.")
    engine: Optional[CleanText] = Field(
        default=None, max_length=64, description="Speech engine; the service default when absent."
    )
    voice: Optional[CleanText] = Field(
        default=None, max_length=128, description="Voice of the engine; its default when absent."
    )
    speaker_wav: Optional[str] = Field(
        default=None, description="Base64 audio clip (WAV/FLAC/OGG) to clone, for engines that clone voices."
    )
    speed: Optional[float] = Field(default=None, ge=0.5, le=2.0, description="Speaking rate, 1.0 is normal.")


class TTSResponse(BaseModel):
    """Result of ``POST /tts/generate`` as JSON; the audio itself is behind ``audio_url``."""

    success: bool = True
    audio_url: str
    duration_s: float
    sample_rate: int
    generation_time_ms: float
    engine: str
    voice: str
    language: str
    device: DeviceName
    phonemes: list[PhonemeTiming] = Field(default_factory=list)


class Capabilities(BaseModel):
    """Accelerators present on the GPU service's machine."""

    cuda: bool
    mps: bool


class ModelsStatus(BaseModel):
    """Whether each capability has a loaded, warmed engine."""

    tts: bool
    video: bool
    lipsync: bool


class EngineInfo(BaseModel):
    """Per-engine status reported by ``/health``."""

    name: str
    capability: Literal["tts", "video", "lipsync"]
    available: bool
    loaded: bool
    reason: Optional[str] = None
    voices: list[str] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=list)
    slots: int = 0
    busy: int = 0
    queued: int = 0


class SlotFigures(BaseModel):
    """Slots of the loaded engines (of one capability, or of all): how many, how many run, how many wait."""

    total: int
    busy: int
    free: int
    queued: int


class HealthResponse(BaseModel):
    """Body of ``GET /health``."""

    status: Literal["healthy", "loading", "unhealthy"]
    device: DeviceName
    capabilities: Capabilities
    models: ModelsStatus
    active_workers: int
    available_slots: int
    contract_version: str = CONTRACT_VERSION
    engines: list[EngineInfo] = Field(default_factory=list)
    slots: Optional[SlotFigures] = Field(default=None, description="Over every loaded engine.")
    slots_by_capability: dict[str, SlotFigures] = Field(
        default_factory=dict, description="Per capability (tts, video, lipsync): what a client placing work reads."
    )


class ErrorResponse(BaseModel):
    """Body of every error answer of the GPU service and the runtime."""

    error: str
    error_type: str
    request_id: str


# -- talking head -----------------------------------------------------------------------------

EMOTIONS = ("neutral", "happy", "sad", "angry", "surprised", "fearful", "disgusted")
TimingSource = Literal["request", "forced_alignment", "phone_recognition", "envelope"]
"""Where a video's phoneme timings came from: the request, derived from its audio (with or without its text), or none."""


FACE_INDEX_DOC = ("Which face of avatar_image to animate, by size: 0 (the default) is the largest face, 1 the next "
                  "largest, and so on. An index past the last face is a 422 saying how many faces were found.")
BACKGROUND_DOC = ("What a transparent avatar_image (PNG or WebP with alpha) is composited on before it is animated: a "
                  "colour as #rrggbb, or a base64 JPEG/PNG/WebP image scaled to cover the portrait. Default #e9e6e1, "
                  "a neutral light grey. An opaque portrait ignores it.")


class AvatarInfo(BaseModel):
    """An encoded avatar (preset or uploaded)."""

    avatar_id: str
    face_box: list[int] = Field(description="x, y, width, height of the face in the image, in pixels")
    image_size: list[int] = Field(description="width, height of the portrait")
    preset: bool = False
    encode_time_ms: float = 0.0
    cached: bool = False


class VideoRequest(BaseModel):
    """Body of ``POST /video/generate``: exactly one of avatar_id/avatar_image, one of audio/audio_url."""

    model_config = ConfigDict(extra="forbid")

    avatar_id: Optional[CleanText] = Field(default=None, max_length=128)
    avatar_image: Optional[str] = Field(default=None, description="Base64 portrait (JPEG/PNG/WebP).")
    face_index: Optional[int] = Field(default=None, ge=0, le=63, description=FACE_INDEX_DOC)
    background: Optional[str] = Field(default=None, description=BACKGROUND_DOC)
    audio: Optional[str] = Field(default=None, description="Base64 audio (WAV/FLAC/OGG/MP3).")
    audio_url: Optional[UrlOrPath] = Field(default=None, description="An audio_url returned by this service's /tts.")
    phonemes: Optional[list[PhonemeTiming]] = None
    text: Optional[CleanText] = Field(default=None, description="The spoken text: emotion='auto' reads it, and "
                                      "audio without phonemes is aligned to it.")
    emotion: CleanText = Field(default="neutral", max_length=32)
    fps: int = Field(default=25, ge=5, le=60)
    include_audio: bool = True
    head_motion: bool = True
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the head motion (0 to 2**32 - 1).")
    response: Literal["mp4", "json"] = Field(
        default="mp4", description="mp4: the video bytes; json: a VideoResponse with video_url."
    )


class VideoResponse(BaseModel):
    """JSON answer of ``POST /video/generate`` when ``response='json'`` (or Accept: application/json)."""

    success: bool = True
    video_url: str
    duration_s: float
    fps: int
    frames: int
    width: int
    height: int
    avatar_id: Optional[str] = None
    device: DeviceName
    timings_ms: dict[str, float] = Field(default_factory=dict)
    timing_source: Optional[TimingSource] = None


# -- lip-sync ---------------------------------------------------------------------------------

LENGTH_POLICIES = ("trim", "loop", "pingpong")


class LipSyncResponse(BaseModel):
    """JSON answer of ``POST /lipsync/generate`` when ``response=json`` (or Accept: application/json).

    The request itself is multipart (a video upload does not fit JSON): ``video``, then ``audio``
    or ``audio_url``, optional ``phonemes`` (JSON list of PhonemeTiming), ``text`` (the words spoken, aligned to
    the audio when there are no phonemes), ``fps``, ``length_policy``, ``silence`` (``filmed``, the default: keep
    the filmed mouth where neither the source's soundtrack nor the new speech speaks; ``rendered``: render every frame).
    """

    success: bool = True
    video_url: str
    duration_s: float
    fps: float
    frames: int
    frames_without_face: int = Field(description="Frames passed through unchanged: no face (or one too small) found.")
    frames_as_filmed: int = Field(0, description="Frames whose mouth was kept as filmed: a silence in both the source's "
                                                 "own soundtrack and the new speech (`silence=filmed`, the default).")
    filmed_spans: list[tuple[int, int]] = Field(default_factory=list,
                                                description="Those frames as [start, end) runs of output frame indices.")
    source_frames: int
    width: int
    height: int
    length_policy: Literal["trim", "loop", "pingpong"]
    engine: str
    device: DeviceName
    timings_ms: dict[str, float] = Field(default_factory=dict)
    timing_source: Optional[TimingSource] = None
