"""The lip-sync capability's engine protocol and the records it takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import numpy as np


@dataclass
class LipSyncJob:
    """A validated lip-sync request: a probed source video (a temp file) and the new speech."""

    video: object
    """A gpu_service.lipsync.stream_io.VideoSource: path, probed facts, decode fps and size."""
    audio: np.ndarray
    sample_rate: int
    length_policy: str = "pingpong"
    """trim | loop | pingpong: what to do with the video when the audio is longer."""
    phonemes: Optional[list] = None
    """(phoneme, start_s, end_s) timings of the new speech, when known."""


@dataclass
class LipSyncResult:
    """The re-voiced MP4 and the facts that describe it."""

    mp4: bytes
    frames: int
    frames_without_face: int
    fps: float
    width: int
    height: int
    duration_s: float
    source_frames: int
    length_policy: str
    engine: str
    timings_ms: dict = field(default_factory=dict)


@runtime_checkable
class LipSyncEngine(Protocol):
    """A video and new speech in, the video re-voiced out (landmark warp now, a neural engine later)."""

    name: str

    def load(self, device: str) -> None:
        """Load models onto `device`; raise EngineUnavailable when they are missing."""

    def warmup(self) -> None:
        """Run one real inference so the first request is not slow."""

    def health(self) -> dict:
        """Report `available` and `loaded`."""

    def lipsync(self, job: LipSyncJob) -> LipSyncResult:
        """Re-voice the whole video (blocking; runs on an engine slot's worker thread)."""
