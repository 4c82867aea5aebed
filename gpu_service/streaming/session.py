"""One streaming session: a media clock, a queue of utterances, idle motion between them, and events.

A producer thread makes the ticks: it renders tick k `ahead` frames before its time
(t0 + k / fps on time.monotonic), keeps it pending, and releases it to every subscription on the
event loop when its time comes. Rendering never runs on the event loop.

Pending ticks are not yet seen by anyone, so when the sound changes (an interrupt, or the first
audio of an utterance while the pending ticks are idle) they are dropped and rendered again from
the state before them: an interrupt closes the mouth from the next tick a viewer gets, and speech
starts on the next tick instead of after the buffer. The index never skips either way.

Events are decided when ticks are released: `speech_started` with an utterance's first tick,
`speech_finished` with its last (or when it is interrupted or fails), each exactly once, with
`position_s` the audio of the utterance released so far.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import cv2
import numpy as np

from avatar_contracts.text import split_bounded, split_clauses, split_sentences
from gpu_service.errors import ValidationFailed
from gpu_service.speech.protocol import SpeechEngine, SpeechRequest
from gpu_service.streaming.driver import NOD_STEP, CausalMouth, EmotionRamp, EnvelopeTrack, PhonemeTrack, frame_controls
from gpu_service.streaming.media import SAMPLE_RATE, MediaTick, SessionClosed, Subscription, samples_per_tick
from gpu_service.talking_head.driving import resolve_emotion
from gpu_service.talking_head.protocol import FrameStream

log = logging.getLogger("gpu_service.streaming")

FIRST_PIECE_CHARS = 40
"""`say` speaks its first clause alone (cut at a word to this many characters when longer), so the first
audio, and the mouth, come after a short synthesis; later pieces may each be twice as long as the one
before (a sentence longer than that is cut at its clauses), so each is made while the previous plays."""

MAX_PIECE_CHARS = 320

SAY_TARGET_LOOKAHEAD = 5
"""Frames (200 ms at 25 fps) of a say's mouth targets the jaw looks ahead at: enough to leave in time for the
widest opening and to close into an m/b/p seal at the jaw's speed (3 frames from wide open)."""


def speech_pieces(text: str, first_chars: int = FIRST_PIECE_CHARS) -> list[str]:
    """The text in the pieces `say` synthesizes one after the other (avatar_contracts.text's splitting)."""
    sentences = split_sentences(text)
    if not sentences:
        return []
    clauses = split_clauses(sentences[0])
    head = split_bounded(clauses[0], first_chars)  # the first clause, or its first words
    rest = " ".join(head[1:] + clauses[1:])
    pieces = [head[0]]
    limit = 2 * first_chars
    for sentence in ([rest] if rest else []) + sentences[1:]:
        for piece in ([sentence] if len(sentence) <= limit else split_bounded(sentence, limit)):
            pieces.append(piece)
            limit = min(2 * limit, MAX_PIECE_CHARS)
    return pieces


first_piece_split = speech_pieces


