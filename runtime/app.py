"""The runtime's FastAPI application: the product's front door (text in, MP4 out).

Everything a request can get wrong is refused here, before a job exists. Unknown body fields
are rejected with a 422 naming them (and logged), so a misspelt option never silently falls
back to a default.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError

from avatar_contracts.http import RequestContext, describe_validation, install_error_handlers
from avatar_contracts.gpu import EMOTIONS, ErrorResponse
from avatar_contracts.logs import setup_logging
from avatar_contracts.media import check_image_header, decode_base64, parse_background
from avatar_contracts.metrics import HttpMetrics, scrape
from avatar_contracts.runtime import GenerateRequest, GPUServicePlacement, GPUServiceStatus, JobAccepted, JobResult, RuntimeHealth, RuntimeReady
from avatar_contracts.runtime import StreamCreated, StreamOffer, StreamRequest, StreamSay
from runtime import pipeline, streams, webhooks
from runtime.db import TERMINAL, key_fingerprint
from runtime.errors import (
    BadMedia,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    StoreUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)
from runtime.jobs import Runtime, job_view
from runtime.metrics import RuntimeMetrics
from runtime.settings import Settings, get_settings

log = logging.getLogger("runtime")

_AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_STREAM_SESSION_PATH = re.compile(r"^/api/v1/stream/[^/]+(/(offer|say|interrupt|events))?$")
"""A stream session's own URLs: authorised by the session's token, not by an API key."""
_DEMO_DIR = Path(__file__).resolve().parent / "demo"
"""The demo page's static files (package data)."""


def _describe(exc: ValidationError) -> tuple[str, list[str]]:
    """One readable clause per problem, naming the field; and the unknown fields."""
    errors = exc.errors()
    unknown = [".".join(str(x) for x in e.get("loc", ())) for e in errors if e.get("type") == "extra_forbidden"]
    return describe_validation(errors), unknown


