"""The GPU service's one settings object, read from the environment (and `.env`).

Service-wide knobs are top-level (`PORT`, `DEVICE`, `TTS_ENGINES`, ...); each engine's own
knobs sit in a nested group reached with a double underscore (`PIPER__NOISE_SCALE`,
`TALKING_HEAD__RENDER_BATCH`, `LIPSYNC__MAX_VIDEO_S`, `MP4__CRF`). The flat names of earlier
releases (`PIPER_NOISE_SCALE`, `VIDEO_RENDER_BATCH`, ...) are still read, below the nested ones.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

_REPO_ROOT = Path(__file__).resolve().parent.parent

SpeechEngineName = Literal["piper", "xtts"]
TalkingHeadEngineName = Literal["landmark"]
LipSyncEngineName = Literal["landmark"]


class _Group(BaseModel):
    """A nested settings group: unknown keys are refused, every field documented under it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class PiperSettings(_Group):
    """The Piper speech engine (`PIPER__*`)."""

    voice_path: Path | None = None
    """Piper ONNX voice to load instead of the bundled en_US-joe-medium (its .onnx.json beside it)."""

    noise_scale: float | None = Field(default=None, ge=0, le=2)
    """Piper's voice-quality sampling noise; unset keeps the voice's own (0.667 for the bundled one)."""

    noise_w_scale: float | None = Field(default=None, ge=0, le=2)
    """Piper's phoneme-duration sampling noise; unset keeps the voice's own (0.8). At 0 the same
    text always gets the same timing (set both to 0 for byte-identical speech on one machine)."""


class XttsSettings(_Group):
    """The optional XTTS-v2 speech engine (`XTTS__*`)."""

    model_subdir: str = "xtts_v2"
    """Subdirectory of avatar_model_dir with XTTS-v2's config.json, model.pth and vocab.json."""


class TalkingHeadSettings(_Group):
    """The talking-head engine and /video, /avatars (`TALKING_HEAD__*`)."""

    avatar_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=16 * 1024 * 1024, le=64 * 1024**3)
    """Memory budget for encoded avatars, per device (each device keeps the avatars it rendered last, with their
    render layout); the least recently used leave first (they stay on disk)."""

    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=64 * 1024, le=100 * 1024 * 1024)
    """Largest portrait accepted (upload or base64); larger is a 422 naming the limit."""

    max_audio_s: float = Field(default=300.0, gt=0, le=3600)
    """Longest audio a video may be made for; longer is a 422."""

    render_batch: int = Field(default=16, ge=1, le=256)
    """Frames rendered per torch call on CUDA/MPS."""


_X264_OPTION = r"[a-z][a-z0-9-]*=[A-Za-z0-9.,_-]+"
"""One libx264 option as -x264-params takes it: key=value."""


class LipSyncSettings(_Group):
    """The lip-sync engine and /lipsync (`LIPSYNC__*`)."""

    max_video_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024, le=16 * 1024**3)
    """Largest video upload to /lipsync/generate; enforced while the upload streams to a temp file (413)."""

    max_audio_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024, le=1024**3)
    """Largest audio upload to /lipsync/generate (413 past it)."""

    max_video_s: float = Field(default=600.0, gt=0, le=4 * 3600)
    """Longest input video accepted by /lipsync (422 past it). Work is streamed, so memory does not grow with it."""

    max_audio_s: float = Field(default=600.0, gt=0, le=4 * 3600)
    """Longest new audio accepted by /lipsync; it sets the output length (422 past it)."""

    max_pixels: int = Field(default=1920 * 1080, ge=64 * 64, le=3840 * 2160)
    """Most pixels per input frame (1080p by default); larger videos are a 422 naming the size."""

    x264_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "superfast"
    """libx264 preset of re-voiced videos (their CRF is MP4__CRF). A re-voiced frame is mostly the source's
    own pixels: superfast with veryfast's macroblock tree (`x264_params`) encoded a 720p re-voice with 40% less
    CPU than veryfast, for 5% more bytes and 0.1 dB less PSNR (whole frame and mouth) at CRF 16."""

    x264_params: str = Field(default="mbtree=1:rc-lookahead=10", pattern=rf"^({_X264_OPTION}(:{_X264_OPTION})*)?$")
    """Extra libx264 options for re-voiced videos, `key=value:key=value` (empty for the preset's own)."""

    @property
    def max_request_bytes(self) -> int:
        """Body limit of /lipsync requests: both uploads plus room for the form fields."""
        return self.max_video_bytes + self.max_audio_bytes + 1024 * 1024


