"""The GPU service's one settings object, read from the environment (and `.env`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the GPU service; the environment variable is the field name in capitals."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False, use_attribute_docstrings=True)

    host: str = Field(default="127.0.0.1")
    """Interface to listen on. 127.0.0.1 is safe by default; use 0.0.0.0 on a remote GPU VM."""

    port: int = Field(default=8001, ge=1, le=65535)
    """TCP port of the service."""

    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """Compute device: auto picks CUDA, else MPS, else CPU. A forced device that is absent fails at start."""

    avatar_model_dir: Path = Field(default=_REPO_ROOT / "models")
    """Directory holding optional model weights (e.g. `xtts_v2/`). Nothing is downloaded into it."""

    preset_avatars_dir: Path = Field(default=_REPO_ROOT / "preset_avatars")
    """Each subfolder is one preset avatar; its id is the folder name."""

    data_dir: Path = Field(default=_REPO_ROOT / ".data" / "gpu_service")
    """Working directory for generated artifacts and caches."""

    tts_engines: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["piper", "xtts"])
    """Speech engines to configure. An engine whose weights are missing is reported unavailable, not fatal."""

    default_tts_engine: str = "piper"
    """Engine used when a request names none."""

    piper_voice_path: Path | None = None
    """Piper ONNX voice to load instead of the bundled en_US-joe-medium (its .onnx.json beside it)."""

    piper_noise_scale: float | None = Field(default=None, ge=0, le=2)
    """Piper's voice-quality sampling noise; unset keeps the voice's own (0.667 for the bundled one)."""

    piper_noise_w_scale: float | None = Field(default=None, ge=0, le=2)
    """Piper's phoneme-duration sampling noise; unset keeps the voice's own (0.8). At 0 the same
    text always gets the same timing (set both to 0 for byte-identical speech on one machine)."""

    xtts_model_subdir: str = "xtts_v2"
    """Subdirectory of avatar_model_dir with XTTS-v2's config.json, model.pth and vocab.json."""

    max_text_chars: int = Field(default=5000, ge=1, le=100_000)
    """Longest text accepted by /tts; longer is a 422 naming the limit."""

    max_request_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """Largest request body accepted (base64 media included); larger is a 413."""

    speaker_wav_min_s: float = Field(default=1.0, gt=0, le=60)
    """Shortest voice-cloning clip accepted."""

    speaker_wav_max_s: float = Field(default=30.0, gt=0, le=600)
    """Longest voice-cloning clip accepted."""

    engine_slots: int = Field(default=1, ge=1, le=64)
    """Requests one engine runs at the same time (each in a worker thread)."""

    engine_queue: int = Field(default=16, ge=0, le=10_000)
    """Requests that may wait for a slot; past that the service answers 429 with Retry-After."""

    artifact_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024, le=1024**4)
    """Budget for generated media kept on disk; the oldest are removed past it."""

    artifact_ttl_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    """Age after which a generated artifact is removed (its URL then answers 404)."""

    warmup: bool = True
    """Run one real inference per engine before /ready turns 200."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the structured (JSON) logs."""

    video_engines: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["landmark"])
    """Talking-head engines to configure (empty disables /video and /avatars)."""

    avatar_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=16 * 1024 * 1024, le=64 * 1024**3)
    """Memory budget for encoded avatars; the least recently used leave first (they stay on disk)."""

    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=64 * 1024, le=100 * 1024 * 1024)
    """Largest portrait accepted (upload or base64); larger is a 422 naming the limit."""

    max_video_audio_s: float = Field(default=300.0, gt=0, le=3600)
    """Longest audio a video may be made for; longer is a 422."""

    video_x264_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "veryfast"
    """libx264 speed/size trade-off of generated videos."""

    video_crf: int = Field(default=16, ge=0, le=51)
    """libx264 constant rate factor (lower is better quality, bigger files). 16 keeps the lip seam of a
    closed mouth crisp enough that face trackers (and viewers) read it as closed after compression."""

    video_render_batch: int = Field(default=16, ge=1, le=256)
    """Frames rendered per torch call on CUDA/MPS."""

    lipsync_engines: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["landmark"])
    """Lip-sync engines to configure, comma separated (empty disables /lipsync)."""

    lipsync_max_video_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024, le=16 * 1024**3)
    """Largest video upload to /lipsync/generate; enforced while the upload streams to a temp file (413)."""

    lipsync_max_audio_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024, le=1024**3)
    """Largest audio upload to /lipsync/generate (413 past it)."""

    lipsync_max_video_s: float = Field(default=600.0, gt=0, le=4 * 3600)
    """Longest input video accepted by /lipsync (422 past it). Work is streamed, so memory does not grow with it."""

    lipsync_max_audio_s: float = Field(default=600.0, gt=0, le=4 * 3600)
    """Longest new audio accepted by /lipsync; it sets the output length (422 past it)."""

    lipsync_max_pixels: int = Field(default=1920 * 1080, ge=64 * 64, le=3840 * 2160)
    """Most pixels per input frame (1080p by default); larger videos are a 422 naming the size."""

    @field_validator("lipsync_engines", mode="before")
    @classmethod
    def _split_lipsync_csv(cls, value: object) -> object:
        """Accept `LIPSYNC_ENGINES=landmark` as well as a JSON list."""
        if isinstance(value, str) and not value.strip().startswith("["):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def lipsync_max_request_bytes(self) -> int:
        """Body limit of /lipsync requests: both uploads plus room for the form fields."""
        return self.lipsync_max_video_bytes + self.lipsync_max_audio_bytes + 1024 * 1024

    @field_validator("tts_engines", "video_engines", "lipsync_engines", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        """Accept `TTS_ENGINES=piper,xtts` as well as a JSON list."""
        if isinstance(value, str) and not value.strip().startswith("["):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def artifacts_dir(self) -> Path:
        """Where generated media waits to be fetched."""
        return self.data_dir / "artifacts"

    @property
    def avatar_cache_dir(self) -> Path:
        """Where avatar encodings are cached as npz, keyed by image hash."""
        return self.data_dir / "avatars"

    @property
    def xtts_dir(self) -> Path:
        """Where the XTTS-v2 weights are looked for."""
        return self.avatar_model_dir / self.xtts_model_subdir


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings` and pass it to `create_app`."""
    return Settings()
