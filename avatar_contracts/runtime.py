"""Wire models of the runtime's public API (``/api/v1``): text in, a talking-avatar MP4 out.

Pure pydantic, like the GPU service's contracts, so clients and the evaluator can import them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from avatar_contracts.checks import CleanText, HttpUrl, SpeakableText
from avatar_contracts.gpu import BACKGROUND_DOC, FACE_INDEX_DOC

RUNTIME_API_VERSION = "v1"
"""Path version of the public API; bumped on an incompatible change."""

JobStatus = Literal["queued", "running", "succeeded", "failed"]


class GenerateRequest(BaseModel):
    """Body of ``POST /api/v1/generate``: at most one of avatar_id / avatar_image.

    Unknown fields are rejected (422 naming the field) rather than ignored, so a typo such as
    ``avatar`` for ``avatar_id`` is caught at the boundary instead of silently using a default.
    """

    model_config = ConfigDict(extra="forbid")

    text: SpeakableText = Field(
        max_length=1_000_000,
        description="Text to speak, with at least one letter or digit; at most the runtime's MAX_TEXT_CHARS.",
    )
    language: CleanText = Field(default="en", min_length=2, max_length=16, description="Language code, e.g. en.")
    avatar_id: Optional[CleanText] = Field(
        default=None, max_length=128, description="A preset or uploaded avatar; the runtime's DEFAULT_AVATAR_ID when "
        "neither this nor avatar_image is sent."
    )
    avatar_image: Optional[str] = Field(default=None, description="Base64 portrait (JPEG/PNG/WebP).")
    face_index: Optional[int] = Field(default=None, ge=0, le=63, description=FACE_INDEX_DOC)
    background: Optional[str] = Field(default=None, description=BACKGROUND_DOC)
    voice: Optional[CleanText] = Field(default=None, max_length=128, description="Voice of the speech engine.")
    engine: Optional[CleanText] = Field(default=None, max_length=64, description="Speech engine (piper, xtts).")
    speaker_wav: Optional[str] = Field(default=None, description="Base64 voice clip to clone (xtts).")
    emotion: Optional[CleanText] = Field(
        default=None, max_length=32, description="Facial emotion; neutral if absent."
    )
    webhook_url: Optional[HttpUrl] = Field(default=None, description="http(s) URL notified on success/failure.")


class JobAccepted(BaseModel):
    """202 answer of an asynchronous submit."""

    task_id: str
    status: JobStatus
    status_url: str


class JobResult(BaseModel):
    """A job's state as ``GET /api/v1/jobs/{task_id}`` reports it (and the 200 of a sync submit)."""

    task_id: str
    status: JobStatus
    progress: float = Field(default=0.0, ge=0, le=1, description="Share of text chunks finished.")
    chunks_done: int = 0
    chunks_total: int = 0
    detail: Optional[str] = Field(default=None, description="What a running job is doing or waiting for.")
    reason: Optional[str] = Field(default=None, description="Why a failed job failed.")
    error_type: Optional[str] = None
    attempts: int = 0
    created_at: float
    updated_at: float
    video_url: Optional[str] = None
    captions_url: Optional[str] = None
    thumbnail_url: Optional[str] = None
    timing_url: Optional[str] = Field(
        default=None,
        description="Phoneme and word timings in seconds of the final video (JSON); absent from older runtimes.",
    )
    duration_s: Optional[float] = None
    timings: dict[str, float] = Field(default_factory=dict, description="Milliseconds per stage.")


class WebhookEvent(BaseModel):
    """Body POSTed to a job's webhook_url; signed with HMAC-SHA256 (header X-Avatar-Signature)."""

    event: Literal["job.succeeded", "job.failed"]
    timestamp: int
    job: JobResult


class GPUServiceStatus(BaseModel):
    """What the runtime knows of its GPU service (detailed /health only)."""

    url: str
    reachable: bool
    health: Optional[dict[str, Any]] = Field(default=None, description="The GPU service's own /health body.")


class GPUServicePlacement(BaseModel):
    """One of the runtime's GPU services as its chunk placement sees it (detailed /health only)."""

    service: str = Field(description="host:port")
    state: Literal["unknown", "ready", "not_ready", "down"] = Field(
        description="ready: /health says healthy; down: no answer, or a call failed since (until /health answers).")
    reason: Optional[str] = None
    in_flight: int = Field(description="This runtime's chunks running there.")
    jobs: int = Field(description="This runtime's jobs with chunks running there.")
    placed: int = Field(description="Chunks placed there since this runtime started.")
    moved_away: int = Field(description="Chunks moved from there to another service when it failed.")
    free_slots: Optional[int] = Field(
        default=None, description="Free speech/video slots less waiting requests, as its last /health said.")
    slots: Optional[dict[str, int]] = Field(default=None, description="Its own slot figures (total, busy, free, queued).")


