"""Lip-sync orchestration between the router and the engine: streamed uploads, validation, slots.

Uploads are parsed from the request stream as they arrive and written to temp files, counting
bytes: a part past its limit is refused (413) before the rest of the body is read, and nothing
larger than a form field is ever held in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import TypeAdapter, ValidationError

from avatar_contracts.checks import check_text
from avatar_contracts.gpu import LENGTH_POLICIES, PhonemeTiming
from gpu_service.artifacts import ArtifactStore
from gpu_service.errors import BadMedia, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from gpu_service.lipsync.protocol import LipSyncEngine, LipSyncJob, LipSyncResult
from gpu_service.lipsync.silence import SILENCE_MODES
from gpu_service.metrics import GpuMetrics
from gpu_service.registry import EngineEntry, EngineRegistry
from gpu_service.settings import Settings
from gpu_service.speech.alignment import timings_for

log = logging.getLogger(__name__)

FILE_FIELDS = ("video", "audio")
TEXT_FIELDS = ("audio_url", "phonemes", "text", "fps", "length_policy", "response", "engine", "face_index", "silence")
FIELD_MAX_BYTES = 1024 * 1024
"""A form field (phoneme JSON included) larger than this is refused."""
DEFAULT_POLICY = "pingpong"
"""Audio longer than the video: play the video forwards then backwards, as users of such tools expect
(no jump cut at the loop point, and a talking head reads naturally in reverse)."""

_PHONEMES = TypeAdapter(list[PhonemeTiming])


@dataclass
class LipSyncForm:
    """The parsed multipart request: text fields and the paths of the uploaded files."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


