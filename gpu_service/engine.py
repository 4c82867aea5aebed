"""What every engine has, whatever its capability: a lifecycle (load, warmup) and a typed health report.

Each capability's protocol (speech/protocol.py, talking_head/protocol.py, lipsync/protocol.py)
extends `Engine` with its own verbs. Engines never read HTTP; routers never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable


@dataclass(frozen=True)
class CacheStats:
    """Counters of an engine's cache (e.g. XTTS's speaker latents)."""

    size: int
    hits: int
    misses: int


@dataclass(frozen=True)
class EngineHealth:
    """An engine's own report on itself; /health shows it and /ready asks for it on every call."""

    available: bool
    """The engine can serve requests now."""
    loaded: bool
    """Its weights (or render path) are resident."""
    reason: Optional[str] = None
    """Why it is not available, in words that say what to do."""
    device: Optional[str] = None
    """Where its work really runs (cpu, cuda, mps), which may differ from the service's device."""
    providers: tuple[str, ...] = ()
    """The compute backends in use: onnxruntime execution providers, or the render path (cv2, torch)."""
    precision: Optional[str] = None
    """The float precision its tensors compute in (float32, float16, bfloat16), where it has a choice."""
    voices: tuple[str, ...] = ()
    """Voices a speech engine offers."""
    languages: tuple[str, ...] = ()
    """Languages a speech engine speaks."""
    clones_voices: bool = False
    """Whether a speech engine accepts a speaker clip."""
    cache: Optional[CacheStats] = None
    """The engine's cache counters, where it has one."""

    @classmethod
    def down(cls, reason: str) -> "EngineHealth":
        """The report of an engine that is not loaded, saying why."""
        return cls(available=False, loaded=False, reason=reason)


@runtime_checkable
class Engine(Protocol):
    """The lifecycle shared by the engines of every capability."""

    name: str

    def load(self, device: str) -> None:
        """Load weights onto `device`; raise EngineUnavailable when they are missing."""

    def warmup(self) -> None:
        """Run one real inference so the first request is not slow."""

    def health(self) -> EngineHealth:
        """Report whether the engine can serve now (cheap: /ready calls it on every poll)."""
