"""The service's engines, typed by capability: built from the settings, loaded and warmed once, held with their slots."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Generic, Iterator, Literal, Optional, Sequence, TypeVar, Union

from gpu_service import oom
from gpu_service.device import device_kind
from gpu_service.engine import Engine, EngineHealth
from gpu_service.errors import ConfigurationError, EngineUnavailable, NotReady, ValidationFailed
from gpu_service.lipsync.protocol import LipSyncEngine
from gpu_service.scheduler import EngineSlots, SlotTotals
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

Placement = Literal["least_loaded", "round_robin"]


@dataclass
class Replica(Generic[E]):
    """One copy of an engine on one device, with its own slots and load state."""

    device: str
    engine: E
    slots: EngineSlots
    loaded: bool = False
    settled: bool = False
    """Loading has finished, well or not."""
    reason: Optional[str] = None
    load_ms: float = 0.0
    placed: int = 0
    """Calls placed on this replica so far."""
    weights: Optional["WeightsGuard"] = None
    """Checks the engine's weight files against its manifest before it reads them (MODEL_VERIFY)."""

    def load(self, name: str, capability: Capability, warmup: bool) -> None:
        """Load then warm the engine on its device; one that cannot load is recorded unavailable, never raised."""
        where = {"engine": name, "capability": capability, "device": self.device}
        started = time.perf_counter()
        try:
            snapshot = self.weights.before_load() if self.weights is not None else None
            self.engine.load(self.device)
            if self.weights is not None and snapshot is not None:
                try:
                    self.weights.after_load(snapshot)
                except OSError as exc:  # the engine loaded; only the record of a rewritten file is lost
                    log.warning("could not record rewritten model files", extra={**where, "why": str(exc)})
            if warmup:
                self.engine.warmup()
            self.loaded = True
        except EngineUnavailable as exc:
            self.reason = exc.message
            log.warning("engine unavailable", extra={**where, "why": exc.message})
        except Exception as exc:  # a broken engine must not take the service down
            self.reason = f"failed to load: {type(exc).__name__}: {exc}"
            log.exception("engine failed to load", extra=where)
        finally:
            self.settled = True
            self.load_ms = (time.perf_counter() - started) * 1000
        if self.loaded:
            log.info("engine ready", extra={**where, "load_ms": round(self.load_ms)})

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


class EngineEntry(Generic[E]):
    """One engine of one capability: a replica per device it runs on (one for an engine that runs once), and placement.

    With one replica it is what it always was: `engine`, `slots`, `loaded`... are that replica's.
    """

    def __init__(self, name: str, capability: Capability, engine: E, slots: EngineSlots, loaded: bool = False,
                 settled: bool = False, reason: Optional[str] = None, *, device: str = "cpu",
                 placement: Placement = "least_loaded") -> None:
        self.name = name
        self.capability = capability
        self.placement: Placement = placement
        self.replicas: list[Replica[E]] = [Replica(device, engine, slots, loaded, settled, reason)]
        self._turn = 0
        self._lock = threading.Lock()

    def add_replica(self, device: str, engine: E, slots: EngineSlots) -> Replica[E]:
        """Another copy of the engine, on `device` (loaded by load_all)."""
        replica = Replica(device, engine, slots)
        self.replicas.append(replica)
        return replica

    @property
    def engine(self) -> E:
        """A loaded replica's engine (the first one while none is): for what its copies share (avatar records,
        request validation), so one replica that failed to load does not refuse requests the others can serve."""
        return next((r.engine for r in self.replicas if r.loaded), self.replicas[0].engine)

    @property
    def slots(self) -> Union[EngineSlots, SlotTotals]:
        """The slots of a one-replica engine; with several, their counts summed (engine calls go through place())."""
        if len(self.replicas) == 1:
            return self.replicas[0].slots
        return SlotTotals(f"{self.capability}:{self.name}", [r.slots for r in self.replicas if r.loaded])

    @property
    def loaded(self) -> bool:
        """At least one replica is loaded."""
        return any(r.loaded for r in self.replicas)

    @property
    def settled(self) -> bool:
        """Every replica has finished loading, well or not."""
        return all(r.settled for r in self.replicas)

    @property
    def reason(self) -> Optional[str]:
        """Why no replica loaded (None once one has)."""
        if self.loaded:
            return None
        return next((r.reason for r in self.replicas if r.reason), None)

    @property
    def load_ms(self) -> float:
        """Time spent loading and warming, every replica together."""
        return sum(r.load_ms for r in self.replicas)

    def load(self, warmup: bool) -> None:
        """Load and warm every replica, each on its device, in turn."""
        for replica in self.replicas:
            replica.load(self.name, self.capability, warmup)

    def health(self) -> EngineHealth:
        """The first loaded replica's report (the first replica's before any has loaded)."""
        return next((r for r in self.replicas if r.loaded), self.replicas[0]).health()

    def place(self, prefer: Optional[Callable[[E], bool]] = None) -> Replica[E]:
        """The loaded replica to run the next call on, by the placement policy.

        least_loaded: the fewest running and waiting calls per slot; among equals, one that `prefer`s
        (holds the request's avatar), then the next in turn. round_robin: each in turn, skipping one
        whose slots and queue are full while another has room. Called on the event loop right before
        the slots are taken, so the counts it reads are current.
        """
        with self._lock:
            ready = [r for r in self.replicas if r.loaded] or self.replicas[:1]
            n = len(ready)
            turn = [ready[(self._turn + i) % n] for i in range(n)]
            if n == 1:
                chosen = turn[0]
            elif self.placement == "round_robin":
                chosen = next((r for r in turn if not r.slots.full), turn[0])
            else:
                # min() keeps the first of equals: the rotation's order breaks the last ties.
                chosen = min(turn, key=lambda r: (r.slots.load, not (prefer is not None and prefer(r.engine))))
            self._turn = (ready.index(chosen) + 1) % n
            chosen.placed += 1
            return chosen

    def close(self) -> None:
        """Let every replica's worker threads end (the app is stopping)."""
        for replica in self.replicas:
            replica.slots.close()