class RuntimeHealth(BaseModel):
    """Body of ``GET /health``. While API keys are set, a caller without one gets only ``status``."""

    status: Literal["healthy", "degraded"] = Field(description="degraded: a GPU service does not answer.")
    broker: Optional[Literal["redis", "stub"]] = None
    worker: Optional[bool] = Field(default=None, description="Whether this process runs job workers.")
    jobs: Optional[dict[str, int]] = Field(default=None, description="How many jobs are in each status.")
    gpu_service: Optional[GPUServiceStatus] = Field(default=None, description="The first (or only) GPU service.")
    gpu_services: Optional[list[GPUServicePlacement]] = Field(default=None, description="Every GPU service.")


class RuntimeReady(BaseModel):
    """Body of ``GET /ready`` (200 ready, 503 not)."""

    ready: bool
    gpu_service_ready: bool = Field(description="Whether at least one GPU service is ready.")
    gpu_services_ready: dict[str, bool] = Field(default_factory=dict, description="Each GPU service (host:port).")
    problems: list[str] = Field(default_factory=list)


class StreamRequest(BaseModel):
    """Body of ``POST /api/v1/stream``: a live session on a GPU service (at most one of avatar_id / avatar_image).

    The runtime checks what needs no network (the avatar fields, emotion) and passes the rest to the GPU
    service, whose 4xx (naming the field) comes back as it is.
    """

    model_config = ConfigDict(extra="forbid")

    avatar_id: Optional[CleanText] = Field(
        default=None, max_length=128, description="A preset or uploaded avatar; the runtime's DEFAULT_AVATAR_ID when "
        "neither this nor avatar_image is sent.")
    avatar_image: Optional[str] = Field(default=None, description="Base64 portrait (JPEG/PNG/WebP).")
    engine: Optional[CleanText] = Field(default=None, max_length=64, description="Talking-head engine (landmark).")
    tts_engine: Optional[CleanText] = Field(default=None, max_length=64, description="Speech engine of say (piper, xtts).")
    voice: Optional[CleanText] = Field(default=None, max_length=128, description="Voice of the speech engine.")
    language: Optional[CleanText] = Field(default=None, min_length=2, max_length=16, description="Language code, e.g. en.")
    emotion: Optional[CleanText] = Field(default=None, max_length=32, description="Facial emotion; neutral if absent.")
    fps: Optional[int] = Field(default=None, ge=1, le=60, description="Frame rate (the GPU service's default: 25).")
    size: Optional[Any] = Field(default=None, description="Frame size: [width, height] or \"WxH\", even numbers.")
    head_motion: Optional[bool] = Field(default=None, description="Head drift and nods (default: on).")
    seed: Optional[int] = Field(default=None, ge=0, description="Seed of the idle motion.")


class StreamCreated(BaseModel):
    """201 answer of ``POST /api/v1/stream``: all a browser needs, the GPU service's address not among it.

    Every URL is the runtime's own; each takes the session's ``token`` (header ``X-Stream-Token``, or
    ``?token=`` where a header cannot be set, as with ``EventSource``) instead of the API key. The media
    itself flows between the browser and the GPU service over ICE once the offer is answered.
    """

    stream_id: str = Field(description="The session as the runtime names it.")
    token: str = Field(description="Bearer of this session's URLs; unguessable, shown only here.")
    avatar_id: Optional[str] = None
    fps: int
    width: int
    height: int
    sample_rate: int
    expires_after_idle_s: Optional[float] = Field(
        default=None, description="The session ends this long after its last viewer or listener left.")
    stream_url: str = Field(description="DELETE ends the session.")
    offer_url: str = Field(description="POST {sdp, type: offer} -> {sdp, type: answer}.")
    say_url: str = Field(description="POST {text, interrupt?} -> 202 {utterance_id}.")
    interrupt_url: str = Field(description="POST -> {interrupted: utterance_id | null}.")
    events_url: str = Field(description="GET: server-sent events (speech_started, speech_finished, session_closed).")
    ice_servers: list[dict[str, Any]] = Field(
        default_factory=list, description="STUN/TURN servers for the browser's RTCPeerConnection (RTCIceServer).")
    face_box: Optional[list[float]] = Field(
        default=None, description="x, y, width, height of the face as fractions of the frame's width and height "
        "(from the avatar's encoding; null when the GPU service did not say).")


class StreamSay(BaseModel):
    """Body of ``POST /api/v1/stream/{stream_id}/say``."""

    model_config = ConfigDict(extra="forbid")

    text: SpeakableText = Field(max_length=1_000_000, description="Text to speak; at most MAX_TEXT_CHARS.")
    interrupt: bool = Field(default=False, description="Cut off what is being said first.")
    voice: Optional[CleanText] = Field(default=None, max_length=128, description="Voice of this utterance.")
    emotion: Optional[CleanText] = Field(default=None, max_length=32, description="Facial emotion of this utterance.")


class StreamOffer(BaseModel):
    """Body of ``POST /api/v1/stream/{stream_id}/offer``: the browser's SDP offer."""

    model_config = ConfigDict(extra="forbid")

    sdp: str = Field(min_length=1, max_length=100_000)
    type: Literal["offer"]
