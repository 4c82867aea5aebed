"""Tier 1: units of the GPU service (real Piper, no HTTP)."""

from __future__ import annotations

import asyncio
import io
import os
import time

import numpy as np
import pytest
import soundfile as sf

from gpu_service.artifacts import ArtifactStore
from avatar_contracts.media import decode_base64
from gpu_service.audio import decode_audio
from gpu_service.device import resolve_device
from gpu_service.speech.protocol import SpeechRequest
from gpu_service.speech.engines.piper import PiperEngine, fold_alignments, onnx_providers
from gpu_service.errors import BadMedia, ConfigurationError, NotFound, Overloaded, ValidationFailed
from gpu_service.scheduler import EngineSlots
from gpu_service.settings import Settings


def test_fold_alignments_merges_marks_and_pauses():
    pairs = [("^", 100), ("h", 100), ("ˈ", 50), ("a", 100), ("ː", 50), (" ", 100), ("b", 100), (".", 100), ("$", 100)]
    phones = fold_alignments(pairs, sample_rate=1000)
    assert [p.phoneme for p in phones] == ["_", "h", "aː", " ", "b", "_"]
    aa = phones[2]
    assert (aa.start_s, aa.end_s) == (0.2, 0.4)  # stress folded forward, length mark backward
    assert phones[-1].start_s == 0.6 and phones[-1].end_s == 0.8  # "." and "$" merged into one pause
    assert all(a.end_s == b.start_s for a, b in zip(phones, phones[1:]))


def test_device_auto_is_cpu_here_and_forced_cuda_fails_clearly():
    assert resolve_device("auto").name in ("cpu", "cuda", "mps")
    assert resolve_device("cpu").name == "cpu"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="DEVICE=cuda was requested"):
            resolve_device("cuda")


def test_settings_are_bounded_and_parse_csv(monkeypatch):
    monkeypatch.setenv("TTS_ENGINES", "piper, xtts")
    monkeypatch.setenv("PORT", "9001")
    s = Settings()
    assert s.tts_engines == ["piper", "xtts"] and s.port == 9001
    monkeypatch.setenv("PORT", "0")
    with pytest.raises(Exception, match="port"):
        Settings()
    monkeypatch.setenv("PORT", "8001")
    monkeypatch.setenv("DEVICE", "tpu")
    with pytest.raises(Exception, match="device"):
        Settings()


@pytest.mark.parametrize("value", ['["piper"]', '["piper", "xtts"]', "piper,xtts", "piper"])
def test_engine_lists_accept_json_and_comma_forms(monkeypatch, value):
    monkeypatch.setenv("TTS_ENGINES", value)
    monkeypatch.setenv("LIPSYNC_ENGINES", value.replace("piper", "landmark").replace(', "xtts"', "").replace(",xtts", ""))
    s = Settings()
    assert s.tts_engines == (["piper", "xtts"] if "xtts" in value else ["piper"])
    assert s.lipsync_engines == ["landmark"]


def test_artifacts_expire_and_respect_the_size_budget(tmp_path):
    store = ArtifactStore(tmp_path, max_bytes=2500, ttl_s=3600)
    ids = []
    for i in range(3):
        ids.append(store.put(bytes([i]) * 1000, "wav"))
        past = time.time() - 10 + i  # distinct mtimes, oldest first
        os.utime(tmp_path / ids[-1], (past, past))
    store.prune()
    with pytest.raises(NotFound):
        store.read(ids[0])  # oldest removed to fit 2500 bytes
    assert store.read(ids[2]) == bytes([2]) * 1000
    store.ttl_s = 1
    old = time.time() - 5
    os.utime(tmp_path / ids[2], (old, old))
    with pytest.raises(NotFound, match="expired"):
        store.read(ids[2])
    with pytest.raises(NotFound):
        store.path("../../etc/passwd")


def test_an_artifact_folder_removed_under_a_running_service_is_made_again(tmp_path):
    import shutil

    store = ArtifactStore(tmp_path / "artifacts", max_bytes=10_000, ttl_s=3600)
    shutil.rmtree(tmp_path / "artifacts")  # a tmp cleaner, or a person tidying DATA_DIR
    art = store.put(b"RIFF", "wav")
    assert store.read(art) == b"RIFF"


