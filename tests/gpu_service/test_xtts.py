"""XTTS-v2 engine on a tiny random XTTS model loaded through the real-weights code path (CPU)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("TTS", reason="coqui-tts (the `xtts` extra) is not installed")

from gpu_service.audio import wav_bytes  # noqa: E402
from gpu_service.speech.protocol import SpeechEngine, SpeechRequest  # noqa: E402
from avatar_contracts.text import split_bounded as split_text  # noqa: E402
from gpu_service.speech.engines.xtts import LANGUAGES, OUTPUT_SAMPLE_RATE, XttsEngine  # noqa: E402
from gpu_service.errors import EngineUnavailable, ValidationFailed  # noqa: E402
from tests.gpu_service.xtts_fixture import TINY_MODEL_DIM, build_tiny_xtts, link_model  # noqa: E402

pytestmark = pytest.mark.xtts

STREAM_CHUNK_TOKENS = 8


@pytest.fixture(scope="session")
def tiny_xtts_dir(tmp_path_factory) -> Path:
    """AVATAR_MODEL_DIR/xtts_v2 holding a tiny random XTTS-v2, built once per session."""
    return build_tiny_xtts(tmp_path_factory.mktemp("xtts_models") / "xtts_v2")


@pytest.fixture(scope="session")
def xtts_engine(tiny_xtts_dir) -> XttsEngine:
    """The engine loaded from the tiny model folder on CPU."""
    engine = XttsEngine(model_dir=tiny_xtts_dir, stream_chunk_tokens=STREAM_CHUNK_TOKENS)
    engine.load("cpu")
    return engine


@pytest.fixture(scope="session")
def speaker_clip(piper_engine) -> tuple[np.ndarray, int]:
    """A real speech clip (Piper) to clone: about three seconds at 22050 Hz."""
    result = piper_engine.synthesize(SpeechRequest(text="The quick brown fox jumps over the lazy dog, twice."))
    assert result.duration_s > 2.0
    return result.audio, result.sample_rate


def _clone(text: str, clip: tuple[np.ndarray, int], language: str = "en") -> SpeechRequest:
    return SpeechRequest(text=text, language=language, speaker_audio=clip[0], speaker_sample_rate=clip[1])


# -- weights missing ---------------------------------------------------------------------------
def test_missing_weights_name_the_files_and_where_to_put_them(tmp_path):
    model_dir = tmp_path / "xtts_v2"
    engine = XttsEngine(model_dir=model_dir)
    with pytest.raises(EngineUnavailable) as info:
        engine.load("cpu")
    msg = info.value.message
    assert "config.json, model.pth, vocab.json missing" in msg
    assert "put the XTTS-v2 files in $AVATAR_MODEL_DIR/xtts_v2/ (config.json, model.pth, vocab.json" in msg
    assert str(tmp_path) not in msg  # the message reaches clients: no server path
    assert "CPML" in msg and "XTTS-v2 release" in msg
    assert engine.health().available is False and engine.health().reason == msg

    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(EngineUnavailable, match=r"model\.pth, vocab\.json missing"):
        engine.load("cpu")


def test_corrupt_checkpoint_is_unavailable_not_a_crash(tmp_path, tiny_xtts_dir):
    model_dir = tmp_path / "xtts_v2"
    model_dir.mkdir()
    for name in ("config.json", "vocab.json"):
        (model_dir / name).symlink_to(tiny_xtts_dir / name)
    (model_dir / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EngineUnavailable, match="could not be loaded"):
        XttsEngine(model_dir=model_dir).load("cpu")


# -- loaded ------------------------------------------------------------------------------------
def test_loads_tiny_model_and_reports_languages(xtts_engine):
    assert isinstance(xtts_engine, SpeechEngine)
    health = xtts_engine.health()
    assert health.available and health.loaded and health.reason is None
    assert health.languages == LANGUAGES and len(LANGUAGES) == 17
    assert health.voices == ()  # no speakers_xtts.pth: cloning only


def test_unknown_language_lists_the_valid_ones(xtts_engine, speaker_clip):
    with pytest.raises(ValidationFailed) as info:
        xtts_engine.validate(_clone("Hallo.", speaker_clip, language="xx"))
    assert "'xx'" in info.value.message
    for lang in ("en", "zh-cn", "hi", "ja"):
        assert repr(lang) in info.value.message
    xtts_engine.validate(_clone("Hallo.", speaker_clip, language="de-DE"))  # region tags are accepted


SAMPLES = {
    "en": "Hello.", "es": "Hola.", "fr": "Bonjour.", "de": "Hallo.", "it": "Ciao.", "pt": "Olá.",
    "pl": "Cześć.", "tr": "Merhaba.", "ru": "Привет.", "nl": "Hallo.", "cs": "Ahoj.", "ar": "مرحبا.",
    "zh-cn": "你好，世界。", "hu": "Szia.", "ko": "안녕하세요.", "ja": "こんにちは、世界。", "hi": "नमस्ते।",
}


def test_every_language_validates_and_the_special_front_ends_run(xtts_engine, speaker_clip):
    assert sorted(SAMPLES) == sorted(LANGUAGES)
    for lang, text in SAMPLES.items():
        xtts_engine.validate(_clone(text, speaker_clip, language=lang))
    # Chinese (pypinyin), Japanese (cutlet) and Korean (romanised) have their own text front ends.
    for lang in ("zh-cn", "ja", "ko"):
        assert xtts_engine.synthesize(_clone(SAMPLES[lang], speaker_clip, language=lang)).audio.size > 0


def test_without_speaker_wav_or_builtin_speakers_asks_for_a_clip(xtts_engine, speaker_clip):
    with pytest.raises(ValidationFailed, match="send speaker_wav"):
        xtts_engine.validate(SpeechRequest(text="Hello."))
    both = _clone("Hello.", speaker_clip)
    both.voice = "someone"
    with pytest.raises(ValidationFailed, match="not both"):
        xtts_engine.validate(both)


def test_clone_synthesize_gives_finite_24k_audio(xtts_engine, speaker_clip):
    request = _clone("Hello there, this is a cloned voice.", speaker_clip)
    xtts_engine.validate(request)
    gpt_latent, speaker_embedding, voice = xtts_engine.conditioning(request)
    assert tuple(gpt_latent.shape) == (1, 32, TINY_MODEL_DIM)  # perceiver: 32 latents of the GPT width
    assert tuple(speaker_embedding.shape) == (1, 512, 1)
    assert voice.startswith("clone-")

    result = xtts_engine.synthesize(request)
    assert result.sample_rate == OUTPUT_SAMPLE_RATE == 24000
    assert result.audio.dtype == np.float32 and result.audio.ndim == 1
    assert 0.3 < result.duration_s < 3.0  # bounded by the tiny model's audio-token cap
    assert np.isfinite(result.audio).all() and np.abs(result.audio).max() <= 1.0
    assert float(np.abs(result.audio).max()) > 0.0
    assert result.voice == voice and result.phonemes == []


def test_speed_shortens_the_audio(xtts_engine, speaker_clip):
    normal = xtts_engine.synthesize(_clone("Speed test.", speaker_clip))
    fast = _clone("Speed test.", speaker_clip)
    fast.speed = 2.0
    quick = xtts_engine.synthesize(fast)
    # Same token count, latents resampled to half the frames: about half the audio.
    assert 0.4 < len(quick.audio) / len(normal.audio) < 0.6


def test_concurrent_requests_are_serialised_safely(xtts_engine, speaker_clip):
    from concurrent.futures import ThreadPoolExecutor

    requests = [_clone("First thread.", speaker_clip), _clone("Second thread.", speaker_clip)]
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(lambda: [c.audio for c in xtts_engine.stream(requests[0])])
        whole = pool.submit(xtts_engine.synthesize, requests[1])
        chunks, result = streamed.result(timeout=60), whole.result(timeout=60)
    assert len(chunks) == 3 and result.audio.size > 0 and np.isfinite(result.audio).all()


def test_long_text_is_generated_piece_by_piece(xtts_engine, speaker_clip):
    sentence = "This sentence is long enough to matter for the limit"
    text = ". ".join([sentence] * 6) + "."
    assert len(text) > 250
    pieces = split_text(text, 250)
    assert len(pieces) == 2 and all(len(p) <= 250 for p in pieces)
    single = xtts_engine.synthesize(_clone("Short.", speaker_clip))
    double = xtts_engine.synthesize(_clone(text, speaker_clip))
    # Every piece runs to the same token cap, so two pieces give twice the audio of one.
    assert len(double.audio) == 2 * len(single.audio)


def test_split_text_cuts_words_and_unspaced_scripts():
    words = split_text("one two three four five six seven", 10)
    assert all(len(p) <= 10 for p in words) and " ".join(words) == "one two three four five six seven"
    han = split_text("我" * 25, 10)
    assert [len(p) for p in han] == [10, 10, 5]


def test_latent_cache_hits_on_the_same_clip(xtts_engine, speaker_clip):
    request = _clone("Cache me.", speaker_clip)
    first = xtts_engine.conditioning(request)
    hits, misses = xtts_engine.cache_hits, xtts_engine.cache_misses
    again = xtts_engine.conditioning(_clone("Another text.", (speaker_clip[0].copy(), speaker_clip[1])))
    assert xtts_engine.cache_hits == hits + 1 and xtts_engine.cache_misses == misses
    assert again[0] is first[0] and again[1] is first[1] and again[2] == first[2]

    louder = _clone("Cache me.", (speaker_clip[0] * 0.5, speaker_clip[1]))
    other = xtts_engine.conditioning(louder)
    assert xtts_engine.cache_misses == misses + 1 and other[2] != first[2]
    assert xtts_engine.health().cache.hits == xtts_engine.cache_hits


def test_latent_cache_is_bounded_lru(tiny_xtts_dir, speaker_clip):
    engine = XttsEngine(model_dir=tiny_xtts_dir, latent_cache_size=2)
    engine.load("cpu")
    audio, rate = speaker_clip
    clips = [(audio * g, rate) for g in (1.0, 0.8, 0.6)]
    for clip in clips:
        engine.conditioning(_clone("x", clip))
    assert engine.health().cache.size == 2
    engine.conditioning(_clone("x", clips[2]))  # newest: still cached
    assert engine.cache_hits == 1
    engine.conditioning(_clone("x", clips[0]))  # oldest: evicted, computed again
    assert engine.cache_misses == 4


def test_stream_yields_chunks_as_tokens_are_generated(xtts_engine, speaker_clip):
    request = _clone("Streaming works.", speaker_clip)
    arrivals, chunks = [], []
    started = time.perf_counter()
    for chunk in xtts_engine.stream(request):
        arrivals.append(time.perf_counter() - started)
        chunks.append(chunk)
    # The tiny GPT always runs to its cap of 21 audio tokens: 8 + 8 + 5, one chunk each.
    assert len(chunks) == 3
    assert arrivals[0] < arrivals[-1]
    assert all(c.sample_rate == 24000 and c.audio.dtype == np.float32 and c.phonemes == [] for c in chunks)
    audio = np.concatenate([c.audio for c in chunks])
    assert audio.size > 0.3 * 24000 and np.isfinite(audio).all()


def test_stream_releases_the_model_when_abandoned(xtts_engine, speaker_clip):
    stream = xtts_engine.stream(_clone("Abandon me.", speaker_clip))
    next(stream)
    stream.close()  # a client that hangs up: the lock must be free for the next request
    assert xtts_engine.synthesize(_clone("Next.", speaker_clip)).audio.size > 0


def test_builtin_speakers_from_speakers_file(tmp_path, tiny_xtts_dir, xtts_engine, speaker_clip):
    import torch

    gpt_latent, speaker_embedding, _ = xtts_engine.conditioning(_clone("x", speaker_clip))
    model_dir = link_model(tiny_xtts_dir, tmp_path / "xtts_v2")
    torch.save(
        {"Piper Joe": {"gpt_cond_latent": gpt_latent.clone(), "speaker_embedding": speaker_embedding.clone()}},
        model_dir / "speakers_xtts.pth",
    )
    engine = XttsEngine(model_dir=model_dir)
    engine.load("cpu")
    engine.warmup()  # conditions on the built-in speaker
    assert engine.health().voices == ("Piper Joe",)
    request = SpeechRequest(text="Built in voice.")
    engine.validate(request)
    result = engine.synthesize(request)
    assert result.voice == "Piper Joe" and result.audio.size > 0
    with pytest.raises(ValidationFailed, match="Piper Joe"):
        engine.validate(SpeechRequest(text="Hi.", voice="Nobody"))


def test_warmup_without_speakers_runs(xtts_engine):
    xtts_engine.warmup()


# -- the app in process ------------------------------------------------------------------------
def _settings(tmp_path: Path, model_root: Path):
    from gpu_service.settings import Settings

    return Settings(
        device="cpu",
        tts_engines=["piper", "xtts"],
        avatar_model_dir=model_root,
        model_verify="off",  # the tiny model is weights of our own, not the release the manifest describes
        data_dir=tmp_path / "data",
        preset_avatars_dir=tmp_path / "presets",
    )


def test_api_clones_a_voice_with_xtts(tmp_path, tiny_xtts_dir, speaker_clip):
    from tests.conftest import running_app

    model_root = tmp_path / "models"
    link_model(tiny_xtts_dir, model_root / "xtts_v2")
    speaker_wav = base64.b64encode(wav_bytes(*speaker_clip)).decode()

    async def scenario():
        async with running_app(_settings(tmp_path, model_root)) as client:
            health = (await client.get("/health")).json()
            xtts = next(e for e in health["engines"] if e["name"] == "xtts")
            assert xtts["available"] and len(xtts["languages"]) == 17

            body = {"text": "Hello from a cloned voice.", "engine": "xtts", "speaker_wav": speaker_wav}
            resp = await client.post("/tts/generate", json=body)
            assert resp.status_code == 200, resp.text
            data = resp.json()
            assert data["engine"] == "xtts" and data["sample_rate"] == 24000 and data["duration_s"] > 0.3
            assert data["voice"].startswith("clone-") and data["phonemes"] == []
            wav = await client.get(data["audio_url"])
            audio, rate = sf.read(io.BytesIO(wav.content), dtype="float32")
            assert rate == 24000 and len(audio) > 0.3 * 24000

            streamed = await client.post("/tts/stream", json=body)
            assert streamed.status_code == 200 and streamed.headers["x-engine"] == "xtts"
            assert streamed.content[:4] == b"RIFF" and len(streamed.content) > 44 + 0.3 * 24000 * 2

            no_clip = await client.post("/tts/generate", json={"text": "Hi.", "engine": "xtts"})
            assert no_clip.status_code == 422 and "speaker_wav" in no_clip.json()["error"]
            bad_lang = await client.post("/tts/generate", json={**body, "language": "xx"})
            assert bad_lang.status_code == 422 and "zh-cn" in bad_lang.json()["error"]

    asyncio.run(scenario())


def test_api_without_weights_is_a_clear_422(tmp_path, speaker_clip):
    from tests.conftest import running_app

    speaker_wav = base64.b64encode(wav_bytes(*speaker_clip)).decode()

    async def scenario():
        async with running_app(_settings(tmp_path, tmp_path / "empty_models")) as client:
            health = (await client.get("/health")).json()
            assert health["status"] == "healthy"  # piper is the default and loaded
            xtts = next(e for e in health["engines"] if e["name"] == "xtts")
            assert xtts["available"] is False and "model.pth" in xtts["reason"]

            body = {"text": "Hello.", "engine": "xtts", "speaker_wav": speaker_wav}
            resp = await client.post("/tts/generate", json=body)
            assert resp.status_code == 422
            err = resp.json()
            assert err["error_type"] == "engine_unavailable"
            for needle in ("config.json", "model.pth", "vocab.json", "xtts_v2", "CPML"):
                assert needle in err["error"]

    asyncio.run(scenario())