class Mp4Settings(_Group):
    """How generated MP4s are encoded, by the talking head and lip-sync alike (`MP4__*`)."""

    x264_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "veryfast"
    """libx264 speed/size trade-off of generated videos."""

    crf: int = Field(default=16, ge=0, le=51)
    """libx264 constant rate factor (lower is better quality, bigger files). 16 keeps the lip seam of a
    closed mouth crisp enough that face trackers (and viewers) read it as closed after compression."""


_ICE_URL = re.compile(r"^(stun|stuns|turn|turns):[^\s?]+(\?transport=(udp|tcp))?$")
"""A STUN/TURN URL as RFC 7064/7065 write them (aiortc parses them once more when it connects)."""


class IceServer(BaseModel):
    """One STUN or TURN server of STREAM_ICE_SERVERS."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(min_length=1)
    username: str | None = None
    credential: str | None = None

    @field_validator("urls", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        """A single URL or a list of them."""
        return [value] if isinstance(value, str) else value

    @field_validator("urls")
    @classmethod
    def _ice_urls(cls, value: list[str]) -> list[str]:
        """Each a stun:, stuns:, turn: or turns: URL."""
        for url in value:
            if not _ICE_URL.match(url):
                raise ValueError(f"{url!r} is not a stun:, stuns:, turn: or turns: URL")
        return value


def _ice_server_list(value: object) -> object:
    """STREAM_ICE_SERVERS as a list of IceServer inputs: a JSON list, or a comma list of URLs."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list of ICE servers ({exc.msg})") from None
        else:
            return [{"urls": [item.strip()]} for item in text.split(",") if item.strip()]
    if isinstance(value, list):
        return [{"urls": item} if isinstance(item, str) else item for item in value]
    return value


