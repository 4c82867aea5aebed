"""Talking-head orchestration between the router and the engine: inputs, slots, artifacts."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Optional
import time

import numpy as np

from avatar_contracts.gpu import VideoRequest
from avatar_contracts.media import Background, decode_base64, parse_background
from gpu_service.artifacts import ArtifactStore
from gpu_service.audio import decode_audio
from gpu_service.errors import BadMedia, ValidationFailed
from gpu_service.metrics import GpuMetrics
from gpu_service.registry import EngineEntry, EngineRegistry
from gpu_service.settings import Settings
from gpu_service.talking_head.encoding import check_image
from gpu_service.talking_head.portrait import background_pixels
from gpu_service.speech.alignment import timings_for
from gpu_service.talking_head.protocol import AvatarRecord, TalkingHeadEngine, VideoJob, VideoResult


def _ffmpeg_decode(raw: bytes, field: str) -> bytes:
    """MP3 (or any format ffmpeg reads) to WAV bytes, for what libsndfile cannot read."""
    from gpu_service.talking_head.video import ffmpeg_exe

    res = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-ac", "1", "-f", "wav", "pipe:1"],
        input=raw, capture_output=True, timeout=60,
    )
    if res.returncode != 0 or len(res.stdout) <= 44:
        raise BadMedia(f"{field} is not a readable audio file (WAV, FLAC, OGG or MP3 expected)")
    return res.stdout


class TalkingHeadService:
    """Avatars and MP4s on the talking-head engine, through its slots."""

    def __init__(self, registry: EngineRegistry, settings: Settings, artifacts: ArtifactStore,
                 metrics: Optional[GpuMetrics] = None) -> None:
        self.registry = registry
        self.settings = settings
        self.artifacts = artifacts
        self.metrics = metrics if metrics is not None else GpuMetrics()

    def entry(self) -> EngineEntry[TalkingHeadEngine]:
        """The loaded talking-head engine, or a 4xx/503 saying why not."""
        return self.registry.talking_head_engine()

    async def add_avatar(self, raw: bytes, field: str = "image", face_index: Optional[int] = None,
                         background: Optional[Background] = None) -> AvatarRecord:
        """Encode and register a portrait on an engine slot; its size and pixel count are checked from its
        header first, so a bad or oversized image never waits for a slot (nor a bomb gets decoded)."""
        check_image(raw, self.settings.talking_head.max_image_bytes, self.settings.max_image_pixels, field)
        replica = self.entry().place()
        return await replica.slots.run(replica.engine.add_avatar, raw, face_index, background, field)

    def background(self, value: Optional[str], field: str = "background") -> Optional[Background]:
        """A request's background checked whole (blocking: base64, header, and an image decoded once), so a
        bad one is a 422 naming `field` before any slot is taken, even for a portrait it would not touch."""
        if value is None:
            return None
        limits = self.settings.talking_head.max_image_bytes, self.settings.max_image_pixels
        bg = parse_background(value, *limits, field=field)
        if bg.image is not None:
            background_pixels(bg, (64, 64), *limits, field=field)
        return bg

    def list_avatars(self) -> list[AvatarRecord]:
        """Every registered avatar, presets first."""
        return self.entry().engine.list_avatars()

    async def delete_avatar(self, avatar_id: str) -> None:
        """Forget an uploaded avatar on an engine slot (the avatars are shared: any replica's will do)."""
        replica = self.entry().place()
        await replica.slots.run(replica.engine.delete_avatar, avatar_id)

    def decode_audio(self, raw: bytes, field: str) -> tuple[np.ndarray, int]:
        """Mono float32 audio within the length limit (MP3 through ffmpeg)."""
        if not raw:
            raise BadMedia(f"{field} is empty")
        max_s = self.settings.talking_head.max_audio_s
        try:
            return decode_audio(raw, field, 0.05, max_s)
        except BadMedia as exc:
            if "not a readable audio file" not in exc.message:
                raise
        return decode_audio(_ffmpeg_decode(raw, field), field, 0.05, max_s)

    def request_audio(self, body: VideoRequest) -> tuple[np.ndarray, int]:
        """The request's audio (base64, or this service's artifact) decoded (blocking)."""
        if body.audio is not None:
            return self.decode_audio(decode_base64(body.audio, "audio"), "audio")
        return self.decode_audio(self.artifacts.audio_url_path(body.audio_url).read_bytes(), "audio_url")

    async def prepare(self, body: VideoRequest) -> tuple[EngineEntry[TalkingHeadEngine], VideoJob]:
        """Validate the request, register or look up its avatar and decode its audio."""
        entry = self.entry()
        from gpu_service.talking_head.driving import resolve_emotion

        resolve_emotion(body.emotion, body.text)  # an unknown emotion is a 422 before any work
        if (body.avatar_id is None) == (body.avatar_image is None):
            raise ValidationFailed("send exactly one of avatar_id or avatar_image")
        if (body.audio is None) == (body.audio_url is None):
            raise ValidationFailed("send exactly one of audio or audio_url")
        if body.avatar_id is not None and (body.background is not None or body.face_index is not None):
            given = " and ".join(n for n in ("background", "face_index") if getattr(body, n) is not None)
            raise ValidationFailed(f"{given} {'apply' if ' and ' in given else 'applies'} to avatar_image; an avatar_id names a portrait already encoded "
                                   f"(upload it again to POST /avatars with them)")
        # Base64 and audio decoding, and reading an artifact, run in threads: a large upload must not stall the loop.
        if body.avatar_id is not None:
            record = entry.engine.get_avatar(body.avatar_id)
        else:
            raw = await asyncio.to_thread(decode_base64, body.avatar_image, "avatar_image",
                                          self.settings.talking_head.max_image_bytes)
            background = await asyncio.to_thread(self.background, body.background)
            record = await self.add_avatar(raw, field="avatar_image", face_index=body.face_index, background=background)
        audio, rate = await asyncio.to_thread(self.request_audio, body)
        job = VideoJob(
            avatar_id=record.avatar_id, audio=audio, sample_rate=rate, fps=body.fps,
            phonemes=[(p.phoneme, p.start_s, p.end_s) for p in body.phonemes] if body.phonemes else None,
            emotion=body.emotion, text=body.text, seed=body.seed, head_motion=body.head_motion,
            include_audio=body.include_audio,
        )
        return entry, job

    async def generate(self, body: VideoRequest) -> VideoResult:
        """Render the request's video on a slot of the replica placement picks; audio without phonemes is aligned first."""
        entry, job = await self.prepare(body)
        started = time.perf_counter()
        job.phonemes, source = await asyncio.to_thread(timings_for, job.audio, job.sample_rate, job.phonemes, job.text)
        job.timing_source = source
        align_ms = (time.perf_counter() - started) * 1000
        # Placed now, right before the slot is taken: least-loaded reads the counts as they are.
        replica = entry.place(prefer=lambda engine: engine.is_warm(job.avatar_id))
        result = await replica.slots.run(replica.engine.generate, job)
        result.timing_source = source
        if source != "request":
            result.timings_ms["align"] = round(align_ms, 2)
            self.metrics.observe("align", align_ms / 1000)
        for stage in ("render", "encode"):
            if stage in result.timings_ms:
                self.metrics.observe(stage, result.timings_ms[stage] / 1000)
        self.metrics.generated("video")
        return result
