"""XTTS-v2 speech engine (coqui-tts): voice cloning from a clip, built-in speakers, real streaming.

The engine never downloads: the weights are read from AVATAR_MODEL_DIR/xtts_v2 (put there by hand or
by `python -m gpu_service models fetch xtts`, and checked against gpu_service/models/manifests/xtts.json
before this engine reads them) and loaded with coqui-tts's own XttsConfig and Xtts classes, so a tiny
test model and the released model take the same path.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from avatar_contracts.text import split_bounded
from gpu_service.device import torch_device
from gpu_service.engine import CacheStats, EngineHealth
from gpu_service.errors import EngineUnavailable, GenerationFailed, ValidationFailed
from gpu_service.speech.protocol import SpeechChunk, SpeechRequest, SpeechResult

log = logging.getLogger(__name__)

LANGUAGES = ("en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja", "hi")
"""The 17 languages of XTTS-v2."""

REQUIRED_FILES = ("config.json", "model.pth", "vocab.json")
SPEAKERS_FILE = "speakers_xtts.pth"
OUTPUT_SAMPLE_RATE = 24000
_COND_SAMPLE_RATE = 22050  # the rate XTTS computes its conditioning at

# Languages whose text front end needs a package coqui-tts does not install by itself.
_LANGUAGE_PACKAGES = {"ja": ("cutlet", "coqui-tts[ja]"), "zh-cn": ("pypinyin", "pypinyin")}



def missing_files(model_dir: Path) -> list[str]:
    """The required XTTS-v2 files absent from `model_dir`."""
    return [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]


def clip_key(audio: np.ndarray, sample_rate: int) -> str:
    """A content hash of a speaker clip, the key of the latent cache."""
    digest = hashlib.sha256(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
    digest.update(str(int(sample_rate)).encode())
    return digest.hexdigest()


def _normalise_language(language: str) -> str:
    """`EN` -> `en`, `zh`/`zh-CN` -> `zh-cn`, `pt-BR` -> `pt`: XTTS keys by bare language."""
    lang = language.strip().lower().replace("_", "-")
    if lang.startswith("zh"):
        return "zh-cn"
    return lang.split("-")[0]


class XttsEngine:
    """XTTS-v2 on one device: clones a voice from `speaker_audio` or speaks as a built-in speaker."""

    name = "xtts"

    def __init__(self, model_dir: Path, latent_cache_size: int = 32, stream_chunk_tokens: int = 20,
                 model_dir_label: str = "$AVATAR_MODEL_DIR/xtts_v2") -> None:
        self.model_dir = Path(model_dir)
        self.model_dir_label = model_dir_label
        """How messages name model_dir: by its settings, never the server's own path (they reach clients)."""
        self.latent_cache_size = latent_cache_size
        self.stream_chunk_tokens = stream_chunk_tokens
        self._model: Any = None
        self._config: Any = None
        self._device = "cpu"
        self._languages: list[str] = []
        self._speakers: dict[str, tuple[Any, Any]] = {}
        self._default_speaker: Optional[str] = None
        self._reason: Optional[str] = None
        self._lock = threading.Lock()  # the GPT keeps per-call state (prefix embeddings): one call at a time
        self._latents: "OrderedDict[str, tuple[Any, Any]]" = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # -- lifecycle -------------------------------------------------------------------------
    def _unavailable(self, message: str) -> EngineUnavailable:
        self._reason = message.replace(str(self.model_dir), self.model_dir_label)
        return EngineUnavailable(self._reason)

    def load(self, device: str) -> None:
        """Load XTTS-v2 from `model_dir` onto `device`; EngineUnavailable naming what is missing."""
        missing = missing_files(self.model_dir)
        label = self.model_dir_label
        if missing:
            log.info("xtts weights missing", extra={"model_dir": str(self.model_dir), "missing": ", ".join(missing)})
            raise self._unavailable(
                f"XTTS-v2 weights not found ({', '.join(missing)} missing): put the XTTS-v2 files in {label}/ "
                "(config.json, model.pth, vocab.json) from the XTTS-v2 release (coqui/XTTS-v2, Coqui Public Model "
                f"License, CPML), optionally with {SPEAKERS_FILE} for built-in voices, then restart the service; "
                "`python -m gpu_service models fetch xtts` downloads and verifies them. Nothing is downloaded automatically."
            )
        try:
            import torch
            from TTS.tts.configs.xtts_config import XttsConfig
            from TTS.tts.models.xtts import Xtts
        except ImportError as exc:
            raise self._unavailable(
                f"coqui-tts is not installed ({exc}): run EXTRAS=xtts ./setup_gpu_service.sh"
            ) from exc

        started = time.perf_counter()
        try:
            config = XttsConfig()
            config.load_json(str(self.model_dir / "config.json"))
            model = Xtts(config)
            model.load_checkpoint(config, checkpoint_dir=str(self.model_dir), eval=True, use_deepspeed=False)
            model.to(torch.device(torch_device(device)))
            model.eval()
        except OSError as exc:
            if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
                # The released model.pth pickles its config; coqui-tts rewrites it once as a plain dict.
                raise self._unavailable(
                    f"XTTS-v2 in {label} needs a one-time rewrite of model.pth by coqui-tts but the folder "
                    f"is read-only ({exc.strerror}); start once with it writable"
                ) from exc
            raise self._unavailable(f"XTTS-v2 files in {label} could not be read ({exc.strerror or exc})") from exc
        except Exception as exc:
            raise self._unavailable(
                f"XTTS-v2 files in {label} could not be loaded ({type(exc).__name__}: {exc}); "
                "replace them with an intact copy of the XTTS-v2 release"
            ) from exc

        vocab = model.tokenizer.tokenizer.get_vocab()
        configured = [_normalise_language(lang) for lang in (config.languages or LANGUAGES)]
        # A language the vocabulary has no tag for would be silently spoken as another one.
        self._languages = [lang for lang in dict.fromkeys(configured) if f"[{lang}]" in vocab]
        self._speakers = {}
        manager = getattr(model, "speaker_manager", None)
        if manager is not None and getattr(manager, "speakers", None):
            for name, entry in manager.speakers.items():
                self._speakers[str(name)] = _speaker_latents(entry)
        self._default_speaker = next(iter(self._speakers), None)
        self._model, self._config, self._device = model, config, device
        self._latents.clear()
        self._reason = None
        log.info(
            "xtts loaded",
            extra={
                "device": device,
                "model_dir": str(self.model_dir),
                "languages": len(self._languages),
                "speakers": len(self._speakers),
                "load_ms": round((time.perf_counter() - started) * 1000),
            },
        )

    def warmup(self) -> None:
        """One short real synthesis, conditioned on a built-in speaker or on a synthetic clip."""
        self._require_loaded()
        if self._speakers:
            request = SpeechRequest(text="Hello.", language="en", voice=self._default_speaker)
            self.synthesize(request)
            return
        # No speaker shipped: a 2 s harmonic tone exercises the conditioning and decoding kernels.
        t = np.arange(2 * _COND_SAMPLE_RATE, dtype=np.float32) / _COND_SAMPLE_RATE
        tone = (0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        with self._lock:
            gpt_latent, speaker_embedding = self._compute_latents(tone, _COND_SAMPLE_RATE)
            self._generate("Hello.", "en", gpt_latent, speaker_embedding, 1.0)

    def health(self) -> EngineHealth:
        """Availability, built-in voices, languages and the latent cache's counters."""
        loaded = self._model is not None
        return EngineHealth(
            available=loaded,
            loaded=loaded,
            reason=self._reason,
            device=self._device if loaded else None,
            providers=("torch",) if loaded else (),
            voices=tuple(self._speakers),
            languages=tuple(self._languages),
            clones_voices=True,
            cache=CacheStats(size=len(self._latents), hits=self.cache_hits, misses=self.cache_misses),
        )

    # -- requests --------------------------------------------------------------------------
    def _require_loaded(self) -> None:
        if self._model is None:
            raise EngineUnavailable(f"speech engine 'xtts' is not loaded: {self._reason or 'load() was not called'}")

    def validate(self, request: SpeechRequest) -> None:
        """Check the language and the voice source (a clip or a built-in speaker), naming valid choices."""
        self._require_loaded()
        lang = _normalise_language(request.language)
        if lang not in self._languages:
            raise ValidationFailed(
                f"unknown language {request.language!r} for engine 'xtts'; valid languages: {self._languages}"
            )
        if lang in _LANGUAGE_PACKAGES:
            module, package = _LANGUAGE_PACKAGES[lang]
            if importlib.util.find_spec(module) is None:
                raise ValidationFailed(
                    f"language {lang!r} needs the {module} package on the GPU service: pip install '{package}'"
                )
        if request.speaker_audio is not None:
            if request.voice is not None:
                raise ValidationFailed(
                    "send either voice (a built-in XTTS speaker) or speaker_wav (a clip to clone), not both"
                )
            if not request.speaker_sample_rate or request.speaker_sample_rate <= 0:
                raise ValidationFailed("speaker_wav has no sample rate")
            return
        if not self._speakers:
            raise ValidationFailed(
                "engine 'xtts' needs a voice to clone: send speaker_wav (base64 WAV/FLAC/OGG of the voice speaking, "
                f"a few seconds long); this deployment has no built-in speakers ({SPEAKERS_FILE} is absent)"
            )
        voice = request.voice or self._default_speaker
        if voice not in self._speakers:
            raise ValidationFailed(
                f"unknown voice {request.voice!r} for engine 'xtts'; valid voices: {sorted(self._speakers)} "
                "(or send speaker_wav to clone a voice)"
            )

    def conditioning(self, request: SpeechRequest) -> tuple[Any, Any, str]:
        """GPT conditioning latents, speaker embedding and voice label for a validated request."""
        if request.speaker_audio is not None:
            key = clip_key(request.speaker_audio, int(request.speaker_sample_rate or 0))
            with self._lock:
                cached = self._latents.get(key)
                if cached is not None:
                    self._latents.move_to_end(key)
                    self.cache_hits += 1
                    gpt_latent, speaker_embedding = cached
                else:
                    self.cache_misses += 1
                    gpt_latent, speaker_embedding = self._compute_latents(
                        request.speaker_audio, int(request.speaker_sample_rate)
                    )
                    self._latents[key] = (gpt_latent, speaker_embedding)
                    while len(self._latents) > self.latent_cache_size:
                        self._latents.popitem(last=False)
            return gpt_latent, speaker_embedding, f"clone-{key[:12]}"
        voice = request.voice or self._default_speaker
        if voice not in self._speakers:
            raise ValidationFailed(f"unknown voice {voice!r} for engine 'xtts'; valid voices: {sorted(self._speakers)}")
        gpt_latent, speaker_embedding = self._speakers[voice]
        return gpt_latent, speaker_embedding, voice

    def _compute_latents(self, audio: np.ndarray, sample_rate: int) -> tuple[Any, Any]:
        """The model's own conditioning, from an in-memory clip (the caller holds the lock)."""
        import torch
        import torchaudio.functional as AF

        model, config = self._model, self._config
        wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).reshape(1, -1)
        with torch.inference_mode():
            if sample_rate != _COND_SAMPLE_RATE:
                wav = AF.resample(wav, sample_rate, _COND_SAMPLE_RATE)
            wav = wav[:, : _COND_SAMPLE_RATE * int(config.max_ref_len)].clamp(-1.0, 1.0)
            if config.sound_norm_refs:
                wav = wav / wav.abs().max().clamp(min=1e-6) * 0.75
            speaker_embedding = model.get_speaker_embedding(wav.to(model.device), _COND_SAMPLE_RATE)
            try:
                gpt_latent = model.get_gpt_cond_latents(
                    wav, _COND_SAMPLE_RATE, length=int(config.gpt_cond_len), chunk_length=int(config.gpt_cond_chunk_len)
                )
            except RuntimeError as exc:
                if "too short" in str(exc):
                    raise ValidationFailed(f"speaker_wav is too short for XTTS: {exc}") from None
                raise
        return gpt_latent, speaker_embedding

    def _inference_kwargs(self, speed: float) -> dict:
        config = self._config
        return {
            "temperature": float(config.temperature),
            "length_penalty": float(config.length_penalty),
            "repetition_penalty": float(config.repetition_penalty),
            "top_k": int(config.top_k),
            "top_p": float(config.top_p),
            "speed": float(speed or 1.0),
        }

    def _pieces(self, text: str, language: str) -> list[str]:
        limit = self._model.tokenizer.char_limits.get(language.split("-")[0], 250)
        return split_bounded(text, limit) or [text.strip()]

    def _generate(self, piece: str, language: str, gpt_latent, speaker_embedding, speed: float) -> np.ndarray:
        """One piece through GPT and the HiFi-GAN decoder (the caller holds the lock)."""
        import torch

        with torch.inference_mode():
            out = self._model.inference(piece, language, gpt_latent, speaker_embedding, **self._inference_kwargs(speed))
        return _as_audio(out["wav"])

    def synthesize(self, request: SpeechRequest) -> SpeechResult:
        """Whole-text synthesis at 24 kHz, piece by piece; XTTS gives no phoneme timings."""
        self._require_loaded()
        language = _normalise_language(request.language)
        gpt_latent, speaker_embedding, voice = self.conditioning(request)
        parts: list[np.ndarray] = []
        started = time.perf_counter()
        with self._lock:
            for piece in self._pieces(request.text, language):
                parts.append(self._generate(piece, language, gpt_latent, speaker_embedding, request.speed))
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if audio.size == 0:
            raise GenerationFailed("XTTS produced no audio for this text")
        log.info(
            "xtts synthesized",
            extra={
                "voice": voice,
                "language": language,
                "pieces": len(parts),
                "audio_s": round(audio.size / OUTPUT_SAMPLE_RATE, 3),
                "ms": round((time.perf_counter() - started) * 1000),
            },
        )
        return SpeechResult(audio=audio, sample_rate=OUTPUT_SAMPLE_RATE, voice=voice, phonemes=[])

    def stream(self, request: SpeechRequest) -> Iterator[SpeechChunk]:
        """Yield audio as XTTS's GPT produces it (every `stream_chunk_tokens` audio tokens), piece by piece."""
        import torch

        self._require_loaded()
        language = _normalise_language(request.language)
        gpt_latent, speaker_embedding, voice = self.conditioning(request)
        kwargs = self._inference_kwargs(request.speed)
        started = time.perf_counter()
        first = True
        # Held across yields: the GPT's prefix state belongs to this stream until it ends or is closed.
        with self._lock:
            for piece in self._pieces(request.text, language):
                inner = self._model.inference_stream(
                    piece,
                    language,
                    gpt_latent,
                    speaker_embedding,
                    stream_chunk_size=self.stream_chunk_tokens,
                    **kwargs,
                )
                while True:
                    with torch.inference_mode():
                        try:
                            wav = next(inner)
                        except StopIteration:
                            break
                    audio = _as_audio(wav)
                    if audio.size == 0:
                        continue
                    if first:
                        first = False
                        log.info(
                            "xtts first chunk",
                            extra={"voice": voice, "ms": round((time.perf_counter() - started) * 1000)},
                        )
                    yield SpeechChunk(audio=audio, sample_rate=OUTPUT_SAMPLE_RATE, phonemes=[])


def _speaker_latents(entry: Any) -> tuple[Any, Any]:
    """(gpt_cond_latent, speaker_embedding) from one entry of speakers_xtts.pth."""
    if isinstance(entry, dict) and "gpt_cond_latent" in entry and "speaker_embedding" in entry:
        return entry["gpt_cond_latent"], entry["speaker_embedding"]
    values = list(entry.values()) if isinstance(entry, dict) else list(entry)
    if len(values) != 2:
        raise EngineUnavailable(f"{SPEAKERS_FILE} has an entry that is not (gpt_cond_latent, speaker_embedding)")
    return values[0], values[1]


def _as_audio(wav: Any) -> np.ndarray:
    """Model output (tensor or array) as mono float32 within [-1, 1]."""
    if hasattr(wav, "detach"):
        wav = wav.detach().float().cpu().numpy()
    audio = np.asarray(wav, dtype=np.float32).reshape(-1)
    return np.clip(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
