"""StreamSession in process on the real engines: idle ticks, say, interrupt, pushed PCM, many viewers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gpu_service.speech.protocol import SpeechRequest
from gpu_service.streaming.driver import INTERRUPT_SPEEDUP
from gpu_service.streaming.media import SAMPLE_RATE
from gpu_service.streaming.session import speech_pieces
from gpu_service.talking_head.controls import SPEECH_OPEN
from gpu_service.talking_head.driving import _JAW_SPEED
from tests.streaming.conftest import create, on_loop

FPS = 25
SPT = SAMPLE_RATE // FPS
JAW = _JAW_SPEED / FPS * SPEECH_OPEN  # the most mouth_open may change from one tick to the next


def session_of(client, info):
    return client.app.state.streams.get(info["session_id"])


def check_clock(ticks):
    idx = [t.index for t in ticks]
    assert idx == list(range(idx[0], idx[0] + len(idx))), "the index skipped or repeated"
    for t in ticks:
        assert t.pts_s == pytest.approx(t.index / FPS)
        assert t.audio.dtype == np.int16 and t.audio.shape == (SPT,)
        assert t.frame.dtype == np.uint8 and t.frame.ndim == 3 and t.frame.shape[0] % 2 == 0 and t.frame.shape[1] % 2 == 0


def drain(feed, events):
    while (event := feed.get_nowait()) is not None:
        events.append(event)


async def speak_and_watch(session, sub, feed, start, stop_after=8, limit=500):
    """Start speech with `start()` (returns the utterance id), then take ticks until stop_after ticks after its speech_finished."""
    t0 = time.monotonic()
    uid = await start()
    ticks, events, first_open, after = [], [], None, None
    for _ in range(limit):
        tick = await sub.get()
        ticks.append(tick)
        if first_open is None and tick.utterance_id == uid and tick.mouth_open > 0.02:
            first_open = time.monotonic() - t0
        drain(feed, events)
        if after is None and any(e["event"] == "speech_finished" and e["utterance_id"] == uid for e in events):
            after = 0
        if after is not None:
            after += 1
            if after > stop_after:
                break
    return uid, ticks, events, first_open


def speech_samples(app, text):
    """Samples at 48 kHz the service's Piper makes for `text`, split as say splits it."""
    engine = app.state.registry.speech_engine(None).engine
    total = 0.0
    for piece in speech_pieces(text):
        total += sum(len(c.audio) / c.sample_rate for c in engine.stream(SpeechRequest(text=piece)))
    return total


def test_speech_pieces_start_short_and_grow():
    text = ("Well, that depends on the rocket, the weather and the crew on board today. It leaves at nine. "
            "Then it flies for three days, crosses the belts, and lands on the moon, where the crew will stay for a week.")
    pieces = speech_pieces(text)
    assert " ".join(pieces) == " ".join(text.split())
    assert pieces[0] == "Well,"  # the first clause alone: the mouth opens after a short synthesis
    assert all(len(piece) <= 40 * 2 ** i for i, piece in enumerate(pieces))  # each made while the ones before play
    assert "It leaves at nine." in pieces  # short sentences stay whole


def test_idle_ticks_move_on_a_steady_clock(service):
    session = session_of(service, create(service))

    async def watch():
        sub = session.subscribe()
        ticks, times = [], []
        for _ in range(75):  # 3 s
            ticks.append(await sub.get())
            times.append(time.monotonic())
        sub.close()
        return ticks, times

    ticks, times = on_loop(session, watch)
    check_clock(ticks)
    assert all(t.utterance_id is None and not t.audio.any() and t.mouth_open == 0.0 for t in ticks)
    assert ticks[0].frame.shape == (512, 512, 3)
    moved = sum(not np.array_equal(a.frame, b.frame) for a, b in zip(ticks, ticks[1:]))
    assert moved >= 0.9 * (len(ticks) - 1), f"only {moved} of {len(ticks) - 1} ticks changed: a frozen picture"
    assert np.abs(ticks[0].frame.astype(int) - ticks[-1].frame).mean() > 0.2  # the head drifted and breathed
    assert 2.2 < times[-1] - times[0] < 4.5  # 74 intervals of 40 ms, wall-clock paced (loose: shared CPUs)


def test_say_speaks_then_finishes_once(service):
    session = session_of(service, create(service))
    text = "Hello there. I build rockets, and they fly."

    async def run():
        sub, feed = session.subscribe(), session.listen()
        await sub.get()
        out = await speak_and_watch(session, sub, feed, lambda: session.say(text))
        sub.close(), feed.close()
        return out

    uid, ticks, events, first_open = on_loop(session, run)
    print(f"say -> first tick with the mouth open: {first_open * 1000:.0f} ms")
    check_clock(ticks)
    spoken = [t for t in ticks if t.utterance_id == uid]
    assert spoken and [t.index for t in spoken] == list(range(spoken[0].index, spoken[-1].index + 1))
    # Ticks of the utterance without audio are Piper's silences, or underruns where the shared CPUs let the TTS
    # of the next sentence fall behind real time (counted by the session; the audio then resumes where it was).
    underruns = session.underruns
    assert sum(t.audio.any() for t in spoken) >= 0.8 * (len(spoken) - underruns)
    assert max(t.mouth_open for t in spoken) > 0.15
    mine = [e for e in events if e.get("utterance_id") == uid]
    assert [e["event"] for e in mine] == ["speech_started", "speech_finished"]
    started, finished = mine
    assert finished["interrupted"] is False
    assert started["t"] == pytest.approx(spoken[0].pts_s)
    assert finished["position_s"] == pytest.approx(speech_samples(service.app, text), abs=0.03)
    assert finished["position_s"] == pytest.approx((len(spoken) - underruns) / FPS, abs=1.0 / FPS)
    after = ticks[ticks.index(spoken[-1]) + 1:]
    assert after and all(t.utterance_id is None and not t.audio.any() for t in after)
    assert after[-1].mouth_open == 0.0  # closed again, idle
    # The jaw never jumps, at the joins of TTS chunks (a clause, then sentences) and into and out of speech.
    steps = np.abs(np.diff([t.mouth_open for t in ticks]))
    assert steps.max() <= JAW + 1e-5, f"the mouth jumped by {steps.max():.3f} (jaw limit {JAW:.3f})"


