"""Talking-head orchestration between the router and the engine: inputs, slots, artifacts."""

from __future__ import annotations

import subprocess

import numpy as np

from avatar_contracts.gpu import VideoRequest
from gpu_service.artifacts import ArtifactStore
from gpu_service.audio import decode_audio, decode_base64
from gpu_service.registry import EngineEntry, EngineManager
from gpu_service.errors import BadMedia, ValidationFailed
from gpu_service.settings import Settings
from gpu_service.talking_head.avatars import AvatarRecord
from gpu_service.talking_head.protocol import VideoJob, VideoResult



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


class VideoService:
    """Turns a VideoRequest into an MP4 on the talking-head engine."""

    def __init__(self, manager: EngineManager, settings: Settings, artifacts: ArtifactStore) -> None:
        self.manager = manager
        self.settings = settings
        self.artifacts = artifacts

    def entry(self) -> EngineEntry:
        """The loaded talking-head engine, or a 4xx/503 saying why not."""
        return self.manager.get("video", None)

    def decode_audio(self, raw: bytes, field: str) -> tuple[np.ndarray, int]:
        """Mono float32 audio within the length limit (MP3 through ffmpeg)."""
        if not raw:
            raise BadMedia(f"{field} is empty")
        try:
            return decode_audio(raw, field, 0.05, self.settings.max_video_audio_s)
        except BadMedia as exc:
            if "not a readable audio file" not in exc.message:
                raise
        return decode_audio(_ffmpeg_decode(raw, field), field, 0.05, self.settings.max_video_audio_s)

    async def prepare(self, body: VideoRequest) -> tuple[EngineEntry, VideoJob, str | None]:
        """Validate the request and load its avatar and audio."""
        entry = self.entry()
        engine = entry.engine
        from gpu_service.talking_head.driving import resolve_emotion

        resolve_emotion(body.emotion, body.text)  # an unknown emotion is a 422 before any work
        if (body.avatar_id is None) == (body.avatar_image is None):
            raise ValidationFailed("send exactly one of avatar_id or avatar_image")
        if (body.audio is None) == (body.audio_url is None):
            raise ValidationFailed("send exactly one of audio or audio_url")
        if body.avatar_id is not None:
            enc = await entry.slots.run(engine.avatars.get, body.avatar_id)
            avatar_id = body.avatar_id
        else:
            raw = decode_base64(body.avatar_image, "avatar_image")
            if len(raw) > self.settings.max_image_bytes:
                raise BadMedia(f"avatar_image is {len(raw)} bytes; the limit is {self.settings.max_image_bytes} bytes")
            rec: AvatarRecord = await entry.slots.run(engine.avatars.add, raw)
            enc = await entry.slots.run(engine.avatars.get, rec.avatar_id)
            avatar_id = rec.avatar_id
        if body.audio is not None:
            raw_audio = decode_base64(body.audio, "audio")
            field = "audio"
        else:
            raw_audio = self.artifacts.audio_url_path(body.audio_url).read_bytes()
            field = "audio_url"
        audio, rate = self.decode_audio(raw_audio, field)
        job = VideoJob(
            encoding=enc, audio=audio, sample_rate=rate, fps=body.fps,
            phonemes=[(p.phoneme, p.start_s, p.end_s) for p in body.phonemes] if body.phonemes else None,
            emotion=body.emotion, text=body.text, seed=body.seed, head_motion=body.head_motion,
            include_audio=body.include_audio,
        )
        return entry, job, avatar_id

    async def generate(self, body: VideoRequest) -> tuple[VideoResult, str | None]:
        """Render the request's video on an engine slot."""
        entry, job, avatar_id = await self.prepare(body)
        result = await entry.slots.run(entry.engine.generate, job)
        return result, avatar_id