AnyEntry = Union[EngineEntry[SpeechEngine], EngineEntry[TalkingHeadEngine], EngineEntry[LipSyncEngine]]


@dataclass(frozen=True)
class DeviceFigures:
    """One device's share of the service: its replicas, their slots, its avatar LRU and its out-of-memory retries."""

    name: str
    kind: str
    engines: list[str] = field(default_factory=list)
    """The loaded replicas on it, as capability:engine."""
    slots_total: int = 0
    slots_busy: int = 0
    slots_queued: int = 0
    placed: int = 0
    """Calls placed on its replicas so far."""
    cached_avatars: int = 0
    """Avatars whose encodings its talking-head replica holds in memory."""
    avatar_cache_hits: int = 0
    avatar_cache_misses: int = 0
    oom_retries: int = 0
    """Render batches halved after running out of memory on it."""


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
                 lipsync: dict[str, EngineEntry[LipSyncEngine]], default_speech: str,
                 devices: Sequence[str] = ("cpu",)) -> None:
        if default_speech not in speech:
            raise ConfigurationError(f"DEFAULT_TTS_ENGINE={default_speech!r} is not in TTS_ENGINES={sorted(speech)}")
        self.speech = speech
        self.talking_head = talking_head
        self.lipsync = lipsync
        self.default_speech = default_speech
        self.devices = list(devices)
        """Every device engines run on, by name; the first holds the engines that run once."""
        self.device = device_kind(self.devices[0])
        """The service's device kind (cpu, cuda, mps)."""

    @classmethod
    def from_settings(cls, settings: Settings, devices: Sequence[str] = ("cpu",)) -> "EngineRegistry":
        """Construct (not load) every configured engine: a replica per device, each with its own slots.

        An engine that runs once (`device_bound = False`, Piper) gets one replica, on the first device.
        A copy shares its first replica's state when the engine can `replicate()` itself (the talking
        head's avatars); otherwise it is built again.
        """
        from gpu_service.lipsync.engines import build as build_lipsync
        from gpu_service.speech.engines import build as build_speech
        from gpu_service.talking_head.engines import build as build_talking_head

        devices = list(devices) or ["cpu"]

        def entry(cap: Capability, name: str, build: Callable[[str, Settings], E]) -> EngineEntry[E]:
            first = build(name, settings)
            copies = devices[1:] if getattr(first, "device_bound", True) else []

            def slots(device: str) -> EngineSlots:
                label = f"{cap}:{name}@{device}" if copies else f"{cap}:{name}"
                return EngineSlots(label, settings.engine_slots, settings.engine_queue)

            made = EngineEntry(name, cap, first, slots(devices[0]), device=devices[0], placement=settings.placement)
            for device in copies:
                replicate = getattr(first, "replicate", None)
                made.add_replica(device, replicate() if replicate else build(name, settings), slots(device))
            # the same files on every device: checked before the first replica reads them (replicas load in turn)
            made.replicas[0].weights = guard(cap, name)
            return made

        guard = _weights_guards(settings)
        return cls(
            speech={n: entry("tts", n, build_speech) for n in settings.tts_engines},
            talking_head={n: entry("video", n, build_talking_head) for n in settings.video_engines},
            lipsync={n: entry("lipsync", n, build_lipsync) for n in settings.lipsync_engines},
            default_speech=settings.default_tts_engine,
            devices=devices,
        )

    def entries(self) -> Iterator[AnyEntry]:
        """Every engine: speech, then talking head, then lip-sync."""
        yield from self.speech.values()
        yield from self.talking_head.values()
        yield from self.lipsync.values()

    def load_all(self, warmup: bool = True) -> None:
        """Load and warm each engine's replicas in turn; one that cannot load is reported unavailable, not fatal."""
        for entry in self.entries():
            entry.load(warmup)
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
            for replica in entry.replicas:
                if not replica.loaded:
                    continue  # configured but unavailable (e.g. no weights): reported by /health, not fatal
                health = replica.health()
                if not health.available:
                    where = f" on {replica.device}" if len(entry.replicas) > 1 else ""
                    return Readiness(False, f"{entry.capability} engine {entry.name!r}{where} is not available: "
                                            f"{health.reason}", entry.name, entry.capability)
        return Readiness(True)

    def device_figures(self) -> list[DeviceFigures]:
        """Per device: its loaded replicas, their slots, calls placed, its avatar LRU and out-of-memory retries."""
        figures = []
        for device in self.devices:
            here = [(e, r) for e in self.entries() for r in e.replicas if r.device == device and r.loaded]
            caches = [r.health().cache for e, r in here if e.capability == "video"]
            caches = [c for c in caches if c is not None]
            figures.append(DeviceFigures(
                name=device, kind=device_kind(device), engines=[f"{e.capability}:{e.name}" for e, _ in here],
                slots_total=sum(r.slots.slots for _, r in here), slots_busy=sum(r.slots.busy for _, r in here),
                slots_queued=sum(r.slots.waiting for _, r in here), placed=sum(r.placed for _, r in here),
                cached_avatars=sum(c.size for c in caches), avatar_cache_hits=sum(c.hits for c in caches),
                avatar_cache_misses=sum(c.misses for c in caches), oom_retries=oom.retries(device),
            ))
        return figures

    def close(self) -> None:
        """Let every engine's worker threads end (the app is stopping)."""
        for entry in self.entries():
            entry.close()