def test_interrupt_closes_the_mouth_within_3_ticks_and_speech_goes_on(service):
    session = session_of(service, create(service))
    long_text = "Let me tell you a long story about the stars, the planets and the rockets that fly between them."

    async def run():
        sub, feed = session.subscribe(), session.listen()
        rounds = []
        for _ in range(2):  # repeated interruptions must not leave the session mute
            uid = await session.say(long_text)
            before, after, events = [], [], []
            for _ in range(250):
                tick = await sub.get()
                before.append(tick)
                if tick.utterance_id == uid and tick.mouth_open > 0.1 and len([t for t in before if t.utterance_id == uid]) > 10:
                    break
            assert session.interrupt() == uid
            last_seen = before[-1].index
            for _ in range(12):
                after.append(await sub.get())
            drain(feed, events)
            rounds.append((uid, last_seen, before, after, events))
        final = await speak_and_watch(session, sub, feed, lambda: session.say("Done."))
        sub.close(), feed.close()
        return rounds, final

    rounds, final = on_loop(session, run)
    for uid, last_seen, before, after, events in rounds:
        check_clock(before + after)  # the clock runs on through the interrupt
        closed = next(t.index for t in after if t.mouth_open == 0.0)
        assert closed - last_seen <= 3, f"mouth closed {closed - last_seen} ticks after the interrupt"
        assert all(t.mouth_open == 0.0 for t in after if t.index >= closed)
        quiet = [t for t in after if t.index >= last_seen + 2]
        assert all(t.utterance_id is None and not t.audio.any() for t in quiet), "audio went on after the interrupt"
        assert np.abs(np.diff([t.mouth_open for t in after])).max() <= JAW * INTERRUPT_SPEEDUP + 1e-5
        mine = [e for e in events if e.get("utterance_id") == uid]
        assert [e["event"] for e in mine] == ["speech_started", "speech_finished"]
        played = sum(1 for t in before + after if t.utterance_id == uid)
        assert mine[1]["interrupted"] is True
        assert 0 < mine[1]["position_s"] <= played / FPS + 1e-6
    uid, ticks, events, _ = final
    mine = [e for e in events if e.get("utterance_id") == uid]
    assert [e["event"] for e in mine] == ["speech_started", "speech_finished"] and mine[1]["interrupted"] is False
    assert any(t.audio.any() for t in ticks if t.utterance_id == uid)


def test_pushed_pcm_moves_the_mouth(service):
    engine = service.app.state.registry.speech_engine(None).engine
    speech = engine.synthesize(SpeechRequest(text="Rockets fly to the moon and back."))
    session = session_of(service, create(service))
    pcm = (np.clip(speech.audio, -1, 1) * 32767).astype("<i2")
    stereo = np.repeat(pcm[:, None], 2, axis=1).tobytes()  # pushed as stereo at the voice's own 22.05 kHz

    async def push():
        inp = session.open_audio(speech.sample_rate, channels=2)
        step = 4 * speech.sample_rate // 10  # 100 ms of stereo s16
        for i in range(0, len(stereo), step):
            inp.push(stereo[i:i + step])
        inp.end()
        return inp.utterance_id

    async def run():
        sub, feed = session.subscribe(), session.listen()
        await sub.get()
        out = await speak_and_watch(session, sub, feed, push)
        sub.close(), feed.close()
        return out

    uid, ticks, events, first_open = on_loop(session, run)
    check_clock(ticks)
    spoken = [t for t in ticks if t.utterance_id == uid]
    opening = np.array([t.mouth_open for t in spoken])
    assert opening.max() > 0.15 and (opening > 0.05).mean() > 0.3
    assert (opening[:-3] < 0.02).sum() >= 1 or opening.min() < 0.05  # it closes between syllables too
    mine = [e for e in events if e.get("utterance_id") == uid]
    assert [e["event"] for e in mine] == ["speech_started", "speech_finished"]
    assert mine[1]["position_s"] == pytest.approx(speech.duration_s, abs=0.03)
    assert np.abs(np.diff([t.mouth_open for t in ticks])).max() <= JAW + 1e-5


def test_a_second_viewer_does_not_change_the_first(service):
    session = session_of(service, create(service))

    async def run():
        first = session.subscribe()
        early = [await first.get() for _ in range(10)]
        second = session.subscribe()
        slow = session.subscribe()  # never reads: drops its own oldest ticks
        await session.say("Two viewers.")
        a, b = [], []
        for _ in range(40):
            a.append(await first.get())
            b.append(await second.get())
        out = early, a, b, first.dropped, second.dropped, slow.dropped, slow.pending()
        first.close(), second.close(), slow.close()
        return out

    early, a, b, dropped_a, dropped_b, dropped_slow, pending_slow = on_loop(session, run)
    check_clock(early + a)
    check_clock(b)
    by_index = {t.index: t for t in a}
    common = [t for t in b if t.index in by_index]
    assert len(common) >= 35
    assert all(by_index[t.index] is t for t in common)  # the very same tick, frame and audio
    assert dropped_a == dropped_b == 0
    assert dropped_slow > 0 and pending_slow == session.viewer_buffer
