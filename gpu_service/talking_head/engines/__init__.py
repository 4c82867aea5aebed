"""The talking-head engines, built (not loaded) by name from the settings."""

from __future__ import annotations

from gpu_service.errors import ConfigurationError
from gpu_service.settings import Settings
from gpu_service.talking_head.protocol import TalkingHeadEngine


def build(name: str, settings: Settings) -> TalkingHeadEngine:
    """Construct the talking-head engine `name` from its settings group."""
    if name == "landmark":
        from gpu_service.talking_head.engines.landmark import LandmarkTalkingHead

        th = settings.talking_head
        return LandmarkTalkingHead(
            cache_dir=settings.avatar_cache_dir, cache_bytes=th.avatar_cache_bytes, max_image_bytes=th.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            presets_dir=settings.preset_avatars_dir, preset=settings.mp4.x264_preset, crf=settings.mp4.crf,
            batch=th.render_batch, dtype=settings.render_dtype,
        )
    raise ConfigurationError(f"unknown talking-head engine {name!r} in VIDEO_ENGINES; known: landmark")