def test_redact_paths_names_the_service_directories_by_their_settings(tmp_path):
    s = Settings(data_dir=tmp_path / "data", avatar_model_dir=tmp_path / "models")
    text = f"cannot open {tmp_path / 'data' / 'tmp' / 'v.upload'}; weights in {tmp_path / 'models' / 'xtts_v2'}"
    out = s.redact_paths(text)
    assert out == "cannot open $DATA_DIR/tmp/v.upload; weights in $AVATAR_MODEL_DIR/xtts_v2"


def test_slots_queue_then_refuse_with_retry_after():
    async def scenario():
        slots = EngineSlots("t", slots=1, queue_size=1)
        release = asyncio.Event()

        async def hold():
            async with slots.acquire():
                await release.wait()

        first = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(hold())  # waits in the queue
        await asyncio.sleep(0.01)
        assert (slots.busy, slots.waiting) == (1, 1)
        with pytest.raises(Overloaded) as info:
            async with slots.acquire():
                pass
        assert info.value.headers["Retry-After"] == "1"
        release.set()
        await asyncio.gather(first, second)
        assert (slots.busy, slots.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_cancelled_stream_closes_its_generator_and_gives_the_slot_back():
    import threading

    closed = threading.Event()

    def endless():
        try:
            while True:
                time.sleep(0.01)
                yield b"x"
        finally:
            closed.set()

    def fails_second():
        yield 1
        raise RuntimeError("second sentence failed")

    async def scenario():
        slots = EngineSlots("t", slots=1, queue_size=0)
        first = asyncio.Event()

        async def consume():
            async for _ in slots.stream(endless):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(250):  # bounded: 5 s
            if slots.busy == 0:
                break
            await asyncio.sleep(0.02)
        assert closed.is_set() and (slots.busy, slots.waiting) == (0, 0)
        got = []
        with pytest.raises(RuntimeError, match="second sentence"):
            async for item in slots.stream(fails_second):
                got.append(item)
        assert got == [1]
        async with slots.acquire():  # the only slot is free again
            pass

    asyncio.run(scenario())


def test_a_stream_gives_its_slot_back_before_its_consumer_sees_the_end_or_the_error():
    # A caller that goes on to its next call as soon as a stream ends (or fails) must find the slot free,
    # however long the generator takes to close. The slot used to be given back after the last word was
    # delivered, and this test's next call was refused (Overloaded) while the producer was still closing.
    class SlowToClose:
        def __init__(self, fail: bool) -> None:
            self.fail, self.n = fail, 0

        def __iter__(self):
            return self

        def __next__(self):
            self.n += 1
            if self.n == 1:
                return 1
            if self.fail:
                raise RuntimeError("second sentence failed")
            raise StopIteration

        def close(self) -> None:
            time.sleep(0.2)

    async def scenario():
        slots = EngineSlots("t", slots=1, queue_size=0)
        for fail in (False, True):
            got = []
            try:
                async for item in slots.stream(lambda: SlowToClose(fail)):
                    got.append(item)
            except RuntimeError as exc:
                assert fail and "second sentence" in str(exc)
            else:
                assert not fail
            assert got == [1]
            async with slots.acquire():  # at once: no wait for the slot
                pass

    asyncio.run(scenario())


def _wav(seconds: float, rate: int = 16000, amp: float = 0.3) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def test_decode_audio_bounds():
    audio, rate = decode_audio(_wav(2.0), "clip", 1.0, 30.0)
    assert rate == 16000 and abs(len(audio) / rate - 2.0) < 1e-3
    with pytest.raises(BadMedia, match="at least 1 s"):
        decode_audio(_wav(0.3), "clip", 1.0, 30.0)
    with pytest.raises(BadMedia, match="at most 30 s"):
        decode_audio(_wav(31), "clip", 1.0, 30.0)
    with pytest.raises(BadMedia, match="silent"):
        decode_audio(_wav(2.0, amp=0.0), "clip", 1.0, 30.0)
    with pytest.raises(BadMedia, match="not a readable audio"):
        decode_audio(b"GIF89a not audio at all", "clip", 1.0, 30.0)
    with pytest.raises(BadMedia, match="not valid base64"):
        decode_base64("@@@not-base64@@@", "clip")


def _assert_speech_like(audio: np.ndarray, rate: int) -> None:
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    rms = np.sqrt(np.mean(audio**2))
    assert rms > 0.02, f"audio too quiet to be speech (rms {rms:.4f})"
    frames = audio[: len(audio) // 441 * 441].reshape(-1, 441)  # 20 ms at 22.05 kHz
    energy = np.sqrt((frames**2).mean(axis=1))
    voiced = energy > 0.1 * energy.max()
    assert 0.3 < voiced.mean() < 0.98, "speech has both voiced stretches and quieter gaps"


def test_onnx_providers_are_chosen_from_what_onnxruntime_has():
    cuda_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cpu_build = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cuda", cuda_build) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cuda", cpu_build) == ["CPUExecutionProvider"]
    assert onnx_providers("cpu", cuda_build) == ["CPUExecutionProvider"]
    assert onnx_providers("mps", ["CoreMLExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_piper_on_a_cuda_device_reports_the_providers_it_really_uses():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    engine = PiperEngine(noise_w_scale=0.0)
    engine.load("cuda")  # the service's device is CUDA; the installed onnxruntime is the CPU build
    health = engine.health()
    assert health.providers == ("CPUExecutionProvider",) and health.device == "cpu"
    assert engine.synthesize(SpeechRequest(text="Still speaking.")).duration_s > 0.3


def test_piper_speaks_with_ordered_covering_phonemes(piper_engine):
    short = piper_engine.synthesize(SpeechRequest(text="Hello there."))
    long = piper_engine.synthesize(
        SpeechRequest(text="My big puppy ate a bumblebee, and then we all went home for a long quiet nap.")
    )
    for result in (short, long):
        _assert_speech_like(result.audio, result.sample_rate)
        phones = result.phonemes
        assert phones and phones[0].start_s == 0.0
        assert all(p.end_s > p.start_s for p in phones)
        assert all(abs(a.end_s - b.start_s) < 1e-6 for a, b in zip(phones, phones[1:])), "contiguous, ordered"
        assert abs(phones[-1].end_s - result.duration_s) < 0.02, "timings cover the whole audio"
    assert 0.5 < short.duration_s < 2.5
    assert long.duration_s > 2.5 * short.duration_s
    symbols = [p.phoneme for p in long.phonemes]
    assert symbols.count("b") >= 3 and "m" in symbols and "p" in symbols


def test_piper_speed_and_validation(piper_engine):
    base = piper_engine.synthesize(SpeechRequest(text="One two three four five six."))
    fast = piper_engine.synthesize(SpeechRequest(text="One two three four five six.", speed=1.6))
    assert fast.duration_s < 0.8 * base.duration_s
    with pytest.raises(ValidationFailed, match="valid voices"):
        piper_engine.validate(SpeechRequest(text="hi", voice="nobody"))
    with pytest.raises(ValidationFailed, match="languages of engine 'piper'"):
        piper_engine.validate(SpeechRequest(text="hi", language="fr"))


def test_piper_stream_matches_whole_synthesis(piper_engine):
    text = "This first sentence is long enough, with a clause, to be cut early. The second one follows. A third!"
    chunks = list(piper_engine.stream(SpeechRequest(text=text)))
    assert len(chunks) >= 3
    total = sum(len(c.audio) for c in chunks) / chunks[0].sample_rate
    whole = piper_engine.synthesize(SpeechRequest(text=text)).duration_s
    assert abs(total - whole) / whole < 0.25
    starts = [c.phonemes[0].start_s for c in chunks if c.phonemes]
    assert starts == sorted(starts), "streamed phoneme times are absolute and increasing"


def test_piper_noise_settings_make_speech_repeatable(piper_engine, tmp_path):
    text = "Please bring me the map of the moon."
    # Duration noise off (the shared fixture): the same timings every time, the audio still sampled.
    a, b = (piper_engine.synthesize(SpeechRequest(text=text)) for _ in range(2))
    assert [(p.phoneme, p.start_s, p.end_s) for p in a.phonemes] == [(p.phoneme, p.start_s, p.end_s) for p in b.phonemes]
    # Both noises off through the settings the service builds its engine from: identical audio.
    from gpu_service.speech.engines import build

    settings = Settings(piper={"noise_scale": 0.0, "noise_w_scale": 0.0}, avatar_model_dir=tmp_path)
    engine = build("piper", settings)
    engine.load("cpu")
    c, d = (engine.synthesize(SpeechRequest(text=text)) for _ in range(2))
    assert np.array_equal(c.audio, d.audio)
    _assert_speech_like(c.audio, c.sample_rate)
    with pytest.raises(ValueError, match="noise_w_scale"):
        Settings(piper={"noise_w_scale": -0.1})


def test_every_setting_is_documented_and_numbers_are_bounded():
    import annotated_types
    from pydantic import BaseModel

    groups = [Settings] + [f.annotation for f in Settings.model_fields.values()
                           if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    assert {g.__name__ for g in groups} >= {"PiperSettings", "XttsSettings", "TalkingHeadSettings", "LipSyncSettings"}
    for group in groups:
        for name, field in group.model_fields.items():
            assert field.description and len(field.description) > 10, f"{group.__name__}.{name} has no docstring"
            if field.annotation in (int, float, float | None):
                kinds = {type(m) for m in field.metadata}
                has_low = kinds & {annotated_types.Ge, annotated_types.Gt}
                has_high = kinds & {annotated_types.Le, annotated_types.Lt}
                assert has_low and has_high, f"{group.__name__}.{name} is a number without both bounds"


def test_engine_settings_nest_and_the_flat_names_still_work(monkeypatch):
    monkeypatch.setenv("PIPER__NOISE_SCALE", "0.25")
    monkeypatch.setenv("TALKING_HEAD__RENDER_BATCH", "4")
    monkeypatch.setenv("LIPSYNC__MAX_VIDEO_S", "30")
    monkeypatch.setenv("PIPER_NOISE_W_SCALE", "0")  # the flat name README documented
    monkeypatch.setenv("VIDEO_CRF", "20")
    monkeypatch.setenv("MP4__CRF", "18")  # the nested name wins over the flat one
    s = Settings()
    assert (s.piper.noise_scale, s.piper.noise_w_scale) == (0.25, 0.0)
    assert s.talking_head.render_batch == 4 and s.lipsync.max_video_s == 30.0 and s.mp4.crf == 18
    monkeypatch.setenv("TALKING_HEAD__RENDER_BATCH", "0")
    with pytest.raises(ValueError, match="render_batch"):
        Settings()


def test_lipsync_encoder_settings_reach_the_engine_and_bad_x264_options_are_refused(monkeypatch):
    from gpu_service.lipsync.engines import build

    monkeypatch.setenv("LIPSYNC__X264_PRESET", "veryfast")
    monkeypatch.setenv("LIPSYNC__X264_PARAMS", "me=dia:subme=1")
    monkeypatch.setenv("MP4__CRF", "18")
    eng = build("landmark", Settings())
    assert (eng.x264_preset, eng.x264_params, eng.crf) == ("veryfast", "me=dia:subme=1", 18)
    monkeypatch.delenv("LIPSYNC__X264_PRESET")
    monkeypatch.delenv("LIPSYNC__X264_PARAMS")
    default = build("landmark", Settings())
    assert (default.x264_preset, default.x264_params) == ("superfast", "mbtree=1:rc-lookahead=10")
    for bad in ("mbtree", "me=dia;rm -rf", "-preset=x", "a=b::c=d"):
        monkeypatch.setenv("LIPSYNC__X264_PARAMS", bad)
        with pytest.raises(ValueError, match="x264_params"):
            Settings()
