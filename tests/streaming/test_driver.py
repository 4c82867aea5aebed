"""Causal driving against the whole-clip driving on real Piper speech: the stream's mouth is the clip's, decided frame by frame."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from gpu_service.speech.protocol import SpeechRequest
from gpu_service.streaming.driver import CausalMouth, EnvelopeTrack, PhonemeTrack
from gpu_service.talking_head.controls import SPEECH_OPEN
from gpu_service.talking_head.driving import _JAW_SPEED, drive

FPS = 25
TEXT = "Hello there. I build rockets, and they fly to the moon and back. Maybe by May."


@pytest.fixture(scope="module")
def speech(piper_engine):
    chunks = list(piper_engine.stream(SpeechRequest(text=TEXT)))
    assert len(chunks) >= 3  # sentence by sentence: joins to cross
    return chunks


def causal(track, mouth: CausalMouth, look: int, out: list) -> None:
    while len(out) < track.known_frames():
        targets, sealed = track.targets(len(out), look)
        out.append(mouth.step(targets, sealed)[0])


def test_phoneme_track_fed_chunk_by_chunk_follows_the_whole_clip(speech):
    sr = speech[0].sample_rate
    audio = np.concatenate([c.audio for c in speech])
    phones = [p for c in speech for p in c.phonemes]
    ref = drive(len(audio) / sr, FPS, phonemes=phones, head_motion=False).mouth_open / SPEECH_OPEN
    track, mouth, out, heard = PhonemeTrack(FPS), CausalMouth(FPS), [], 0.0
    for chunk in speech:  # each chunk decided before the next one is known
        heard += len(chunk.audio) / sr
        track.add(chunk.phonemes, heard)
        causal(track, mouth, 5, out)
    track.end()
    causal(track, mouth, 5, out)
    y = np.array(out)
    n = min(len(y), len(ref))
    assert abs(len(y) - len(ref)) <= 1
    assert np.corrcoef(y[:n], ref[:n])[0, 1] > 0.95
    assert np.abs(y[:n] - ref[:n]).mean() < 0.06
    assert np.abs(np.diff(y)).max() <= _JAW_SPEED / FPS + 1e-9  # no jump at the chunk joins or anywhere
    sealed = np.flatnonzero((ref[:n] == 0) & (np.convolve(ref[:n] > 0.2, np.ones(7), "same") > 0))
    assert len(sealed) >= 2 and y[sealed].max() < 0.12  # the m/b/p seals inside speech close in the stream too


def test_envelope_track_follows_the_audio_driving(speech):
    sr = speech[0].sample_rate
    audio = np.concatenate([c.audio for c in speech])
    ref = drive(len(audio) / sr, FPS, audio=audio, sample_rate=sr, head_motion=False).mouth_open / SPEECH_OPEN
    pcm = soxr.resample(audio, sr, 48000)
    track, mouth, out = EnvelopeTrack(FPS, 48000), CausalMouth(FPS), []
    for i in range(0, len(pcm), 960):  # 20 ms pushes, decided with 2 frames of look-ahead
        track.push(pcm[i:i + 960])
        while len(out) + 2 < track.known_frames():
            causal_one = track.targets(len(out), 2)
            out.append(mouth.step(*causal_one)[0])
    track.end()
    causal(track, mouth, 2, out)
    y = np.array(out)
    n = min(len(y), len(ref))
    assert np.corrcoef(y[:n], ref[:n])[0, 1] > 0.75
    assert np.abs(np.diff(y)).max() <= _JAW_SPEED / FPS + 1e-9
    assert y.max() > 0.6 and (y < 0.02).sum() >= 3  # opens wide on vowels, closes in the pauses (Piper's sampled pause: 5-8 frames)


def test_causal_mouth_limits_and_interrupts():
    mouth = CausalMouth(FPS)
    step = _JAW_SPEED / FPS
    ys = [mouth.step(np.array([[1.0, 0, 0, 0]]))[0] for _ in range(5)]
    assert np.allclose(np.diff([0.0] + ys)[:2], step) and ys[-1] == 1.0  # opens at the jaw's speed
    ahead = CausalMouth(FPS)
    seen = ahead.step(np.array([[0, 0, 0, 0]] * 2 + [[1.0, 0, 0, 0]]))[0]
    assert seen == pytest.approx(min(step, 1.0 - 2 * step)) and seen > 0  # leaves early for a vowel 2 frames ahead
    closes = [mouth.step(None, fast_close=True)[0] for _ in range(3)]
    assert closes[1] == 0.0  # an interrupt closes from wide open within 2 frames
    mouth.restore(np.array([1.0, 0, 0, 0]))
    sealed = mouth.step(np.array([[1.0, 0, 0, 0]] * 3), np.array([False, False, True]))[0]
    assert sealed <= 2 * step + 1e-9  # a seal 2 frames ahead pulls the lips towards it in time