def json_object(raw: bytes) -> dict:
    """A request body parsed as a JSON object, or a 422 saying why it is not one."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationFailed(f"body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ValidationFailed("body must be a JSON object")
    return body


def parse_request(raw: bytes, request_id: str) -> GenerateRequest:
    """The JSON body as a GenerateRequest, or a 422 naming each problem (CPU-bound: run it off the event loop)."""
    body = json_object(raw)
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as exc:
        message, unknown = _describe(exc)
        if unknown:
            # names only, bounded: a client chooses them, and a body's text has no place in the log
            log.warning("unknown request fields", extra={"fields": ",".join(name[:64] for name in unknown[:10]),
                                                         "count": len(unknown), "request_id": request_id})
        raise ValidationFailed(message) from None


def with_avatar(req, settings: Settings):
    """The request naming exactly one avatar (avatar_id or avatar_image; DEFAULT_AVATAR_ID when neither),
    its id well formed; the image itself is checked by check_avatar_image."""
    if req.avatar_id is not None and req.avatar_image is not None:
        raise ValidationFailed("send one of avatar_id or avatar_image, not both (both were given)")
    if req.avatar_id is None and req.avatar_image is None:
        if not settings.default_avatar_id:
            raise ValidationFailed("send avatar_id or avatar_image (neither was given, and DEFAULT_AVATAR_ID is unset)")
        req = req.model_copy(update={"avatar_id": settings.default_avatar_id})
    if req.avatar_id is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", req.avatar_id):
        raise ValidationFailed(f"avatar_id {req.avatar_id!r} is not a valid id (letters, digits, . _ -)")
    return req


def check_avatar_image(avatar_image: str, settings: Settings) -> None:
    """A base64 portrait that decodes within MAX_IMAGE_BYTES and whose header is an image within MAX_IMAGE_PIXELS."""
    raw = decode_base64(avatar_image, "avatar_image", settings.max_image_bytes)
    check_image_header(raw, settings.max_image_pixels, "avatar_image")


async def check_known_avatar(rt: Runtime, avatar_id: Optional[str]) -> None:
    """A named avatar the GPU services know; when they cannot say right now (None), the request goes on and waits."""
    if avatar_id is None:
        return
    known = await asyncio.to_thread(rt.gpu.avatar_ids)
    if known is not None and avatar_id not in known:
        shown = ", ".join(sorted(known)[:20]) or "none"
        raise ValidationFailed(f"unknown avatar_id {avatar_id!r}; known avatars: {shown}")


def validate_request(req: GenerateRequest, settings: Settings) -> GenerateRequest:
    """Checks that need no network (text, avatar, media, language, emotion, webhook target); returns the
    request with the default avatar filled in when it named none."""
    if not req.text.strip():
        raise ValidationFailed("text is empty; send the words to speak")
    if len(req.text) > settings.max_text_chars:
        raise ValidationFailed(
            f"text is {len(req.text)} characters; the maximum is {settings.max_text_chars} (raise MAX_TEXT_CHARS)"
        )
    req = with_avatar(req, settings)
    if req.avatar_image is not None:
        check_avatar_image(req.avatar_image, settings)
    if req.avatar_image is None and (req.background is not None or req.face_index is not None):
        given = " and ".join(n for n in ("background", "face_index") if getattr(req, n) is not None)
        raise ValidationFailed(f"{given} {'apply' if ' and ' in given else 'applies'} to avatar_image; an avatar_id names a portrait already encoded")
    if req.background is not None:  # a colour, or an image checked from its header (the GPU service decodes it)
        parse_background(req.background, settings.max_image_bytes, settings.max_image_pixels)
    if req.speaker_wav is not None:
        raw = decode_base64(req.speaker_wav, "speaker_wav", settings.max_speaker_wav_bytes)
        if not raw.startswith(_AUDIO_MAGIC):
            raise BadMedia("speaker_wav is not a WAV, FLAC, OGG or MP3 file")
    if not _LANGUAGE.match(req.language):
        raise ValidationFailed(f"language {req.language!r} is not a language code such as en or en-US")
    if req.emotion is not None and req.emotion not in (*EMOTIONS, "auto"):
        raise ValidationFailed(f"emotion {req.emotion!r} is not one of {', '.join((*EMOTIONS, 'auto'))}")
    if req.webhook_url is not None:
        webhooks.check_target(req.webhook_url, settings)
    return req


_ERRORS = {"model": ErrorResponse, "description": "The request was refused or failed: {error, error_type, request_id}"}


def _openapi(app: FastAPI, secured: bool) -> dict:
    """The OpenAPI document, with GenerateRequest (parsed by hand, so FastAPI does not see it) among the schemas."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schema = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas["GenerateRequest"] = schema
        security = doc["components"].setdefault("securitySchemes", {})
        # a stream session's own URLs take its token (StreamCreated.token), with or without API keys
        security["StreamToken"] = {"type": "apiKey", "in": "header", "name": streams.TOKEN_HEADER}
        if secured:
            security["ApiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            security["Bearer"] = {"type": "http", "scheme": "bearer"}
        for path, operations in doc["paths"].items():
            if _STREAM_SESSION_PATH.match(path.replace("{stream_id}", "x")):
                for operation in operations.values():
                    operation["security"] = [{"StreamToken": []}]
            elif secured and path.startswith("/api/"):
                for operation in operations.values():
                    operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
        app.openapi_schema = doc
    return app.openapi_schema


_PRESIGNED = {"description": "OUTPUT_STORE=s3 with S3_SERVE=redirect: the file is at the presigned URL in Location."}


def _media(media_type: str, what: str) -> dict:
    """The OpenAPI answer of an output download."""
    return {200: {"description": what, "content": {media_type: {"schema": {"type": "string", "format": "binary"}}}},
            307: _PRESIGNED}


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    """Build the app; the job worker and restart recovery start in the lifespan."""
    settings = settings or get_settings()
    setup_logging(settings.log_level)
    keys = {key_fingerprint(k): k.encode() for k in settings.runtime_api_keys}
    metrics = RuntimeMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = Runtime(settings, metrics)
        app.state.runtime = rt
        await asyncio.to_thread(rt.start)
        log.info("runtime started", extra={"port": settings.port, "broker": rt.broker_name,
                                            "gpu_services": ",".join(s.label for s in rt.gpu.services), "owner": rt.owner,
                                            "database": rt.store.describe(), "outputs": rt.outputs.describe()})
        app.state.streams = streams.StreamRelay(settings, rt.gpu, metrics)
        pruner = asyncio.create_task(_prune_forever(rt))
        reaper = asyncio.create_task(_reap_forever(rt)) if settings.run_worker else None
        try:
            yield
        finally:
            pruner.cancel()
            if reaper is not None:
                reaper.cancel()
            await app.state.streams.aclose()
            await asyncio.to_thread(rt.stop)

    app = FastAPI(title="Avatar runtime", version="0.1.0", lifespan=lifespan,
                  responses={"4XX": _ERRORS, "5XX": _ERRORS})
    app.state.settings = settings
    app.state.metrics = metrics
    # set by `python -m runtime` to the server's exit flag: a sync request stops waiting once it is up
    app.state.shutting_down = lambda: False
    app.openapi = lambda: _openapi(app, bool(keys))

    def caller(request: Request) -> Optional[str]:
        """Fingerprint of the request's API key when it is a valid one, else None."""
        supplied = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if not supplied and auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        fingerprint = key_fingerprint(supplied)
        valid = any(hmac.compare_digest(supplied.encode(), k) for k in keys.values())
        return fingerprint if valid else None

    def gate(request: Request) -> Optional[ServiceError]:
        """Record who is calling (the key's fingerprint); the API itself needs a valid key when keys are set."""
        request.state.owner = caller(request) if keys else None
        path = request.url.path
        guarded = ((path.startswith("/api/") and not _STREAM_SESSION_PATH.match(path))
                   or (path == "/metrics" and settings.metrics_require_key))
        if keys and request.state.owner is None and guarded:
            return Unauthorized("a valid API key is required (X-API-Key or Authorization: Bearer)",
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    app.add_middleware(RequestContext, limit_for=lambda path: settings.max_request_bytes, log=log, gate=gate)
    # outermost: the answers RequestContext gives itself (401, 413, 500) are counted too
    app.add_middleware(HttpMetrics, requests=metrics.http_requests, duration=metrics.http_duration,
                       router=app.router, log=log)
    install_error_handlers(app, log)

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    def runtime(request: Request) -> Runtime:
        return request.app.state.runtime

    generate_doc = {
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}},
        "parameters": [
            {"name": "async", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
             "description": "true: answer 202 at once with the status_url; false (default): wait for the job."},
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "minLength": 1, "maxLength": 255},
             "description": "Submits with one key (per API key) and the same body make one job."},
        ],
    }

    @app.post("/api/v1/generate", openapi_extra=generate_doc, responses={
        200: {"model": JobResult, "description": "The finished job (sync)."},
        202: {"model": JobAccepted, "description": "Accepted (async), or the sync wait ran out; poll status_url."},
    })
    async def generate(request: Request):
        """Submit text; 200 with the finished job (sync, default) or 202 with its status_url (?async=true)."""
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype or 'none'!r}")
        raw = bytearray()
        async for piece in request.stream():  # bounded even when no Content-Length was sent
            raw.extend(piece)
            if len(raw) > settings.max_request_bytes:
                raise PayloadTooLarge(f"request body is over the {settings.max_request_bytes} byte limit")
        req = await asyncio.to_thread(parse_request, bytes(raw), request.state.request_id)
        mode = request.query_params.get("async", "false").lower()
        if mode not in ("true", "false", "1", "0"):
            raise ValidationFailed("async must be true or false")
        is_async = mode in ("true", "1")
        key = request.headers.get("idempotency-key")
        if key is not None and not (1 <= len(key) <= 255):
            raise ValidationFailed("Idempotency-Key must be 1 to 255 characters")
        req = await asyncio.to_thread(validate_request, req, settings)
        rt = runtime(request)
        await check_known_avatar(rt, req.avatar_id)
        canonical = req.model_dump(exclude_none=True)
        row, created = await asyncio.to_thread(
            rt.store.create, uuid.uuid4().hex, canonical, key, base_url(request), request.state.owner,
            request.state.request_id)
        if created:
            await asyncio.to_thread(rt.enqueue, row["id"])
            log.info("job queued", extra={"job_id": row["id"], "chars": len(req.text), "async": is_async,
                                          "request_id": request.state.request_id})
        status_url = f"{base_url(request)}/api/v1/jobs/{row['id']}"
        headers = {"Location": status_url}
        if is_async:
            accepted = JobAccepted(task_id=row["id"], status=row["status"], status_url=status_url)
            return JSONResponse(accepted.model_dump(), status_code=202, headers=headers)
        deadline = time.monotonic() + settings.sync_timeout_s
        stopping = request.app.state.shutting_down
        finished = rt.watch(row["id"])
        try:
            while row["status"] not in TERMINAL and time.monotonic() < deadline and not stopping():
                # woken at once when this process finishes it; the DB poll covers workers elsewhere (Redis)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(finished.wait(), timeout=min(0.5, max(0.01, deadline - time.monotonic())))
                row = await asyncio.to_thread(rt.store.get, row["id"])
        finally:
            rt.unwatch(row["id"], finished)
        view = job_view(row, base_url(request))
        if row["status"] not in TERMINAL:  # the wait ran out or the server is stopping: hand over to polling
            body = {**view.model_dump(), "status_url": status_url}
            return JSONResponse(body, status_code=202, headers=headers)
        if row["status"] == "failed":
            return JSONResponse(
                {**view.model_dump(), "error": row["reason"], "error_type": row["error_type"] or "generation_failed",
                 "request_id": request.state.request_id},
                status_code=failed_status(row["error_type"]),
                headers=headers,
            )
        return JSONResponse(view.model_dump(), status_code=200, headers=headers)

    def _job(request: Request, task_id: str) -> dict:
        row = runtime(request).store.get(task_id) if _JOB_ID.match(task_id) else None
        # another key's job is answered exactly like a job that does not exist
        if row is None or (keys and row["owner"] != request.state.owner):
            raise NotFound(f"no job {task_id!r}")
        return row

    @app.get("/api/v1/jobs/{task_id}", response_model=JobResult)
    def job_status(task_id: str, request: Request) -> JobResult:
        """A job's status: queued, running (with progress), succeeded (with URLs) or failed (with the reason)."""
        return job_view(_job(request, task_id), base_url(request))

    def _output(request: Request, task_id: str, name: str, media_type: str) -> Response:
        row = _job(request, task_id)
        if row["status"] != "succeeded":
            why = f": {row['reason']}" if row["status"] == "failed" else ""
            raise Conflict(f"job {task_id} is {row['status']}{why}; its outputs exist once it has succeeded")
        outputs = runtime(request).outputs
        expired = NotFound(f"the outputs of job {task_id} have expired")
        path = outputs.local_path(task_id, name)
        if path is not None:  # a local folder: sent as a file (ranges, conditional requests)
            if not path.exists():
                raise expired
            return FileResponse(path, media_type=media_type)
        if not outputs.exists(task_id, name):
            raise expired
        url = outputs.presigned_url(task_id, name)
        if url is not None:  # the client fetches the bytes from the bucket itself; the URL is for this caller only
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
        pieces, size = outputs.stream(task_id, name)
        return StreamingResponse(pieces, media_type=media_type, headers={"Content-Length": str(size)})

    @app.get("/api/v1/jobs/{task_id}/video", response_class=FileResponse,
             responses=_media("video/mp4", "The MP4 (H.264 + AAC, faststart)."))
    def job_video(task_id: str, request: Request):
        """The finished MP4 (H.264 + AAC, faststart)."""
        return _output(request, task_id, pipeline.VIDEO_NAME, "video/mp4")

    @app.get("/api/v1/jobs/{task_id}/captions.vtt", response_class=FileResponse,
             responses=_media("text/vtt", "WebVTT captions."))
    def job_captions(task_id: str, request: Request):
        """WebVTT captions timed from the speech's word timings."""
        return _output(request, task_id, pipeline.CAPTIONS_NAME, "text/vtt")

    @app.get("/api/v1/jobs/{task_id}/timing.json", response_class=FileResponse, responses={
        200: {"description": "Phoneme, word and chunk timings.", "content": {"application/json": {"schema": {"type": "object"}}}},
        307: _PRESIGNED})
    def job_timing(task_id: str, request: Request):
        """Phoneme and word timings in seconds of the final video (fps, duration_s, phonemes, words, chunks)."""
        return _output(request, task_id, pipeline.TIMING_NAME, "application/json")

    @app.get("/api/v1/jobs/{task_id}/thumbnail.jpg", response_class=FileResponse,
             responses=_media("image/jpeg", "A JPEG frame of the video."))
    def job_thumbnail(task_id: str, request: Request):
        """A JPEG frame of the video."""
        return _output(request, task_id, pipeline.THUMBNAIL_NAME, "image/jpeg")

    # -- live streams: created with the API key, then driven with the session's token -----------------

    async def json_body(request: Request, model, required: bool = True):
        """The JSON body as `model`, or a 415/413/422 naming the problem; None when optional and empty."""
        raw = bytearray()
        async for piece in request.stream():  # bounded even when no Content-Length was sent
            raw.extend(piece)
            if len(raw) > settings.max_request_bytes:
                raise PayloadTooLarge(f"request body is over the {settings.max_request_bytes} byte limit")
        if not raw.strip() and not required:
            return None
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype or 'none'!r}")
        body = json_object(bytes(raw))
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise ValidationFailed(_describe(exc)[0]) from None

    def relay(request: Request) -> streams.StreamRelay:
        return request.app.state.streams

    def stream_target(request: Request, stream_id: str) -> streams.StreamTarget:
        token = request.headers.get(streams.TOKEN_HEADER.lower()) or request.query_params.get("token")
        return relay(request).target(stream_id, token)

    def stream_urls(request: Request, stream_id: str) -> dict[str, str]:
        root = f"{base_url(request)}/api/v1/stream/{stream_id}"
        return {"stream_url": root, "offer_url": f"{root}/offer", "say_url": f"{root}/say",
                "interrupt_url": f"{root}/interrupt", "events_url": f"{root}/events"}

    def body_doc(model, required: bool = True) -> dict:
        return {"requestBody": {"required": required, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/api/v1/stream", status_code=201, response_model=StreamCreated, openapi_extra=body_doc(StreamRequest, False), responses={
        429: {"model": ErrorResponse, "description": "Every GPU service is at STREAM_MAX_SESSIONS; see Retry-After."},
        503: {"model": ErrorResponse, "description": "No GPU service could be reached (the message names it)."}})
    async def stream_create(request: Request):
        """A live session on a GPU service: the URLs and token a browser drives it with (no API key needed
        after this), and its frame size and rate. The media flows browser <-> GPU service over WebRTC."""
        req: StreamRequest = await json_body(request, StreamRequest, required=False) or StreamRequest()
        req = with_avatar(req, settings)
        if req.avatar_image is not None:
            await asyncio.to_thread(check_avatar_image, req.avatar_image, settings)
        if req.emotion is not None and req.emotion not in (*EMOTIONS, "auto"):
            raise ValidationFailed(f"emotion {req.emotion!r} is not one of {', '.join((*EMOTIONS, 'auto'))}")
        rt = runtime(request)
        await check_known_avatar(rt, req.avatar_id)
        target, answer = await relay(request).create(req.model_dump(exclude_none=True), req.avatar_id, req.avatar_image)
        urls = stream_urls(request, target.stream_id)
        try:
            frame_size = (int(answer["width"]), int(answer["height"]))
        except (KeyError, TypeError, ValueError):
            frame_size = None
        face_box = (await relay(request).face_box(target, answer.get("avatar_id", req.avatar_id), frame_size)
                    if frame_size else None)
        try:
            created = StreamCreated(
                stream_id=target.stream_id, token=relay(request).tokens.token(target.stream_id),
                avatar_id=answer.get("avatar_id", req.avatar_id), fps=answer["fps"], width=answer["width"],
                height=answer["height"], sample_rate=answer["sample_rate"],
                expires_after_idle_s=answer.get("expires_after_idle_s"),
                ice_servers=relay(request).ice_servers(answer), face_box=face_box, **urls)
        except (KeyError, ValidationError) as exc:
            raise streams.Relayed(502, "gpu_service_error", f"GPU service {target.service.label} answered a session "
                                  f"the runtime cannot describe ({type(exc).__name__}: {str(exc)[:200]})") from None
        log.info("stream created", extra={"stream_id": target.stream_id, "request_id": request.state.request_id})
        return JSONResponse(created.model_dump(), status_code=201, headers={"Location": urls["stream_url"],
                                                                           "Cache-Control": "no-store"})

    @app.post("/api/v1/stream/{stream_id}/offer", openapi_extra=body_doc(StreamOffer), responses={200: {"description": "{sdp, type: answer}"}})
    async def stream_offer(stream_id: str, request: Request):
        """The browser's SDP offer, answered by the GPU service (one audio and one video track to receive)."""
        target = stream_target(request, stream_id)
        offer = await json_body(request, StreamOffer)
        response = await relay(request).relay(target, "POST", "/offer", "offer", json=offer.model_dump())
        return JSONResponse(response.json(), status_code=response.status_code)

    @app.post("/api/v1/stream/{stream_id}/say", status_code=202, openapi_extra=body_doc(StreamSay), responses={202: {"description": "{utterance_id}"}})
    async def stream_say(stream_id: str, request: Request):
        """Speak text on the session (speech_started / speech_finished follow on the events)."""
        target = stream_target(request, stream_id)
        say = await json_body(request, StreamSay)
        if len(say.text) > settings.max_text_chars:
            raise ValidationFailed(f"text is {len(say.text)} characters; the maximum is {settings.max_text_chars} "
                                   "(raise MAX_TEXT_CHARS)")
        if say.emotion is not None and say.emotion not in (*EMOTIONS, "auto"):
            raise ValidationFailed(f"emotion {say.emotion!r} is not one of {', '.join((*EMOTIONS, 'auto'))}")
        response = await relay(request).relay(target, "POST", "/say", "say", json=say.model_dump(exclude_none=True))
        return JSONResponse(response.json(), status_code=response.status_code)

    @app.post("/api/v1/stream/{stream_id}/interrupt", responses={200: {"description": "{interrupted}"}})
    async def stream_interrupt(stream_id: str, request: Request):
        """Stop what is being said: the mouth closes, queued speech is dropped, idle motion goes on."""
        target = stream_target(request, stream_id)
        response = await relay(request).relay(target, "POST", "/interrupt", "interrupt")
        return JSONResponse(response.json(), status_code=response.status_code)

    @app.get("/api/v1/stream/{stream_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}})
    async def stream_events(stream_id: str, request: Request):
        """The session's server-sent events, passed on as they come (EventSource: the token as ?token=)."""
        target = stream_target(request, stream_id)
        pieces = await relay(request).events(target, stopping=request.app.state.shutting_down)
        return EventStream(pieces, media_type="text/event-stream",
                           headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.delete("/api/v1/stream/{stream_id}", status_code=204)
    async def stream_delete(stream_id: str, request: Request):
        """End the session (its viewers' connections close)."""
        target = stream_target(request, stream_id)
        await relay(request).relay(target, "DELETE", "", "end session")
        log.info("stream ended", extra={"stream_id": stream_id, "request_id": request.state.request_id})
        return Response(status_code=204)

    @app.get("/demo", include_in_schema=False)
    def demo_page() -> Response:
        """A page to try a live stream: type text, watch the avatar say it, with the latency measured."""
        html = (_DEMO_DIR / "index.html").read_text(encoding="utf-8")
        html = html.replace("{{API_KEY_REQUIRED}}", "true" if keys else "false")
        return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/demo/demo.js", include_in_schema=False)
    def demo_script() -> Response:
        return FileResponse(_DEMO_DIR / "demo.js", media_type="text/javascript; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/health", response_model=RuntimeHealth, response_model_exclude_none=True)
    async def health(request: Request) -> RuntimeHealth:
        """Always 200 while the process runs. With API keys set, only the status unless the caller sends a key;
        with one (or without keys): the broker, worker, job counts, the first GPU service's URL and health, and
        every GPU service's state as chunk placement sees it."""
        rt = runtime(request)
        rows = await asyncio.to_thread(rt.gpu.report)
        status = "healthy" if all(row["answers"] for row in rows) else "degraded"
        if keys and request.state.owner is None:
            return RuntimeHealth(status=status)
        first = rows[0]
        try:
            counts = await asyncio.to_thread(rt.store.counts)
        except Exception:  # noqa: BLE001 - /health is a liveness probe: a database outage is /ready's to report
            counts, status = None, "degraded"
        return RuntimeHealth(
            status=status, broker=rt.broker_name, worker=rt.worker is not None,
            jobs=counts,
            gpu_service=GPUServiceStatus(url=settings.gpu_urls[0], reachable=first["answers"], health=first["health"]),
            gpu_services=[GPUServicePlacement.model_validate(row) for row in rows],
        )

    @app.get("/ready", responses={200: {"model": RuntimeReady}, 503: {"model": RuntimeReady}})
    async def ready(request: Request):
        """200 when the job store, broker and worker work; reports whether the GPU services are ready too."""
        rt = runtime(request)
        problems = []
        try:
            await asyncio.to_thread(rt.store.ping)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"job database: {type(exc).__name__}")
        try:
            await asyncio.to_thread(rt.outputs.check)
        except StoreUnavailable as exc:
            problems.append(exc.message)
        if settings.run_worker and rt.worker is None:
            problems.append("worker not running")
        if settings.redis_url:
            try:
                await asyncio.to_thread(rt.broker.client.ping)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"redis: {type(exc).__name__}")
        gpu_ready = await asyncio.to_thread(rt.gpu.ready)
        body = RuntimeReady(ready=not problems, gpu_service_ready=any(gpu_ready.values()),
                            gpu_services_ready=gpu_ready, problems=problems)
        return JSONResponse(body.model_dump(), status_code=200 if not problems else 503,
                            headers={} if not problems else {"Retry-After": "1"})

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        """Prometheus text format (runtime/metrics.py lists the families); behind the keys with METRICS_REQUIRE_KEY."""
        return scrape(metrics.registry)

    return app


