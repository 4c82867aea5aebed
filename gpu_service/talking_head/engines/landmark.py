"""The talking-head engine: avatars + renderer + MP4 assembly, loaded once in the app's lifespan."""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from gpu_service.talking_head.avatars import AvatarStore
from gpu_service.talking_head.protocol import VideoJob, VideoResult
from gpu_service.talking_head.renderer import Renderer
from gpu_service.talking_head.video import encode_mp4

log = logging.getLogger(__name__)


class TalkingHeadEngine:
    """Landmark-warp talking head: one portrait and speech in, an MP4 out."""

    name = "landmark"

    def __init__(self, *, cache_dir, cache_bytes: int, max_image_bytes: int, presets_dir, preset: str = "veryfast",
                 crf: int = 16, batch: int = 16) -> None:
        self.avatars = AvatarStore(cache_dir, cache_bytes, max_image_bytes)
        self.presets_dir = presets_dir
        self.x264_preset = preset
        self.crf = crf
        self.batch = batch
        self.renderer: Optional[Renderer] = None
        self.device = "cpu"
        self.presets: list[str] = []

    def load(self, device: str) -> None:
        """Pick the render path for the device and encode every preset avatar."""
        self.device = device
        self.renderer = Renderer(device, batch=self.batch)
        self.presets = self.avatars.load_presets(self.presets_dir)
        log.info("talking head loaded", extra={"device": device, "backend": self.renderer.backend, "presets": self.presets})

    def warmup(self) -> None:
        """Render and encode a few frames of a preset so the first request is not slow."""
        if not self.presets:
            return
        from gpu_service.talking_head.controls import Controls

        enc = self.avatars.get(self.presets[0])
        controls = Controls.neutral(5, 25.0)
        controls.mouth_open[:] = np.linspace(0, 1, 5, dtype=np.float32)
        h, w = enc.image.shape[:2]
        encode_mp4(self.renderer.frames(enc, controls), 25, (w, h), preset=self.x264_preset, crf=self.crf)

    def health(self) -> dict:
        """Engine facts for /health."""
        return {"available": self.renderer is not None, "loaded": self.renderer is not None, "voices": [], "languages": []}

    def generate(self, job: VideoJob) -> VideoResult:
        """Drive controls from the speech, render the frames and encode the MP4 (blocking)."""
        from gpu_service.talking_head.driving import drive

        t0 = time.perf_counter()
        duration = len(job.audio) / float(job.sample_rate)
        controls = drive(
            duration, job.fps, phonemes=job.phonemes, audio=job.audio, sample_rate=job.sample_rate,
            emotion=job.emotion, text=job.text, seed=job.seed, head_motion=job.head_motion,
        )
        t1 = time.perf_counter()
        enc = job.encoding
        h, w = enc.image.shape[:2]
        mp4, facts = encode_mp4(
            self.renderer.frames(enc, controls, job.head_motion), job.fps, (w, h),
            audio=job.audio if job.include_audio else None, sample_rate=job.sample_rate,
            preset=self.x264_preset, crf=self.crf,
        )
        t2 = time.perf_counter()
        timings = {
            "drive": (t1 - t0) * 1000,
            "first_frame": (t1 - t0) * 1000 + facts["first_frame_ms"],
            "render_encode": (t2 - t1) * 1000,
            "total": (t2 - t0) * 1000,
        }
        return VideoResult(mp4, facts["frames"], job.fps, w, h, controls.n_frames / job.fps,
                           {k: round(v, 2) for k, v in timings.items()})
