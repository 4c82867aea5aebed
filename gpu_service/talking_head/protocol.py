"""The talking-head capability's engine protocol and the records it takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from gpu_service.talking_head.encoding import Encoding


@dataclass
class VideoJob:
    """A validated video request: an encoded avatar, mono audio and the driving options."""

    encoding: Encoding
    audio: np.ndarray
    sample_rate: int
    fps: int = 25
    phonemes: Optional[list] = None
    emotion: str = "neutral"
    text: Optional[str] = None
    seed: int = 0
    head_motion: bool = True
    include_audio: bool = True


@dataclass
class VideoResult:
    """An MP4 and the facts that describe it."""

    mp4: bytes
    frames: int
    fps: int
    width: int
    height: int
    duration_s: float
    timings_ms: dict = field(default_factory=dict)