class EventStream(StreamingResponse):
    """A streamed answer whose source is closed however the stream ends (the client left, the send failed)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def failed_status(error_type: Optional[str]) -> int:
    """HTTP status of a sync submit whose job failed: the GPU service could not generate it (424), could not be
    reached (502), nor could the output store, the runtime broke (500), or the inputs were refused (422)."""
    return {"internal_error": 500, "gpu_service_unavailable": 502, "output_store_unavailable": 502,
            "generation_failed": 424}.get(error_type or "", 422)


async def _prune_forever(rt: Runtime, every_s: float = 600.0) -> None:
    """Remove finished jobs (record and files) older than JOB_TTL_S."""
    while True:
        with contextlib.suppress(Exception):
            for job_id in await asyncio.to_thread(rt.store.expired, time.time() - rt.settings.job_ttl_s):
                await asyncio.to_thread(rt.outputs.remove, job_id)
                await asyncio.to_thread(rt.store.delete, job_id)
        await asyncio.sleep(every_s)


async def _reap_forever(rt: Runtime) -> None:
    """Every lease period, re-send jobs whose worker vanished without recording an outcome, and remove
    chunk files that finished jobs left behind."""
    while True:
        await asyncio.sleep(rt.settings.job_lease_s)
        try:
            await asyncio.to_thread(rt.reap)
            await asyncio.to_thread(rt.sweep_scratch)
        except Exception:  # noqa: BLE001 - the sweep must survive a locked or briefly missing DB
            log.exception("reaper sweep failed")
