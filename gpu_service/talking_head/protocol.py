"""The talking-head capability's engine protocol and the records it takes and returns.

An engine renders frames incrementally: `open_stream` gives a `FrameStream` that turns each
block of face controls into the block's frames, continuing where the previous block ended. The
whole-clip `generate` is that stream run over a clip's controls, then MP4 assembly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import numpy as np

from avatar_contracts.media import Background
from gpu_service.engine import Engine
from gpu_service.talking_head.controls import Controls


@dataclass
class AvatarRecord:
    """What the engine knows of one avatar without loading its encoding."""

    avatar_id: str
    key: str
    face_box: list[int]
    image_size: list[int]
    preset: bool
    encode_time_ms: float = 0.0
    cached: bool = False

    def info(self) -> dict:
        """The AvatarInfo fields."""
        return {
            "avatar_id": self.avatar_id, "face_box": self.face_box, "image_size": self.image_size,
            "preset": self.preset, "encode_time_ms": round(self.encode_time_ms, 2), "cached": self.cached,
        }


@dataclass
class VideoJob:
    """A validated video request: a registered avatar, mono audio and the driving options."""

    avatar_id: str
    audio: np.ndarray
    sample_rate: int
    fps: int = 25
    phonemes: Optional[list] = None
    emotion: str = "neutral"
    text: Optional[str] = None
    seed: int = 0
    head_motion: bool = True
    include_audio: bool = True
    timing_source: Optional[str] = None
    """Where `phonemes` came from (alignment.TimingSource): timings found in the audio drive the lips without a lead."""


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
    avatar_id: str = ""
    """The avatar the video shows (an uploaded avatar_image gets an id too)."""
    timing_source: Optional[str] = None
    """Where the phoneme timings that drove the mouth came from (avatar_contracts.gpu.TimingSource)."""
    device: str = ""
    """The device that rendered it (cuda:1, cpu, ...)."""


@runtime_checkable
class FrameStream(Protocol):
    """Frames of one avatar, made block by block; each block continues the previous one seamlessly."""

    avatar_id: str
    fps: float
    size: tuple[int, int]
    """(width, height) of every frame."""
    frames_rendered: int
    """Frames made so far: the index of the next block's first frame."""

    def render(self, controls: Controls) -> np.ndarray:
        """(n, H, W, 3) uint8 RGB frames for a block of n frames of controls (n may be 0)."""


@runtime_checkable
class TalkingHeadEngine(Engine, Protocol):
    """A portrait and face controls in, frames out; speech in, an MP4 out."""

    def add_avatar(self, image: bytes, face_index: Optional[int] = None, background: Optional[Background] = None,
                   field: str = "image") -> AvatarRecord:
        """Register a portrait (JPEG/PNG/WebP bytes) once; later work names it by avatar_id.

        `face_index` picks a face by size, 0 (the default) the largest; a transparent portrait is
        composited on `background` (None: the default colour) before it is encoded.
        """

    def list_avatars(self) -> list[AvatarRecord]:
        """Every registered avatar, presets first."""

    def get_avatar(self, avatar_id: str) -> AvatarRecord:
        """The record of a registered avatar, or NotFound."""

    def delete_avatar(self, avatar_id: str) -> None:
        """Forget an uploaded avatar (presets stay)."""

    def is_warm(self, avatar_id: str) -> bool:
        """Whether this engine's device holds the avatar's encoding in memory now (placement prefers such a replica)."""

    def open_stream(self, avatar_id: str, fps: float, head_motion: bool = True,
                    idle_seed: Optional[int] = None) -> FrameStream:
        """Start rendering an avatar block by block at `fps`; head_motion=False keeps the head still.

        With `idle_seed`, the stream adds its own blinks and slow head drift to each block (for a
        live driver whose blocks carry only the mouth), carried on from block to block.
        """

    def generate(self, job: VideoJob) -> VideoResult:
        """Drive the whole clip from its speech, render it through a FrameStream and encode the MP4."""