class StreamSettings(_Group):
    """Real-time streaming sessions, /stream/sessions (`STREAM__*`, or the flat `STREAM_*` names)."""

    max_sessions: int = Field(default=4, ge=0, le=1024)
    """Streaming sessions open at once (each renders on its own thread, outside the engine slots); one more
    is a 429 with Retry-After. 0 turns streaming off."""

    idle_timeout_s: float = Field(default=60.0, gt=0, le=24 * 3600)
    """A session ends this long after its last viewer and listener left (a session nobody ever watched, this
    long after it was made)."""

    render_ahead_frames: int = Field(default=2, ge=1, le=25)
    """Frames a session renders before their time, to ride out a slow frame; a change of sound (interrupt,
    new speech) re-renders them, so they add no latency to it."""

    audio_lookahead_ms: float = Field(default=100.0, ge=0, le=500)
    """Pushed PCM (WS /audio, LiveKit) plays this late so the mouth can see its sound coming and open in time."""

    viewer_buffer_ticks: int = Field(default=8, ge=1, le=250)
    """Ticks a slow viewer may fall behind before its oldest are dropped (that viewer's only)."""

    max_size: int = Field(default=2048, ge=64, le=4096)
    """Largest width or height a session's `size` may ask for."""

    ice_servers: Annotated[list[IceServer], NoDecode] = Field(default_factory=list)
    """STUN/TURN servers offered to WebRTC viewers' connections: a comma list of URLs
    (`stun:stun.example.org:3478,turn:turn.example.org?transport=tcp`) or a JSON list of URLs or of
    `{"urls": ..., "username": ..., "credential": ...}` (TURN needs the latter). Empty (the default): host
    candidates only, nothing is contacted. aiortc uses the first STUN and the first TURN server of the list."""

    ice_loopback: bool = False
    """Also gather ICE host candidates on 127.0.0.1 (aioice skips loopback): for a viewer on the same host,
    such as a browser test in a network namespace with only `lo` up. Added anyway when no other interface exists."""

    video_codecs: Annotated[list[Literal["h264", "vp8"]], NoDecode] = Field(
        default_factory=lambda: ["h264", "vp8"], min_length=1)
    """Video codecs offered to WebRTC viewers, most preferred first (`h264,vp8`); a viewer that has none of them
    gets a 422."""

    video_bitrate: int = Field(default=2_000_000, ge=500_000, le=3_000_000)
    """Starting video bitrate of each WebRTC viewer in bit/s (aiortc then follows the viewer's REMB estimate,
    within 0.5-3 Mbps for H.264, 0.25-1.5 Mbps for VP8)."""

    x264_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "veryfast"
    """libx264 preset of WebRTC viewers' H.264 (one encoder per viewer, one thread each). At a fixed bitrate,
    veryfast took 2.5 ms of CPU a frame at 256x256 and 6.3 ms at 512x512 here, medium (aiortc's) 10 and 16."""

    max_viewers: int = Field(default=8, ge=1, le=256)
    """WebRTC viewers one stream session may have at once (each has its own encoder); past it a 429."""

    connect_timeout_s: float = Field(default=20.0, ge=1, le=300)
    """A WebRTC viewer whose connection is not up this long after its offer is closed (and its subscription)."""

    @field_validator("ice_servers", mode="before")
    @classmethod
    def _split_ice_servers(cls, value: object) -> object:
        """Accept a comma list of URLs as well as a JSON list."""
        return _ice_server_list(value)

    @field_validator("video_codecs", mode="before")
    @classmethod
    def _split_codecs(cls, value: object) -> object:
        """`h264,vp8` or a JSON list, names in any case."""
        value = _engine_list(value)
        return [v.lower() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "piper_voice_path": ("piper", "voice_path"),
    "piper_noise_scale": ("piper", "noise_scale"),
    "piper_noise_w_scale": ("piper", "noise_w_scale"),
    "xtts_model_subdir": ("xtts", "model_subdir"),
    "avatar_cache_bytes": ("talking_head", "avatar_cache_bytes"),
    "max_image_bytes": ("talking_head", "max_image_bytes"),
    "max_video_audio_s": ("talking_head", "max_audio_s"),
    "video_render_batch": ("talking_head", "render_batch"),
    "video_x264_preset": ("mp4", "x264_preset"),
    "video_crf": ("mp4", "crf"),
    "lipsync_max_video_bytes": ("lipsync", "max_video_bytes"),
    "lipsync_max_audio_bytes": ("lipsync", "max_audio_bytes"),
    "lipsync_max_video_s": ("lipsync", "max_video_s"),
    "lipsync_max_audio_s": ("lipsync", "max_audio_s"),
    "lipsync_max_pixels": ("lipsync", "max_pixels"),
    "stream_max_sessions": ("stream", "max_sessions"),
    "stream_idle_timeout_s": ("stream", "idle_timeout_s"),
    "stream_render_ahead_frames": ("stream", "render_ahead_frames"),
    "stream_audio_lookahead_ms": ("stream", "audio_lookahead_ms"),
    "stream_viewer_buffer_ticks": ("stream", "viewer_buffer_ticks"),
    "stream_max_size": ("stream", "max_size"),
    "stream_ice_servers": ("stream", "ice_servers"),
    "stream_ice_loopback": ("stream", "ice_loopback"),
    "stream_video_codecs": ("stream", "video_codecs"),
    "stream_video_bitrate": ("stream", "video_bitrate"),
    "stream_max_viewers": ("stream", "max_viewers"),
    "stream_x264_preset": ("stream", "x264_preset"),
    "stream_connect_timeout_s": ("stream", "connect_timeout_s"),
}
"""Flat environment names of earlier releases -> (group, field) of the nested settings (and the flat
`STREAM_*` names the streaming design uses, beside `STREAM__*`)."""


