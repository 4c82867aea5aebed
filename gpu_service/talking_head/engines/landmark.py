"""The landmark talking head: avatars + renderer + MP4 assembly, loaded once in the app's lifespan."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from avatar_contracts.media import Background
from gpu_service.engine import EngineHealth
from gpu_service.errors import EngineUnavailable, ValidationFailed
from gpu_service.talking_head.avatars import AvatarStore
from gpu_service.talking_head.controls import Controls
from gpu_service.talking_head.driving import IdleMotion
from gpu_service.talking_head.encoding import Encoding
from gpu_service.talking_head.protocol import AvatarRecord, VideoJob, VideoResult
from gpu_service.talking_head.renderer import Renderer
from gpu_service.talking_head.video import encode_mp4

log = logging.getLogger(__name__)


class LandmarkFrameStream:
    """One avatar rendered block by block; every frame is rendered on its own, so blocks join seamlessly."""

    def __init__(self, renderer: Renderer, enc: Encoding, avatar_id: str, fps: float, head_motion: bool,
                 idle: Optional[IdleMotion] = None) -> None:
        self._renderer = renderer
        self._enc = enc
        self._head_motion = head_motion
        self._idle = idle
        self.avatar_id = avatar_id
        self.fps = float(fps)
        self.size = enc.frame_size
        self.frames_rendered = 0

    def render(self, controls: Controls) -> np.ndarray:
        """(n, H, W, 3) uint8 frames for the next n frames of controls."""
        if abs(float(controls.fps) - self.fps) > 1e-6:
            raise ValidationFailed(f"controls are at {controls.fps:g} fps; this stream renders at {self.fps:g} fps")
        if self._idle is not None:
            controls = self._idle.apply(controls, self.frames_rendered)
        frames = self._renderer.render(self._enc, controls, self._head_motion)
        self.frames_rendered += len(frames)
        return frames


class LandmarkTalkingHead:
    """Landmark-warp talking head: one portrait and speech in, frames or an MP4 out."""

    name = "landmark"

    def __init__(self, *, cache_dir: Path, cache_bytes: int, max_image_bytes: int, presets_dir: Path,
                 max_image_pixels: int = 40_000_000, preset: str = "veryfast", crf: int = 16, batch: int = 16,
                 dtype: str = "auto", avatars: Optional[AvatarStore] = None) -> None:
        self._avatars = avatars or AvatarStore(cache_dir, cache_bytes, max_image_bytes, max_image_pixels)
        self._options = dict(cache_dir=cache_dir, cache_bytes=cache_bytes, max_image_bytes=max_image_bytes,
                             presets_dir=presets_dir, max_image_pixels=max_image_pixels, preset=preset, crf=crf,
                             batch=batch, dtype=dtype)
        self.presets_dir = presets_dir
        self.x264_preset = preset
        self.crf = crf
        self.batch = batch
        self.dtype = dtype
        self.renderer: Optional[Renderer] = None
        self.device = "cpu"
        self.presets: list[str] = []

    def replicate(self) -> "LandmarkTalkingHead":
        """A copy for another device that shares this one's avatars (records and disk cache; each device its own LRU)."""
        return LandmarkTalkingHead(**self._options, avatars=self._avatars)

    # -- lifecycle -------------------------------------------------------------------------
    def load(self, device: str) -> None:
        """Pick the render path for the device and encode every preset avatar (warm in this device's LRU)."""
        self.device = device
        self.renderer = Renderer(device, batch=self.batch, dtype=self.dtype)
        renderer = self.renderer
        self._avatars.on_evict(device, renderer.forget)  # an avatar leaving this device's LRU frees its tensors here
        self.presets = self._avatars.load_presets(self.presets_dir, device)
        log.info("talking head loaded", extra={"device": device, "backend": self.renderer.backend, "presets": self.presets})

    def warmup(self) -> None:
        """Render and encode a few frames of a preset so the first request is not slow."""
        if not self.presets:
            return
        stream = self.open_stream(self.presets[0], 25.0)
        controls = Controls.neutral(5, 25.0)
        controls.mouth_open[:] = np.linspace(0, 1, 5, dtype=np.float32)
        encode_mp4(stream.render(controls), 25, stream.size, preset=self.x264_preset, crf=self.crf)

    def health(self) -> EngineHealth:
        """Loaded once its render path is chosen; reports the device, the path (cv2 or torch) and the device's avatar LRU."""
        if self.renderer is None:
            return EngineHealth.down("not loaded")
        return replace(self.renderer.health(), cache=self._avatars.cache_stats(self.device))

    def cached_bytes(self) -> int:
        """Bytes of the encodings this device holds in memory."""
        return self._avatars.memory_bytes(self.device)

    def is_warm(self, avatar_id: str) -> bool:
        """Whether this device holds the avatar's encoding in memory now."""
        return self._avatars.is_cached(avatar_id, self.device)

    def _require_renderer(self) -> Renderer:
        if self.renderer is None:
            raise EngineUnavailable("talking-head engine 'landmark' is not loaded")
        return self.renderer

    # -- avatars ---------------------------------------------------------------------------
    def add_avatar(self, image: bytes, face_index: Optional[int] = None, background: Optional[Background] = None,
                   field: str = "image") -> AvatarRecord:
        """Encode a portrait once (or find it cached) and register it, warm on this device."""
        return self._avatars.add(image, face_index=face_index, background=background, field=field, device=self.device)

    def list_avatars(self) -> list[AvatarRecord]:
        """Every registered avatar, presets first."""
        return self._avatars.list()

    def get_avatar(self, avatar_id: str) -> AvatarRecord:
        """The record of a registered avatar, or NotFound."""
        return self._avatars.record(avatar_id)

    def delete_avatar(self, avatar_id: str) -> None:
        """Forget an uploaded avatar and its cached encoding; presets cannot be deleted."""
        self._avatars.delete(avatar_id)

    # -- frames ----------------------------------------------------------------------------
    def open_stream(self, avatar_id: str, fps: float, head_motion: bool = True,
                    idle_seed: Optional[int] = None) -> LandmarkFrameStream:
        """A frame stream of a registered avatar (its encoding loaded now, from memory or disk)."""
        idle = None if idle_seed is None else IdleMotion(fps, idle_seed, head_motion, avatar_key=avatar_id)
        return LandmarkFrameStream(self._require_renderer(), self._avatars.get(avatar_id, self.device), avatar_id, fps,
                                   head_motion, idle)

    def _frames(self, stream: LandmarkFrameStream, controls: Controls) -> Iterator[np.ndarray]:
        """A whole clip's frames through the stream, in the render path's natural block size."""
        step = self._require_renderer().block_frames
        for start in range(0, controls.n_frames, step):
            yield from stream.render(controls.slice(start, start + step))

    def generate(self, job: VideoJob) -> VideoResult:
        """Drive controls from the speech, render the frames block by block and encode the MP4 (blocking)."""
        from gpu_service.talking_head.driving import drive, lip_lead

        stream = self.open_stream(job.avatar_id, job.fps, job.head_motion)
        t0 = time.perf_counter()
        duration = len(job.audio) / float(job.sample_rate)
        controls = drive(
            duration, job.fps, phonemes=job.phonemes, audio=job.audio, sample_rate=job.sample_rate,
            emotion=job.emotion, text=job.text, seed=job.seed, head_motion=job.head_motion, avatar_key=job.avatar_id,
            lip_lead_s=lip_lead(job.timing_source),
        )
        t1 = time.perf_counter()
        w, h = stream.size
        mp4, facts = encode_mp4(
            self._frames(stream, controls), job.fps, (w, h),
            audio=job.audio if job.include_audio else None, sample_rate=job.sample_rate,
            preset=self.x264_preset, crf=self.crf,
        )
        t2 = time.perf_counter()
        timings = {
            "drive": (t1 - t0) * 1000,
            "first_frame": (t1 - t0) * 1000 + facts["first_frame_ms"],
            "render_encode": (t2 - t1) * 1000,
            "render": facts["frames_ms"],
            "encode": facts["encode_ms"],
            "total": (t2 - t0) * 1000,
        }
        return VideoResult(mp4, facts["frames"], job.fps, w, h, controls.n_frames / job.fps,
                           {k: round(v, 2) for k, v in timings.items()}, avatar_id=job.avatar_id, device=self.device)