def check_audio_format(sample_rate, channels) -> tuple[int, int]:
    """Pushed PCM's declared rate and channels, or ValidationFailed naming the field."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not 8000 <= sample_rate <= 96000:
        raise ValidationFailed(f"sample_rate must be an integer within [8000, 96000] Hz, got {sample_rate!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 8:
        raise ValidationFailed(f"channels must be an integer within [1, 8], got {channels!r}")
    return sample_rate, channels


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float32) * 32767.0), -32768, 32767).astype(np.int16)


class Utterance:
    """One utterance's audio (48 kHz mono float32, growing), its mouth track and its progress."""

    def __init__(self, session: "StreamSession", kind: str, track, emotion: Optional[str],
                 utterance_id: Optional[str] = None, lookahead_frames: int = 0) -> None:
        self.id = utterance_id or f"utt_{uuid.uuid4().hex[:12]}"
        self.kind = kind  # "say" or "audio"
        self.track = track
        self.emotion = emotion
        self.spf = session.samples_per_tick
        self.lookahead_frames = lookahead_frames
        """Frames of audio that must be in beyond a frame before it plays (pushed PCM's delay; 0 for say)."""
        self.target_lookahead = max(lookahead_frames, SAY_TARGET_LOOKAHEAD if kind == "say" else 0)
        """Frames of mouth targets the jaw looks ahead at (say's chunks are whole: as far as they reach)."""
        self._chunks: list[np.ndarray] = []
        self._audio = np.zeros(0, np.float32)
        self._audio_start = 0  # sample index of _audio[0]: what was played is dropped (an open push can last hours)
        self.total = 0
        self.ended = False
        self.cancelled = False
        self.error: Optional[str] = None
        self.frames_planned = 0  # frames of this utterance rendered (into pending or released)
        self.planned_all = False
        self.started = False
        self.finished = False
        self.released_samples = 0
        self.created = time.monotonic()
        self.first_audio_at: Optional[float] = None
        self.started_at: Optional[float] = None

    # -- audio (under the session lock) -----------------------------------------------------
    def add_audio(self, samples: np.ndarray) -> None:
        if len(samples):
            self._chunks.append(np.asarray(samples, dtype=np.float32))
            self.total += len(samples)

    def audio(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of the utterance; frames are taken in order, so what lies before start goes."""
        if start > self._audio_start:
            self._audio = self._audio[start - self._audio_start:]
            self._audio_start = start
        if self._chunks:
            self._audio = np.concatenate([self._audio] + self._chunks)
            self._chunks = []
        return self._audio[start - self._audio_start:stop - self._audio_start]

    def frames_total(self) -> int:
        return -(-self.total // self.spf)

    def ready(self, k: int) -> bool:
        """Whether frame k can be rendered now: its audio (plus the look-ahead) and its mouth targets are in."""
        if k >= self.track.known_frames():
            return False
        if self.ended:
            return k < self.frames_total()
        return self.total >= (k + 1 + self.lookahead_frames) * self.spf

    def exhausted(self, k: int) -> bool:
        """Whether every frame of the utterance has been planned (k is the next)."""
        return self.ended and self.track.known_frames() >= self.frames_total() and k >= self.frames_total()


@dataclass
class _Planned:
    """A tick being made or waiting for its time, and what to restore to make it again."""

    index: int
    pre_mouth: np.ndarray
    pre_emotion: np.ndarray
    utterance: Optional[Utterance]
    audio: np.ndarray
    real_samples: int
    mouth: np.ndarray
    controls: Any
    last: bool = False
    finish: list = field(default_factory=list)  # utterances (without audio) whose speech_finished rides on this tick
    tick: Optional[MediaTick] = None
    pre_nod: float = 0.0


class EventFeed:
    """One listener's events (async iterator of dicts); ends after session_closed."""

    def __init__(self, on_close: Callable[["EventFeed"], None], buffer: int = 1000) -> None:
        self._queue: collections.deque[dict] = collections.deque()
        self._buffer = buffer
        self._waiter: Optional[asyncio.Future] = None
        self._on_close = on_close
        self._closed = False
        self._ended = False
        self.dropped = 0

    def _deliver(self, event: dict) -> None:
        if self._closed:
            return
        self._queue.append(event)
        while len(self._queue) > self._buffer:
            self._queue.popleft()
            self.dropped += 1
        if event.get("event") == "session_closed":
            self._ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _end(self) -> None:
        self._ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> dict:
        """The next event; SessionClosed once the session ended and every event was taken."""
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._ended or self._closed:
                raise SessionClosed("the session ended")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def get_nowait(self) -> Optional[dict]:
        """The next event if one is waiting, else None."""
        return self._queue.popleft() if self._queue else None

    def __aiter__(self) -> "EventFeed":
        return self

    async def __anext__(self) -> dict:
        try:
            return await self.get()
        except SessionClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """The listener left (idempotent)."""
        if not self._closed:
            self._closed = True
            self._queue.clear()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
            self._on_close(self)


class AudioInput:
    """Pushed PCM for one utterance (WS /audio, LiveKit): s16 interleaved at the declared rate and channels."""

    def __init__(self, session: "StreamSession", utterance: Utterance, sample_rate: int, channels: int) -> None:
        import soxr

        self._session = session
        self._utt = utterance
        self.utterance_id = utterance.id
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self._resampler = None if self.sample_rate == SAMPLE_RATE else soxr.ResampleStream(
            self.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self._rest = b""
        self._ended = False
        self.received_s = 0.0

    @property
    def cancelled(self) -> bool:
        return self._utt.cancelled

    def _convert(self, pcm: bytes, last: bool) -> np.ndarray:
        data = self._rest + pcm
        frame_bytes = 2 * self.channels
        cut = len(data) - len(data) % frame_bytes
        data, self._rest = data[:cut], data[cut:]
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        if self.channels > 1:
            x = x.reshape(-1, self.channels).mean(axis=1)
        self.received_s += len(x) / self.sample_rate
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=last)
        return np.asarray(x, dtype=np.float32)

    def push(self, pcm: bytes) -> None:
        """More audio of the utterance (ignored once it ended or was interrupted)."""
        if self._ended or self._utt.cancelled:
            return
        self._session._add_audio(self._utt, self._convert(bytes(pcm), last=False))

    def end(self) -> None:
        """End of the utterance: speech_finished follows once its audio has played (idempotent)."""
        if self._ended:
            return
        self._ended = True
        if not self._utt.cancelled:
            tail = self._convert(b"", last=True) if self._resampler is not None else np.zeros(0, np.float32)
            self._session._add_audio(self._utt, tail, end=True)


class StreamSession:
    """One avatar live: ticks for its viewers, utterances spoken in order, idle motion in between."""

    def __init__(self, *, session_id: str, avatar_id: str, stream: FrameStream, fps: int, size: tuple[int, int],
                 speech: Optional[SpeechEngine] = None, voice: Optional[str] = None, language: str = "en",
                 emotion: str = "neutral", ahead_frames: int = 2, viewer_buffer: int = 8,
                 audio_lookahead_ms: float = 100.0, idle_seed: int = 0, on_closed: Optional[Callable] = None) -> None:
        self.session_id = session_id
        self.avatar_id = avatar_id
        self.fps = int(fps)
        self.size = (int(size[0]), int(size[1]))
        self.sample_rate = SAMPLE_RATE
        self.samples_per_tick = samples_per_tick(self.fps)
        self.speech = speech
        self.voice = voice
        self.language = language
        self.emotion = resolve_emotion(emotion)
        self.ahead = max(1, int(ahead_frames))
        self.viewer_buffer = viewer_buffer
        self.lookahead_frames = max(0, int(round(audio_lookahead_ms / 1000.0 * self.fps)))
        self.created = time.monotonic()
        self._stream = stream
        self._on_closed = on_closed
        self._mouth = CausalMouth(self.fps)
        self._emotion = EmotionRamp(self.fps, self.emotion)
        self._nod = 0.0
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._queue: list[Utterance] = []
        self._pending: collections.deque[_Planned] = collections.deque()
        self._next_index = 0  # next tick to render
        self._released = 0  # ticks released so far (the next to release)
        self._generation = 0
        self._inflight: Optional[_Planned] = None
        self._rewind: Optional[str] = None  # "interrupt" | "start": set under the lock, acted on by the producer
        self._fast_close = False
        self._subs: list[Subscription] = []
        self._feeds: list[EventFeed] = []
        self._unwatched_since: Optional[float] = self.created
        self._closed = False
        self._close_done = False
        self._t0 = 0.0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self.render_ms: collections.deque[float] = collections.deque(maxlen=500)
        self.late_ticks = 0
        """Ticks released more than a frame after their time (the producer fell behind)."""
        self.utterances = 0
        self.underruns = 0
        self.timings: collections.deque[dict] = collections.deque(maxlen=20)
        """Recent utterances: ms from say/open_audio to their first audio and to their first tick released."""
        """Ticks inside an utterance that had no audio yet (its TTS or pusher fell behind real time)."""
        self._silence = np.zeros(self.samples_per_tick, np.int16)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the media clock and the producer (call on the event loop that serves the session)."""
        self._loop = asyncio.get_running_loop()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"stream-{self.session_id}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """End the session: utterances finish interrupted, listeners get session_closed, viewers SessionClosed."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            for utt in list(self._queue):
                self._finish_locked(utt, interrupted=True)
            self._queue.clear()
            self._emit_locked({"event": "session_closed", "session_id": self.session_id,
                               "t": round(self._released / self.fps, 4)})
            self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            await asyncio.to_thread(thread.join, 5.0)
        self._end_all()
        if self._on_closed is not None:
            self._on_closed(self)

    def _end_all(self) -> None:
        if self._close_done:
            return
        self._close_done = True
        for sub in list(self._subs):
            sub._end()
        for feed in list(self._feeds):
            feed._end()

    # -- viewers and listeners -----------------------------------------------------------------
    def subscribe(self) -> Subscription:
        """A new viewer's feed, from the next tick released."""
        if self._closed:
            raise SessionClosed("the session ended")
        sub = Subscription(self.viewer_buffer, on_close=self._unsubscribe)
        with self._lock:
            self._subs.append(sub)
            self._unwatched_since = None
        self._wake.set()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            self._note_watchers_locked()

    @property
    def viewers(self) -> int:
        """Open subscriptions."""
        return len(self._subs)

    @property
    def listeners(self) -> int:
        """Open event feeds."""
        return len(self._feeds)

    def listen(self) -> EventFeed:
        """A new listener's events, from now on."""
        if self._closed:
            raise SessionClosed("the session ended")
        feed = EventFeed(self._unlisten)
        with self._lock:
            self._feeds.append(feed)
            self._unwatched_since = None
        return feed

    def _unlisten(self, feed: EventFeed) -> None:
        with self._lock:
            if feed in self._feeds:
                self._feeds.remove(feed)
            self._note_watchers_locked()

    def _note_watchers_locked(self) -> None:
        if not self._subs and not self._feeds and self._unwatched_since is None:
            self._unwatched_since = time.monotonic()

    def unwatched_for(self, now: Optional[float] = None) -> float:
        """Seconds since the last viewer or listener left (since creation if none came); 0 while watched."""
        since = self._unwatched_since
        return 0.0 if since is None else (now if now is not None else time.monotonic()) - since

    # -- events --------------------------------------------------------------------------------
    def _emit_locked(self, event: dict) -> None:
        """Send an event to every listener, in order (always through the loop's queue, so order holds)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._fanout_event, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _fanout_event(self, event: dict) -> None:
        for feed in list(self._feeds):
            feed._deliver(event)

    def _fanout_tick(self, tick: MediaTick) -> None:
        for sub in list(self._subs):
            sub._deliver(tick)

    def _finish_locked(self, utt: Utterance, interrupted: bool, error: Optional[str] = None) -> None:
        if utt.finished:
            return
        utt.finished = True
        event = {"event": "speech_finished", "utterance_id": utt.id,
                 "position_s": round(utt.released_samples / SAMPLE_RATE, 4), "interrupted": bool(interrupted),
                 "t": round(self._released / self.fps, 4)}
        if error:
            event["error"] = error
        self._emit_locked(event)

    # -- utterances ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed("the session ended")

    def _enqueue(self, utt: Utterance) -> None:
        with self._lock:
            self._check_open()
            self._queue.append(utt)
            self.utterances += 1
        self._wake.set()

    def _add_audio(self, utt: Utterance, samples: np.ndarray, end: bool = False, phonemes=None,
                   error: Optional[str] = None) -> None:
        """Audio (and phoneme timings) of an utterance arrived; from any thread."""
        with self._lock:
            if utt.cancelled or utt.finished or self._closed:
                return
            start_s = utt.total / SAMPLE_RATE
            if (utt.kind == "say" and start_s == 0.0 and len(samples) and phonemes is not None
                    and not any(p[0] not in ("_", " ") for p in phonemes)):
                # A speech engine without timings (XTTS streams audio only): the mouth follows the envelope,
                # which can read ahead inside each whole chunk without delaying the audio.
                utt.track = EnvelopeTrack(self.fps, SAMPLE_RATE)
            utt.add_audio(samples)
            if utt.first_audio_at is None and len(samples):
                utt.first_audio_at = time.monotonic()
            if isinstance(utt.track, PhonemeTrack):
                if phonemes is not None:
                    utt.track.add(phonemes, utt.total / SAMPLE_RATE)
                else:
                    utt.track.covered_s = utt.total / SAMPLE_RATE
            else:
                utt.track.push(samples)
            if error:
                utt.error = error
            if end:
                utt.ended = True
                utt.track.end()
            # The first audio of an utterance that is next: speak it from the next tick, not after the buffer.
            if (start_s == 0.0 and utt.total > 0 and self._queue and self._queue[0] is utt
                    and utt.frames_planned == 0):
                self._rewind = self._rewind or "start"
        self._wake.set()

    def validate_say(self, text: str, voice: Optional[str], emotion: Optional[str]) -> tuple[str, Optional[str], Optional[str]]:
        """The text, voice and emotion of a `say`, checked (ValidationFailed naming the field) before any work."""
        text = (text or "").strip()
        if not text:
            raise ValidationFailed("text is empty; send the words to speak")
        if self.speech is None:
            raise ValidationFailed("this session has no speech engine; push audio to audio_url instead")
        voice = voice or self.voice
        self.speech.validate(SpeechRequest(text=text, voice=voice, language=self.language))
        emo = resolve_emotion(emotion, text) if emotion else None
        return text, voice, emo

    async def say(self, text: str, interrupt: bool = False, voice: Optional[str] = None,
                  emotion: Optional[str] = None) -> str:
        """Speak `text` (after what is queued, or at once with interrupt=True); returns the utterance_id."""
        self._check_open()
        text, voice, emo = self.validate_say(text, voice, emotion)
        if interrupt:
            self.interrupt()
        utt = Utterance(self, "say", PhonemeTrack(self.fps), emo)
        self._enqueue(utt)
        threading.Thread(target=self._synthesize, args=(utt, text, voice), name=f"tts-{utt.id}", daemon=True).start()
        return utt.id

    def _synthesize(self, utt: Utterance, text: str, voice: Optional[str]) -> None:
        """Run the TTS engine's stream over the text's pieces, handing each chunk to the utterance."""
        import soxr

        error = None
        try:
            for piece in speech_pieces(text):
                if utt.cancelled or self._closed:
                    return
                with self._lock:
                    base = utt.total / SAMPLE_RATE  # phoneme times are from the start of this piece's stream
                chunks: Iterator = self.speech.stream(SpeechRequest(text=piece, voice=voice, language=self.language))
                try:
                    for chunk in chunks:
                        if utt.cancelled or self._closed:
                            return
                        audio = np.asarray(chunk.audio, dtype=np.float32)
                        if chunk.sample_rate != SAMPLE_RATE:
                            audio = soxr.resample(audio, chunk.sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
                        phones = [(p.phoneme, base + p.start_s, base + p.end_s) for p in chunk.phonemes]
                        self._add_audio(utt, audio, phonemes=phones)
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()
        except Exception as exc:  # noqa: BLE001 - a failed utterance ends (speech_finished), the session goes on
            log.warning("stream tts failed", extra={"session_id": self.session_id, "utterance_id": utt.id,
                                                    "why": f"{type(exc).__name__}: {exc}"})
            error = f"speech synthesis failed: {type(exc).__name__}"
        self._add_audio(utt, np.zeros(0, np.float32), end=True, phonemes=[], error=error)

    def open_audio(self, sample_rate: int, channels: int = 1, utterance_id: Optional[str] = None) -> AudioInput:
        """An utterance of pushed PCM (s16 interleaved at sample_rate, channels), queued after what is queued."""
        self._check_open()
        check_audio_format(sample_rate, channels)
        utt = Utterance(self, "audio", EnvelopeTrack(self.fps, SAMPLE_RATE), None, utterance_id,
                        lookahead_frames=self.lookahead_frames)
        self._enqueue(utt)
        return AudioInput(self, utt, sample_rate, channels)

    def interrupt(self) -> Optional[str]:
        """Stop speaking now: the mouth closes within 100 ms, queued audio is dropped, idle goes on.

        Returns the utterance that was playing (or first queued), None when there was none.
        """
        with self._lock:
            current = next((u for u in self._queue if not u.finished), None)
            for utt in self._queue:
                utt.cancelled = True
                self._finish_locked(utt, interrupted=True)
            self._queue.clear()
            if current is not None:
                self._rewind = "interrupt"
        self._wake.set()
        return current.id if current is not None else None

    @property
    def speaking(self) -> Optional[str]:
        """The utterance being played or waited for, if any."""
        with self._lock:
            return next((u.id for u in self._queue if not u.finished), None)

    # -- the producer --------------------------------------------------------------------------
    def _due(self, index: int) -> float:
        return self._t0 + index / self.fps

    def _active_locked(self) -> bool:
        return bool(self._subs) or bool(self._queue)

    def _apply_rewind_locked(self) -> None:
        """Drop the ticks no viewer has seen (pending, and the one being rendered) and plan them again."""
        kind, self._rewind = self._rewind, None
        if kind is None:
            return
        if kind == "interrupt":
            self._fast_close = True
        unseen = list(self._pending) + ([self._inflight] if self._inflight is not None else [])
        if not unseen:
            return
        if kind == "start" and any(p.utterance is not None or p.finish for p in unseen):
            return  # speech is pending already: the new utterance follows it
        first = unseen[0]
        self._mouth.restore(first.pre_mouth)
        self._emotion.restore(first.pre_emotion)
        self._nod = first.pre_nod
        self._next_index = first.index
        self._pending.clear()
        self._inflight = None
        self._generation += 1

    def _current_utterance_locked(self) -> Optional[Utterance]:
        """The utterance whose frames are being planned: the first in the queue not planned to its end."""
        for utt in self._queue:
            if not utt.planned_all:
                return utt
        return None

    def _plan_locked(self, index: int) -> _Planned:
        """Decide tick `index`: its audio, its mouth and the rest of the face (the render comes after)."""
        pre_mouth, pre_emotion = self._mouth.snapshot(), self._emotion.snapshot()
        finish: list[Utterance] = []
        utt = self._current_utterance_locked()
        while utt is not None and utt.exhausted(utt.frames_planned):
            utt.planned_all = True
            if utt.frames_planned == 0:
                finish.append(utt)  # no audio at all (failed, or ended empty): finished with the next tick
            utt = self._current_utterance_locked()
        audio = self._silence
        real = 0
        last = False
        speaking: Optional[Utterance] = None
        if utt is not None and utt.ready(utt.frames_planned):
            k = utt.frames_planned
            targets, sealed = utt.track.targets(k, utt.target_lookahead)
            emo = self._emotion.next(utt.emotion)
            targets = targets.copy()
            targets[:, 0] = np.clip(targets[:, 0] * emo[3], 0.0, 1.0)
            mouth = self._mouth.step(targets, sealed)
            nod_goal = utt.track.nod(k) if isinstance(utt.track, PhonemeTrack) else 0.0
            seg = utt.audio(k * self.samples_per_tick, (k + 1) * self.samples_per_tick)
            real = len(seg)
            audio = _to_int16(np.pad(seg, (0, self.samples_per_tick - real))) if real else self._silence
            utt.frames_planned += 1
            if utt.exhausted(utt.frames_planned):
                utt.planned_all = True
                last = True
            speaking = utt
            self._fast_close = False
        else:
            if utt is not None and utt.frames_planned > 0:
                speaking = utt  # an underrun inside an utterance: silence, mouth closing, still its tick
                self.underruns += 1
            emo = self._emotion.next(utt.emotion if speaking is not None else None)
            mouth = self._mouth.step(None, fast_close=self._fast_close)
            nod_goal = 0.0
            if mouth[0] <= 0.0:
                self._fast_close = False
        pre_nod = self._nod
        self._nod += float(np.clip(nod_goal - self._nod, -NOD_STEP, NOD_STEP))
        controls = frame_controls(self.fps, index, mouth, emo, self._nod)
        return _Planned(index, pre_mouth, pre_emotion, speaking, audio, real, mouth, controls, last, finish,
                        pre_nod=pre_nod)

    def _render(self, plan: _Planned) -> np.ndarray:
        self._stream.frames_rendered = plan.index  # the idle motion of frame `index`, however we got here
        frame = self._stream.render(plan.controls)[0]
        h, w = frame.shape[:2]
        if (w, h) != self.size:
            # Cropped to the size's aspect around the centre (the face is not stretched), then scaled: INTER_AREA
            # down (it averages, no aliasing of the lip seam), bilinear up.
            tw, th = self.size
            cw, ch = (w, min(h, round(w * th / tw))) if w * th <= h * tw else (min(w, round(h * tw / th)), h)
            x0, y0 = (w - cw) // 2, (h - ch) // 2
            frame = frame[y0:y0 + ch, x0:x0 + cw]
            interp = cv2.INTER_AREA if tw < cw else cv2.INTER_LINEAR
            frame = cv2.resize(frame, self.size, interpolation=interp)
        return np.ascontiguousarray(frame)

    def _release_locked(self, plan: _Planned) -> None:
        tick = plan.tick
        utt = plan.utterance
        for done in plan.finish:
            self._finish_locked(done, interrupted=False, error=done.error)
        if utt is not None and not utt.finished:
            if not utt.started:
                utt.started = True
                utt.started_at = time.monotonic()
                if utt.first_audio_at is not None:
                    self.timings.append({"utterance_id": utt.id, "kind": utt.kind,
                                         "first_audio_ms": round((utt.first_audio_at - utt.created) * 1000, 1),
                                         "first_tick_ms": round((utt.started_at - utt.created) * 1000, 1)})
                self._emit_locked({"event": "speech_started", "utterance_id": utt.id, "t": round(tick.pts_s, 4)})
            utt.released_samples += plan.real_samples
        try:
            self._loop.call_soon_threadsafe(self._fanout_tick, tick)
        except RuntimeError:
            self._closed = True
        self._released = tick.index + 1
        if utt is not None and plan.last and not utt.finished:
            self._finish_locked(utt, interrupted=False, error=utt.error)
            if utt in self._queue:
                self._queue.remove(utt)
        for done in plan.finish:
            if done in self._queue:
                self._queue.remove(done)

    def _run(self) -> None:
        try:
            self._produce()
        except Exception:  # noqa: BLE001 - the session ends; its viewers and listeners are told
            log.exception("stream producer failed", extra={"session_id": self.session_id})
            loop = self._loop
            if loop is not None and not self._closed:
                try:
                    asyncio.run_coroutine_threadsafe(self.close(), loop)
                except RuntimeError:
                    pass

    def _produce(self) -> None:
        frame_s = 1.0 / self.fps
        while True:
            plan = None
            with self._lock:
                if self._closed:
                    return
                self._apply_rewind_locked()
                now = time.monotonic()
                if self._pending and now >= self._due(self._pending[0].index):
                    head = self._pending.popleft()
                    if now - self._due(head.index) > frame_s:
                        self.late_ticks += 1
                    self._release_locked(head)
                    continue
                active = self._active_locked()
                if not active and not self._pending:
                    wait = 0.5  # nobody watching and nothing to say: pause (the clock moves on when work comes)
                else:
                    if not self._pending and now - self._due(self._next_index) > 0.25:
                        # Paused, or fell far behind: move the clock so the next tick is now, not a burst.
                        self._t0 += now - self._due(self._next_index)
                    render_at = self._due(self._next_index) - self.ahead * frame_s
                    if active and len(self._pending) < self.ahead + 1 and now >= render_at:
                        plan = self._plan_locked(self._next_index)
                        self._inflight = plan
                        self._next_index += 1
                        generation = self._generation
                        wait = 0.0
                    else:
                        nxt = [self._due(self._pending[0].index)] if self._pending else []
                        if active:
                            nxt.append(render_at)
                        wait = max(0.0, min(nxt) - now) if nxt else 0.5
            if plan is not None:
                started = time.perf_counter()
                frame = self._render(plan)
                self.render_ms.append((time.perf_counter() - started) * 1000)
                plan.tick = MediaTick(index=plan.index, pts_s=plan.index / self.fps, frame=frame, audio=plan.audio,
                                      utterance_id=plan.utterance.id if plan.utterance is not None else None,
                                      mouth_open=float(plan.controls.mouth_open[0]))
                with self._lock:
                    if generation == self._generation and not self._closed:
                        self._pending.append(plan)
                        self._inflight = None
                continue
            if wait > 0:
                self._wake.wait(min(wait, 0.5))
                self._wake.clear()

    # -- figures -------------------------------------------------------------------------------
    def info(self) -> dict:
        """What GET /stream/sessions/{id} reports."""
        ms = sorted(self.render_ms)
        return {
            "session_id": self.session_id, "avatar_id": self.avatar_id, "fps": self.fps, "width": self.size[0],
            "height": self.size[1], "sample_rate": self.sample_rate, "viewers": self.viewers,
            "listeners": self.listeners, "ticks": self._released, "speaking": self.speaking,
            "utterances": self.utterances, "late_ticks": self.late_ticks, "underruns": self.underruns,
            "dropped": sum(s.dropped for s in self._subs),
            "render_ms_p50": round(ms[len(ms) // 2], 3) if ms else None,
            "render_ms_p95": round(ms[int(len(ms) * 0.95)], 3) if ms else None,
        }
