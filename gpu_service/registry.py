"""The service's engines, typed by capability: built from the settings, loaded and warmed once, held with their slots."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Iterator, Literal, Optional, TypeVar, Union

from gpu_service.engine import Engine, EngineHealth
from gpu_service.errors import ConfigurationError, EngineUnavailable, NotReady, ValidationFailed
from gpu_service.lipsync.protocol import LipSyncEngine
from gpu_service.scheduler import EngineSlots
from gpu_service.settings import Settings
from gpu_service.speech.protocol import SpeechEngine
from gpu_service.talking_head.protocol import TalkingHeadEngine

if TYPE_CHECKING:
    from gpu_service.models.store import WeightsGuard

log = logging.getLogger(__name__)

Capability = Literal["tts", "video", "lipsync"]
"""Capability names as the wire contract spells them (EngineInfo.capability, /health's models)."""
CAPABILITIES: tuple[Capability, ...] = ("tts", "video", "lipsync")

E = TypeVar("E", bound=Engine)


@dataclass
class EngineEntry(Generic[E]):
    """One engine of one capability, with its load state and its slots."""

    name: str
    capability: Capability
    engine: E
    slots: EngineSlots
    loaded: bool = False
    settled: bool = False
    """Loading has finished, well or not."""
    reason: Optional[str] = None
    load_ms: float = 0.0
    weights: Optional["WeightsGuard"] = None
    """Checks the engine's weight files against its manifest before it reads them (MODEL_VERIFY)."""

    def load(self, device: str, warmup: bool) -> None:
        """Load then warm the engine; one that cannot load is recorded unavailable, never raised."""
        started = time.perf_counter()
        try:
            snapshot = self.weights.before_load() if self.weights is not None else None
            self.engine.load(device)
            if self.weights is not None and snapshot is not None:
                try:
                    self.weights.after_load(snapshot)
                except OSError as exc:  # the engine loaded; only the record of a rewritten file is lost
                    log.warning("could not record rewritten model files", extra={"engine": self.name, "why": str(exc)})
            if warmup:
                self.engine.warmup()
            self.loaded = True
        except EngineUnavailable as exc:
            self.reason = exc.message
            log.warning("engine unavailable", extra={"engine": self.name, "capability": self.capability, "why": exc.message})
        except Exception as exc:  # a broken engine must not take the service down
            self.reason = f"failed to load: {type(exc).__name__}: {exc}"
            log.exception("engine failed to load", extra={"engine": self.name, "capability": self.capability})
        finally:
            self.settled = True
            self.load_ms = (time.perf_counter() - started) * 1000
        if self.loaded:
            log.info("engine ready", extra={"engine": self.name, "capability": self.capability, "load_ms": round(self.load_ms)})

    def health(self) -> EngineHealth:
        """The engine's own report once loaded (asked afresh each call); before that, why it is not."""
        if not self.settled:
            return EngineHealth.down("still loading")
        if not self.loaded:
            return EngineHealth.down(self.reason or "did not load")
        try:
            return self.engine.health()
        except Exception as exc:  # a health check that throws is a failed check, not a 500
            return EngineHealth(available=False, loaded=True, reason=f"health check failed: {type(exc).__name__}: {exc}")


AnyEntry = Union[EngineEntry[SpeechEngine], EngineEntry[TalkingHeadEngine], EngineEntry[LipSyncEngine]]


@dataclass(frozen=True)
class Readiness:
    """The answer of /ready: ready, or which engine is not and why."""

    ready: bool
    reason: Optional[str] = None
    engine: Optional[str] = None
    capability: Optional[Capability] = None
    loading: bool = False


def _weights_guards(settings: Settings):
    """(capability, engine) -> the WeightsGuard of an engine that has a manifest, when MODEL_VERIFY is on."""
    if settings.model_verify == "off":
        return lambda cap, name: None
    from gpu_service.models.manifest import ManifestError
    from gpu_service.models.store import ModelStore, WeightsGuard

    try:
        store = ModelStore.from_settings(settings)
    except ManifestError as exc:
        raise ConfigurationError(f"MODEL_MANIFESTS_DIR: {exc}") from None

    def guard(cap: Capability, name: str) -> Optional[WeightsGuard]:
        manifest = store.manifests.get(name)
        if manifest is None or manifest.capability != cap:
            return None
        return WeightsGuard(store, name, settings.model_verify)  # type: ignore[arg-type]

    return guard


def _pick(entries: dict[str, EngineEntry[E]], cap: Capability, name: Optional[str]) -> EngineEntry[E]:
    """The loaded engine `name` (default: the first configured) of one capability, or a 4xx/503 saying why not."""
    name = name or next(iter(entries), None)
    if name not in entries:
        raise ValidationFailed(f"unknown {cap} engine {name!r}; valid engines: {sorted(entries)}")
    entry = entries[name]
    if not entry.settled:
        raise NotReady(f"{cap} engine {name!r} is still loading; poll /ready")
    if not entry.loaded:
        raise EngineUnavailable(f"{cap} engine {name!r} is unavailable: {entry.reason}")
    return entry


class EngineRegistry:
    """Every engine of the service by capability, loaded once at start and reused for every request."""

    def __init__(self, speech: dict[str, EngineEntry[SpeechEngine]],
                 talking_head: dict[str, EngineEntry[TalkingHeadEngine]],
                 lipsync: dict[str, EngineEntry[LipSyncEngine]], default_speech: str) -> None:
        if default_speech not in speech:
            raise ConfigurationError(f"DEFAULT_TTS_ENGINE={default_speech!r} is not in TTS_ENGINES={sorted(speech)}")
        self.speech = speech
        self.talking_head = talking_head
        self.lipsync = lipsync
        self.default_speech = default_speech
        self.device = "cpu"
        """The service's device, set by load_all."""

    @classmethod
    def from_settings(cls, settings: Settings) -> "EngineRegistry":
        """Construct (not load) every configured engine, each with its own slots."""
        from gpu_service.lipsync.engines import build as build_lipsync
        from gpu_service.speech.engines import build as build_speech
        from gpu_service.talking_head.engines import build as build_talking_head

        def slots(cap: Capability, name: str) -> EngineSlots:
            return EngineSlots(f"{cap}:{name}", settings.engine_slots, settings.engine_queue)

        guard = _weights_guards(settings)
        return cls(
            speech={n: EngineEntry(n, "tts", build_speech(n, settings), slots("tts", n), weights=guard("tts", n))
                    for n in settings.tts_engines},
            talking_head={n: EngineEntry(n, "video", build_talking_head(n, settings), slots("video", n),
                                         weights=guard("video", n)) for n in settings.video_engines},
            lipsync={n: EngineEntry(n, "lipsync", build_lipsync(n, settings), slots("lipsync", n),
                                    weights=guard("lipsync", n)) for n in settings.lipsync_engines},
            default_speech=settings.default_tts_engine,
        )

    def entries(self) -> Iterator[AnyEntry]:
        """Every engine: speech, then talking head, then lip-sync."""
        yield from self.speech.values()
        yield from self.talking_head.values()
        yield from self.lipsync.values()

    def load_all(self, device: str, warmup: bool = True) -> None:
        """Load and warm each engine in turn; an engine that cannot load is reported unavailable, not fatal."""
        self.device = device
        for entry in self.entries():
            entry.load(device, warmup)
        if warmup:
            # The aligner that times speech arriving without phonemes: built now, not on the first such request.
            from gpu_service.speech import alignment

            started = time.perf_counter()
            if alignment.warmup():
                log.info("aligner ready", extra={"load_ms": round((time.perf_counter() - started) * 1000)})
        ready = self.readiness()
        if not ready.ready:
            log.error("service not ready", extra={"why": ready.reason})

    def speech_engine(self, name: Optional[str]) -> EngineEntry[SpeechEngine]:
        """The loaded speech engine `name` (or the default)."""
        return _pick(self.speech, "tts", name or self.default_speech)

    def talking_head_engine(self, name: Optional[str] = None) -> EngineEntry[TalkingHeadEngine]:
        """The loaded talking-head engine `name` (or the first configured)."""
        return _pick(self.talking_head, "video", name)

    def lipsync_engine(self, name: Optional[str] = None) -> EngineEntry[LipSyncEngine]:
        """The loaded lip-sync engine `name` (or the first configured)."""
        return _pick(self.lipsync, "lipsync", name)

    def capability_ready(self, cap: Capability) -> bool:
        """True when at least one engine of the capability is loaded."""
        return any(e.loaded for e in self.entries() if e.capability == cap)

    def readiness(self) -> Readiness:
        """Ready when every engine has settled, the default speech engine loaded, and every loaded engine's
        own health() says it is available now (asked on each call, so a failure after start is seen)."""
        if not all(e.settled for e in self.entries()):
            return Readiness(False, "engines are loading", loading=True)
        default = self.speech[self.default_speech]
        if not default.loaded:
            return Readiness(False, f"default speech engine {default.name!r} did not load: {default.reason}",
                             default.name, default.capability)
        for entry in self.entries():
            if not entry.loaded:
                continue  # configured but unavailable (e.g. no weights): reported by /health, not fatal
            health = entry.health()
            if not health.available:
                return Readiness(False, f"{entry.capability} engine {entry.name!r} is not available: {health.reason}",
                                 entry.name, entry.capability)
        return Readiness(True)
