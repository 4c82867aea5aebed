"""Speech orchestration between the router and the engines: validation, slots, artifacts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import numpy as np

from avatar_contracts import PhonemeTiming, TTSRequest
from avatar_contracts.media import decode_base64
from gpu_service.audio import decode_audio, pcm16, wav_bytes, wav_stream_header
from gpu_service.device import device_kind
from gpu_service.errors import ValidationFailed
from gpu_service.metrics import GpuMetrics
from gpu_service.registry import EngineEntry, EngineRegistry
from gpu_service.settings import Settings
from gpu_service.speech.alignment import align
from gpu_service.speech.protocol import SpeechEngine, SpeechRequest, SpeechResult


@dataclass
class SpeechOutcome:
    """A finished synthesis and the facts the response reports."""

    result: SpeechResult
    engine: str
    language: str
    generation_time_ms: float
    device: str
    """Where the engine really ran (its own health report), not only the service's device."""

    def phoneme_timings(self) -> list[PhonemeTiming]:
        """Phonemes in the contract's shape."""
        return [PhonemeTiming(phoneme=p.phoneme, start_s=round(p.start_s, 4), end_s=round(p.end_s, 4)) for p in self.result.phonemes]

    def wav(self) -> bytes:
        """The audio as a WAV file."""
        return wav_bytes(self.result.audio, self.result.sample_rate)


class SpeechService:
    """Turns a validated TTSRequest into audio on the right engine."""

    def __init__(self, registry: EngineRegistry, settings: Settings, metrics: Optional[GpuMetrics] = None) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics if metrics is not None else GpuMetrics()

    def speaker_clip(self, value: str) -> tuple[np.ndarray, int]:
        """A base64 speaker clip as mono float32 audio and its rate, within the clip length bounds (blocking)."""
        raw = decode_base64(value, "speaker_wav")
        return decode_audio(raw, "speaker_wav", self.settings.speaker_wav_min_s, self.settings.speaker_wav_max_s)

    async def prepare(self, body: TTSRequest) -> tuple[EngineEntry[SpeechEngine], SpeechRequest]:
        """Check the request against limits and the engine; decode any speaker clip (in a thread)."""
        text = body.text.strip()
        if not text:
            raise ValidationFailed("text is empty; send the words to speak")
        if len(body.text) > self.settings.max_text_chars:
            raise ValidationFailed(
                f"text is {len(body.text)} characters; the maximum is {self.settings.max_text_chars} "
                "(split it, or raise MAX_TEXT_CHARS)"
            )
        entry = self.registry.speech_engine(body.engine)
        speaker_audio = speaker_rate = None
        if body.speaker_wav is not None:
            speaker_audio, speaker_rate = await asyncio.to_thread(self.speaker_clip, body.speaker_wav)
        request = SpeechRequest(
            text=text,
            language=body.language,
            voice=body.voice,
            speed=body.speed or 1.0,
            speaker_audio=speaker_audio,
            speaker_sample_rate=speaker_rate,
        )
        entry.engine.validate(request)
        return entry, request

    async def synthesize(self, body: TTSRequest) -> SpeechOutcome:
        """Whole-text synthesis on an engine slot; speech without timings (XTTS) is aligned to its text."""
        entry, request = await self.prepare(body)
        started = time.perf_counter()
        replica = entry.place()
        result = await replica.slots.run(self.metrics.timed("tts", replica.engine.synthesize), request)
        elapsed = (time.perf_counter() - started) * 1000
        if not result.phonemes:
            result.phonemes, _ = await asyncio.to_thread(self.metrics.timed("align", align), result.audio,
                                                         result.sample_rate, request.text, request.language)
        self.metrics.generated("tts")
        device = device_kind(replica.engine.health().device or self.registry.device)  # the contract names the kind
        return SpeechOutcome(result=result, engine=entry.name, language=request.language, generation_time_ms=elapsed,
                             device=device)

    async def stream_wav(self, entry: EngineEntry[SpeechEngine], request: SpeechRequest) -> AsyncIterator[bytes]:
        """A streaming WAV: the header with the first chunk, then 16-bit PCM as the engine makes it."""
        first = True
        # aclosing: when this stream is closed (the client left), the engine's stream is closed with it.
        replica = entry.place()
        async with contextlib.aclosing(replica.slots.stream(lambda: replica.engine.stream(request))) as chunks:
            async for chunk in chunks:
                if first:
                    yield wav_stream_header(chunk.sample_rate) + pcm16(chunk.audio)
                    first = False
                else:
                    yield pcm16(chunk.audio)
        self.metrics.generated("tts")  # the whole text was spoken (a stream cut short never gets here)
