"""The lip-sync engines, built (not loaded) by name from the settings."""

from __future__ import annotations

from gpu_service.errors import ConfigurationError
from gpu_service.lipsync.protocol import LipSyncEngine
from gpu_service.settings import Settings


def build(name: str, settings: Settings) -> LipSyncEngine:
    """Construct the lip-sync engine `name` from its settings group."""
    if name == "landmark":
        from gpu_service.lipsync.engines.landmark import LandmarkLipSync

        return LandmarkLipSync(preset=settings.lipsync.x264_preset, crf=settings.mp4.crf,
                               x264_params=settings.lipsync.x264_params, dtype=settings.render_dtype)
    raise ConfigurationError(f"unknown lip-sync engine {name!r} in LIPSYNC_ENGINES; known: landmark")