class _LegacyNames(PydanticBaseSettingsSource):
    """Reads the flat names of LEGACY_NAMES from the environment and `.env`, into their nested groups."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Unused: __call__ reads every legacy name at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, str] = {}
        env_file = self.config.get("env_file")
        if env_file and Path(env_file).is_file():
            from dotenv import dotenv_values

            found.update({k.lower(): v for k, v in dotenv_values(env_file).items() if v is not None})
        found.update({k.lower(): v for k, v in os.environ.items()})
        out: dict[str, dict[str, str]] = {}
        for flat, (group, name) in LEGACY_NAMES.items():
            if flat in found:
                out.setdefault(group, {})[name] = found[flat]
        return out


def _engine_list(value: object) -> object:
    """`piper,xtts`, `piper` or a JSON list (`["piper", "xtts"]`) as a list of names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list of engine names ({exc.msg})") from None
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the GPU service; the environment variable is the field name in capitals."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False,
                                      use_attribute_docstrings=True, env_nested_delimiter="__")

    host: str = Field(default="127.0.0.1")
    """Interface to listen on. 127.0.0.1 is safe by default; use 0.0.0.0 on a remote GPU VM."""

    port: int = Field(default=8001, ge=1, le=65535)
    """TCP port of the service."""

    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """Compute device: auto picks CUDA, else MPS, else CPU. A forced device that is absent fails at start."""

    devices: str = "auto"
    """Devices the engines run on: auto (every visible CUDA device of DEVICE's choice, else MPS, else the CPU) or a
    list such as `cuda:0,cuda:1` (or `cpu:0,cpu:1`: CPU replicas, for testing placement). Engines that run on a
    device (talking head, lip-sync, XTTS) get one replica per device, each with ENGINE_SLOTS slots; Piper runs once."""

    placement: Literal["least_loaded", "round_robin"] = "least_loaded"
    """How a request picks among an engine's replicas: the one with the fewest running and waiting calls per slot
    (ties: the one holding the request's avatar, then in turn), or each in turn."""

    render_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Precision of the torch render path (talking head and lip-sync on CUDA/MPS): auto is float16 there (bfloat16
    where the device has no float16 kernels) and float32 on the CPU. Sampling positions and the mouth's shading
    stay float32 whatever is chosen."""

    avatar_model_dir: Path = Field(default=_REPO_ROOT / "models")
    """Directory holding optional model weights (e.g. `xtts_v2/`) and their record (`manifest.json`).
    Filled by `python -m gpu_service models fetch`; the service itself never downloads into it."""

    model_verify: Literal["off", "size", "sha256"] = "size"
    """Check an engine's weight files against its manifest before loading them: sizes (fast), sizes and
    sha256 (reads every byte), or off (weights of your own). A file that fails is not loaded."""

    model_manifests_dir: Path = Field(default=_REPO_ROOT / "gpu_service" / "models" / "manifests")
    """Where the engines' weight manifests (`<engine>.json`: name, size, sha256, url of each file) are read from."""

    preset_avatars_dir: Path = Field(default=_REPO_ROOT / "preset_avatars")
    """Each subfolder is one preset avatar; its id is the folder name."""

    data_dir: Path = Field(default=_REPO_ROOT / ".data" / "gpu_service")
    """Working directory for generated artifacts and caches."""

    tts_engines: Annotated[list[SpeechEngineName], NoDecode] = Field(default_factory=lambda: ["piper", "xtts"])
    """Speech engines to configure (`piper,xtts` or a JSON list). An engine whose weights are missing is
    reported unavailable, not fatal."""

    default_tts_engine: SpeechEngineName = "piper"
    """Engine used when a request names none; it must be one of tts_engines."""

    video_engines: Annotated[list[TalkingHeadEngineName], NoDecode] = Field(default_factory=lambda: ["landmark"])
    """Talking-head engines to configure (empty disables /video and /avatars)."""

    lipsync_engines: Annotated[list[LipSyncEngineName], NoDecode] = Field(default_factory=lambda: ["landmark"])
    """Lip-sync engines to configure (empty disables /lipsync)."""

    max_text_chars: int = Field(default=5000, ge=1, le=100_000)
    """Longest text accepted by /tts; longer is a 422 naming the limit."""

    max_request_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """Largest request body accepted (base64 media included); larger is a 413."""

    max_image_pixels: int = Field(default=40_000_000, ge=64 * 64, le=1_000_000_000)
    """Most pixels (width x height) of a portrait (POST /avatars, avatar_image, presets), read from its header
    before anything decodes it: a 1 MB PNG can claim 30000x30000 pixels. More is a 422 naming the size."""

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

    piper: PiperSettings = Field(default_factory=PiperSettings)
    """The Piper speech engine (`PIPER__VOICE_PATH`, `PIPER__NOISE_SCALE`, `PIPER__NOISE_W_SCALE`)."""

    xtts: XttsSettings = Field(default_factory=XttsSettings)
    """The XTTS-v2 speech engine (`XTTS__MODEL_SUBDIR`)."""

    talking_head: TalkingHeadSettings = Field(default_factory=TalkingHeadSettings)
    """The talking head (`TALKING_HEAD__RENDER_BATCH`, `TALKING_HEAD__MAX_IMAGE_BYTES`, ...)."""

    lipsync: LipSyncSettings = Field(default_factory=LipSyncSettings)
    """Lip-sync limits (`LIPSYNC__MAX_VIDEO_BYTES`, `LIPSYNC__MAX_VIDEO_S`, ...)."""

    mp4: Mp4Settings = Field(default_factory=Mp4Settings)
    """MP4 encoding of generated videos (`MP4__X264_PRESET`, `MP4__CRF`)."""

    stream: StreamSettings = Field(default_factory=StreamSettings)
    """Streaming sessions (`STREAM_MAX_SESSIONS`, `STREAM_IDLE_TIMEOUT_S`, ... or `STREAM__MAX_SESSIONS`, ...)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        """The usual sources, then the flat names of earlier releases (lowest priority)."""
        return init_settings, env_settings, dotenv_settings, file_secret_settings, _LegacyNames(settings_cls)

    @field_validator("devices")
    @classmethod
    def _device_list(cls, value: str) -> str:
        """`auto` or a comma list of device names (cuda:N, mps, cpu, cpu:N) of one kind."""
        from gpu_service.device import parse_devices

        names = parse_devices(value)
        return "auto" if names is None else ",".join(names)

    @field_validator("tts_engines", "video_engines", "lipsync_engines", mode="before")
    @classmethod
    def _split_engine_list(cls, value: object) -> object:
        """Accept `TTS_ENGINES=piper,xtts` as well as a JSON list."""
        return _engine_list(value)

    @model_validator(mode="after")
    def _default_engine_is_configured(self) -> "Settings":
        """The default speech engine must be one that is configured."""
        if self.default_tts_engine not in self.tts_engines:
            raise ValueError(f"DEFAULT_TTS_ENGINE={self.default_tts_engine!r} is not in TTS_ENGINES={self.tts_engines}")
        return self

    @property
    def artifacts_dir(self) -> Path:
        """Where generated media waits to be fetched."""
        return self.data_dir / "artifacts"

    @property
    def avatar_cache_dir(self) -> Path:
        """Where avatar encodings are cached as npz, keyed by image hash."""
        return self.data_dir / "avatars"

    def redact_paths(self, text: str) -> str:
        """`text` with the service's own directories named by their settings ($DATA_DIR, ...), for clients.

        A safety net under every error answer and health reason: a message built from an OS or
        library error (ffmpeg's stderr, a failed load) may carry a path that must not leave the server.
        """
        roots = {self.data_dir: "$DATA_DIR", self.avatar_model_dir: "$AVATAR_MODEL_DIR",
                 self.preset_avatars_dir: "$PRESET_AVATARS_DIR", _REPO_ROOT: "<service>",
                 Path(tempfile.gettempdir()): "$TMPDIR"}
        names: dict[str, str] = {}
        for root, name in roots.items():
            for variant in {str(root), str(Path(root).resolve())}:
                if len(variant) > 1:
                    names.setdefault(variant, name)
        # One pass, the deepest first (data_dir may lie in the repo), whole path components only.
        alternatives = "|".join(re.escape(p) for p in sorted(names, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w.$~/-])(?:{alternatives})(?![\w.-])")
        return pattern.sub(lambda m: names[m.group(0)], text)

    @property
    def xtts_dir(self) -> Path:
        """Where the XTTS-v2 weights are looked for."""
        return self.avatar_model_dir / self.xtts.model_subdir


def describe_error(exc: ValidationError) -> str:
    """One line naming each bad setting by its environment name, what is wrong and the value given."""
    parts = []
    for err in exc.errors():
        names = [str(x) for x in err.get("loc", ()) if not isinstance(x, int)]
        setting = "__".join(names).upper() if names else ""
        value = err.get("input")
        given = f" (got {value!r})" if isinstance(value, (str, int, float)) and names else ""
        parts.append(f"{setting + ': ' if setting else ''}{err.get('msg')}{given}")
    return "invalid settings: " + "; ".join(parts)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings` and pass it to `create_app`."""
    return Settings()
