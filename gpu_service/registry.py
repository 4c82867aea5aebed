"""Builds, loads and warms the configured engines once; holds them resident with their slots."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from gpu_service.errors import EngineUnavailable, NotReady, ValidationFailed
from gpu_service.scheduler import EngineSlots
from gpu_service.settings import Settings

log = logging.getLogger(__name__)

CAPABILITIES = ("tts", "video", "lipsync")


@dataclass
class EngineEntry:
    """One engine of one capability, with its state and its slots."""

    name: str
    capability: str
    engine: Any
    slots: EngineSlots
    loaded: bool = False
    settled: bool = False
    reason: Optional[str] = None
    load_ms: float = 0.0
    extra: dict = field(default_factory=dict)


def _build_tts(name: str, settings: Settings) -> Any:
    """Construct (not load) a speech engine by name."""
    if name == "piper":
        from gpu_service.speech.engines.piper import PiperEngine

        return PiperEngine(
            voice_path=settings.piper_voice_path,
            extra_voice_dir=settings.avatar_model_dir / "piper",
            noise_scale=settings.piper_noise_scale,
            noise_w_scale=settings.piper_noise_w_scale,
        )
    if name == "xtts":
        from gpu_service.speech.engines.xtts import XttsEngine

        return XttsEngine(model_dir=settings.xtts_dir)
    raise ValueError(f"unknown speech engine {name!r} in TTS_ENGINES; known: piper, xtts")


def _build_video(name: str, settings: Settings) -> Any:
    """Construct (not load) a talking-head engine by name."""
    if name == "landmark":
        from gpu_service.talking_head.engines.landmark import TalkingHeadEngine

        return TalkingHeadEngine(
            cache_dir=settings.avatar_cache_dir, cache_bytes=settings.avatar_cache_bytes,
            max_image_bytes=settings.max_image_bytes, presets_dir=settings.preset_avatars_dir,
            preset=settings.video_x264_preset, crf=settings.video_crf, batch=settings.video_render_batch,
        )
    raise ValueError(f"unknown video engine {name!r} in VIDEO_ENGINES; known: landmark")


def _build_lipsync(name: str, settings: Settings) -> Any:
    """Construct (not load) a lip-sync engine by name."""
    if name == "landmark":
        from gpu_service.lipsync.engines.landmark import LandmarkLipSync

        return LandmarkLipSync(preset=settings.video_x264_preset, crf=settings.video_crf)
    raise ValueError(f"unknown lip-sync engine {name!r} in LIPSYNC_ENGINES; known: landmark")


# Later capabilities register builders here: capability -> (engine names, builder).
BUILDERS: dict[str, tuple[Callable[[Settings], list[str]], Callable[[str, Settings], Any]]] = {
    "tts": (lambda s: list(s.tts_engines), _build_tts),
    "video": (lambda s: list(s.video_engines), _build_video),
    "lipsync": (lambda s: list(s.lipsync_engines), _build_lipsync),
}


class EngineManager:
    """Every engine of the service, loaded once at start and reused for every request."""

    def __init__(self, settings: Settings, device: str) -> None:
        self.settings = settings
        self.device = device
        self.entries: dict[str, dict[str, EngineEntry]] = {cap: {} for cap in CAPABILITIES}
        self.defaults: dict[str, str] = {"tts": settings.default_tts_engine, "video": "landmark"}
        self.ready = False
        self.failed: Optional[str] = None
        for cap, (names, build) in BUILDERS.items():
            for name in names(settings):
                engine = build(name, settings)
                slots = EngineSlots(f"{cap}:{name}", settings.engine_slots, settings.engine_queue)
                self.entries[cap][name] = EngineEntry(name=name, capability=cap, engine=engine, slots=slots)
        if self.defaults["tts"] not in self.entries["tts"]:
            raise ValueError(
                f"DEFAULT_TTS_ENGINE={settings.default_tts_engine!r} is not in TTS_ENGINES={settings.tts_engines}"
            )

    def load_all(self) -> None:
        """Load then warm each engine; an engine that cannot load is reported unavailable, not fatal."""
        for cap, entries in self.entries.items():
            for entry in entries.values():
                started = time.perf_counter()
                try:
                    entry.engine.load(self.device)
                    if self.settings.warmup:
                        entry.engine.warmup()
                    entry.loaded = True
                except EngineUnavailable as exc:
                    entry.reason = exc.message
                    log.warning("engine unavailable", extra={"engine": entry.name, "capability": cap, "why": exc.message})
                except Exception as exc:  # a broken engine must not take the service down
                    entry.reason = f"failed to load: {type(exc).__name__}: {exc}"
                    log.exception("engine failed to load", extra={"engine": entry.name, "capability": cap})
                finally:
                    entry.settled = True
                    entry.load_ms = (time.perf_counter() - started) * 1000
                if entry.loaded:
                    log.info("engine ready", extra={"engine": entry.name, "capability": cap, "load_ms": round(entry.load_ms)})
        default = self.entries["tts"][self.defaults["tts"]]
        if not default.loaded:
            self.failed = f"default speech engine {default.name!r} did not load: {default.reason}"
            log.error("service not ready", extra={"why": self.failed})
            return
        self.ready = True

    def capability_ready(self, cap: str) -> bool:
        """True when at least one engine of the capability is loaded."""
        return any(e.loaded for e in self.entries.get(cap, {}).values())

    def get(self, cap: str, name: Optional[str]) -> EngineEntry:
        """The loaded engine `name` (or the default) of a capability, or a 4xx saying why not."""
        entries = self.entries.get(cap, {})
        name = name or self.defaults.get(cap) or next(iter(entries), None)
        if name not in entries:
            raise ValidationFailed(f"unknown {cap} engine {name!r}; valid engines: {sorted(entries)}")
        entry = entries[name]
        if not entry.settled:
            raise NotReady(f"{cap} engine {name!r} is still loading; poll /ready")
        if not entry.loaded:
            raise EngineUnavailable(f"{cap} engine {name!r} is unavailable: {entry.reason}")
        return entry

    def health(self) -> dict[str, Any]:
        """Counts and per-engine status for /health."""
        engines = []
        busy = free = 0
        for cap, entries in self.entries.items():
            for e in entries.values():
                info = e.engine.health() if e.loaded else {}
                engines.append(
                    {
                        "name": e.name,
                        "capability": cap,
                        "available": e.loaded,
                        "loaded": e.loaded,
                        "reason": e.reason,
                        "voices": info.get("voices", []),
                        "languages": info.get("languages", []),
                        "slots": e.slots.slots,
                        "busy": e.slots.busy,
                        "queued": e.slots.waiting,
                    }
                )
                if e.loaded:
                    busy += e.slots.busy
                    free += e.slots.slots - e.slots.busy
        return {"engines": engines, "active_workers": busy, "available_slots": free}
