"""The speech engines, built (not loaded) by name from the settings."""

from __future__ import annotations

from gpu_service.errors import ConfigurationError
from gpu_service.settings import Settings
from gpu_service.speech.protocol import SpeechEngine


def build(name: str, settings: Settings) -> SpeechEngine:
    """Construct the speech engine `name` from its settings group."""
    if name == "piper":
        from gpu_service.speech.engines.piper import PiperEngine

        return PiperEngine(
            voice_path=settings.piper.voice_path,
            extra_voice_dir=settings.avatar_model_dir / "piper",
            noise_scale=settings.piper.noise_scale,
            noise_w_scale=settings.piper.noise_w_scale,
        )
    if name == "xtts":
        from gpu_service.speech.engines.xtts import XttsEngine

        return XttsEngine(model_dir=settings.xtts_dir, model_dir_label=f"$AVATAR_MODEL_DIR/{settings.xtts.model_subdir}")
    raise ConfigurationError(f"unknown speech engine {name!r} in TTS_ENGINES; known: piper, xtts")
