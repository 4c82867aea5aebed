"""The lip-sync capability's engine protocol and the records it takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import numpy as np

from gpu_service.engine import Engine

if TYPE_CHECKING:
    from gpu_service.lipsync.stream_io import VideoSource


@dataclass
class LipSyncJob:
    """A validated lip-sync request: a probed source video (a temp file) and the new speech."""

    video: VideoSource
    """The probed source: path, facts, decode fps and size."""
    audio: np.ndarray
    sample_rate: int
    length_policy: str = "pingpong"
    """trim | loop | pingpong: what to do with the video when the audio is longer."""
    phonemes: Optional[list] = None
    """(phoneme, start_s, end_s) timings of the new speech, when known."""
    face_index: int = 0
    """Which face to re-voice, by size on the first frame: 0 the largest."""
    timing_source: Optional[str] = None
    """Where `phonemes` came from (alignment.TimingSource): timings found in the audio drive the lips without a lead."""
    silence: str = "filmed"
    """filmed: where neither the filmed person nor the new speech speaks, keep the filmed mouth (silence.py);
    rendered: render every frame's mouth."""


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
    timing_source: Optional[str] = None
    """Where the phoneme timings of the new speech came from (avatar_contracts.gpu.TimingSource)."""
    device: str = ""
    """The device that rendered it (cuda:1, cpu, ...)."""
    frames_as_filmed: int = 0
    """Frames whose mouth was kept as filmed: silent in both the source's soundtrack and the new speech."""
    filmed_spans: list = field(default_factory=list)
    """Those frames as [start, end) runs of output frame indices."""


@runtime_checkable
class LipSyncEngine(Engine, Protocol):
    """A video and new speech in, the video re-voiced out (landmark warp now, a neural engine later)."""

    def lipsync(self, job: LipSyncJob) -> LipSyncResult:
        """Re-voice the whole video (blocking; runs on an engine slot's worker thread)."""
