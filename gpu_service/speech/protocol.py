"""The speech capability's engine protocol and the records it takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, runtime_checkable

import numpy as np

from gpu_service.engine import Engine


@dataclass(frozen=True)
class Phone:
    """A phoneme and its span in the audio, in seconds."""

    phoneme: str
    start_s: float
    end_s: float


@dataclass
class SpeechRequest:
    """What a speech engine needs, already validated by the service."""

    text: str
    language: str = "en"
    voice: Optional[str] = None
    speed: float = 1.0
    speaker_audio: Optional[np.ndarray] = None
    """Mono float32 clip to clone, at `speaker_sample_rate`."""
    speaker_sample_rate: Optional[int] = None


@dataclass
class SpeechResult:
    """Mono float32 audio in [-1, 1], with phoneme timings where the engine knows them."""

    audio: np.ndarray
    sample_rate: int
    voice: str
    phonemes: list[Phone] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        """Length of the audio in seconds."""
        return len(self.audio) / float(self.sample_rate)


@dataclass
class SpeechChunk:
    """A piece of streamed speech; phoneme times are relative to the start of the whole stream."""

    audio: np.ndarray
    sample_rate: int
    phonemes: list[Phone] = field(default_factory=list)


@runtime_checkable
class SpeechEngine(Engine, Protocol):
    """Text in, speech out (with voices and languages in its health)."""

    def validate(self, request: SpeechRequest) -> None:
        """Raise ValidationFailed naming the valid choices if voice or language is unknown."""

    def synthesize(self, request: SpeechRequest) -> SpeechResult:
        """Synthesize the whole text."""

    def stream(self, request: SpeechRequest) -> Iterator[SpeechChunk]:
        """Yield audio as it is made, sentence by sentence or finer."""