async def read_multipart(request, folder: Path, limits: dict[str, int]) -> LipSyncForm:
    """Stream a multipart body into `folder`, enforcing each file's byte limit as it is read."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype = request.headers.get("content-type", "")
    kind, params = parse_options_header(ctype)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UnsupportedMediaType(f"Content-Type must be multipart/form-data with a boundary, got {ctype or 'none'!r}")
    form = LipSyncForm()
    part: dict = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, name=None, sink=None, size=0, text=bytearray(), hname=b"", hvalue=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["hvalue"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["hname"].lower()] = part["hvalue"]
        part["hname"], part["hvalue"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode(errors="replace")
        if name in FILE_FIELDS:
            if name in form.files:
                raise ValidationFailed(f"{name} was sent twice")
            path = folder / f"{name}.upload"
            part["sink"] = open(path, "wb")
            form.files[name] = path
        elif name not in TEXT_FIELDS:
            raise ValidationFailed(f"unknown form field {name!r}; known: {', '.join(FILE_FIELDS + TEXT_FIELDS)}")
        part["name"] = name

    def on_part_data(data: bytes, start: int, end: int) -> None:
        name = part["name"]
        part["size"] += end - start
        if part["sink"] is not None:
            if part["size"] > limits[name]:
                raise PayloadTooLarge(f"{name} is larger than {limits[name]} bytes (the limit)")
            part["sink"].write(data[start:end])
        else:
            if part["size"] > FIELD_MAX_BYTES:
                raise PayloadTooLarge(f"form field {name} is larger than {FIELD_MAX_BYTES} bytes")
            part["text"] += data[start:end]

    def on_part_end() -> None:
        name = part["name"]
        if part["sink"] is not None:
            part["sink"].close()
            form.sizes[name] = part["size"]
        elif name is not None:
            # The JSON endpoints' checks, by hand: strict UTF-8 (a surrogate's bytes are not), no NUL or controls.
            try:
                text = bytes(part["text"]).decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationFailed(f"{name} is not valid UTF-8 text") from None
            form.fields[name] = check_text(text, name, speakable=False)

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ValueError as exc:  # python-multipart's parse errors
        raise ValidationFailed(f"malformed multipart body: {exc}") from None
    finally:
        if part.get("sink") is not None and not part["sink"].closed:
            part["sink"].close()
    return form


class LipSyncService:
    """Turns a multipart lip-sync request into an MP4 on the lip-sync engine."""

    def __init__(self, registry: EngineRegistry, settings: Settings, artifacts: ArtifactStore,
                 metrics: Optional[GpuMetrics] = None) -> None:
        self.registry = registry
        self.settings = settings
        self.artifacts = artifacts
        self.metrics = metrics if metrics is not None else GpuMetrics()

    def entry(self, name: Optional[str] = None) -> EngineEntry[LipSyncEngine]:
        """The loaded lip-sync engine, or a 4xx/503 saying why not."""
        return self.registry.lipsync_engine(name)

    @staticmethod
    def face_index(form: LipSyncForm) -> int:
        """The form's face_index (0, the largest face, when absent), or a 422 naming the field."""
        text = form.fields.get("face_index", "").strip()
        if not text:
            return 0
        if not (text.isascii() and text.isdigit()) or int(text) > 63:
            raise ValidationFailed(f"face_index must be a whole number from 0 (the largest face) to 63, got {text[:16]!r}")
        return int(text)

    @staticmethod
    def options(form: LipSyncForm) -> tuple[Optional[float], str, Optional[list]]:
        """fps, length policy and phoneme timings from the form, or a 422 naming the bad field."""
        fps = None
        if form.fields.get("fps", "").strip():
            try:
                fps = float(form.fields["fps"])
            except ValueError:
                raise ValidationFailed(f"fps must be a number, got {form.fields['fps']!r}") from None
            if not 5.0 <= fps <= 60.0:
                raise ValidationFailed(f"fps must be within [5, 60], got {fps:g}")
        policy = form.fields.get("length_policy", "").strip() or DEFAULT_POLICY
        if policy not in LENGTH_POLICIES:
            raise ValidationFailed(f"length_policy must be one of {', '.join(LENGTH_POLICIES)}, got {policy!r}")
        phonemes = None
        if form.fields.get("phonemes", "").strip():
            try:
                items = _PHONEMES.validate_python(json.loads(form.fields["phonemes"]))
            except (json.JSONDecodeError, ValidationError) as exc:
                raise ValidationFailed(
                    f"phonemes must be a JSON list of {{phoneme, start_s, end_s}}: {str(exc).splitlines()[0]}") from None
            phonemes = [(p.phoneme, p.start_s, p.end_s) for p in items]
        return fps, policy, phonemes

    async def generate(self, request) -> tuple[LipSyncResult, str]:
        """Read, validate and re-voice one request -> (result, response kind "mp4" or "json"); temp files always go."""
        from gpu_service.lipsync.stream_io import decode_audio_file, open_video

        s, limits = self.settings, self.settings.lipsync
        tmp_root = s.data_dir / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="lipsync_", dir=tmp_root))
        try:
            self.entry()  # an unavailable engine is refused before the upload is read
            form = await read_multipart(request, folder, {"video": limits.max_video_bytes,
                                                          "audio": limits.max_audio_bytes})
            entry = self.entry(form.fields.get("engine") or None)
            if "video" not in form.files:
                raise ValidationFailed("the form needs a `video` file (MP4, MOV, WebM or MKV)")
            has_audio, has_url = "audio" in form.files, bool(form.fields.get("audio_url", "").strip())
            if has_audio == has_url:
                raise ValidationFailed("send exactly one of `audio` (a file) or `audio_url` (from this service's /tts)")
            for name in form.files:
                if form.sizes.get(name, 0) == 0:
                    raise BadMedia(f"{name} is empty")
            fps, policy, phonemes = self.options(form)
            face_index = self.face_index(form)
            kind = form.fields.get("response", "").strip() or "mp4"
            if kind not in ("mp4", "json"):
                raise ValidationFailed(f"response must be mp4 or json, got {kind!r}")
            silence = form.fields.get("silence", "").strip() or "filmed"
            if silence not in SILENCE_MODES:
                raise ValidationFailed(f"silence must be one of {', '.join(SILENCE_MODES)}, got {silence[:32]!r}")
            audio_path = form.files["audio"] if has_audio else self.artifacts.audio_url_path(form.fields["audio_url"].strip())
            field_name = "audio" if has_audio else "audio_url"
            video = await asyncio.to_thread(open_video, form.files["video"], max_s=limits.max_video_s,
                                            max_pixels=limits.max_pixels, fps=fps)
            audio, rate = await asyncio.to_thread(decode_audio_file, audio_path, field_name, limits.max_audio_s)
            aligning = time.perf_counter()
            phonemes, source = await asyncio.to_thread(timings_for, audio, rate, phonemes,
                                                       form.fields.get("text", "").strip() or None)
            if source != "request":
                self.metrics.observe("align", time.perf_counter() - aligning)
            job = LipSyncJob(video=video, audio=audio, sample_rate=rate, length_policy=policy, phonemes=phonemes,
                             face_index=face_index, timing_source=source, silence=silence)
            log.info("lipsync request", extra={"video_bytes": form.sizes["video"], "size": video.size,
                                               "fps": float(video.fps), "audio_s": round(len(audio) / rate, 3),
                                               "policy": policy, "timing_source": source})
            replica = entry.place()
            result = await replica.slots.run(self.metrics.timed("lipsync", replica.engine.lipsync), job)
            result.timing_source = source
            for stage in ("render", "encode"):
                if stage in result.timings_ms:
                    self.metrics.observe(stage, result.timings_ms[stage] / 1000)
            self.metrics.generated("lipsync")
            return result, kind
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)
