"""What a viewer of a streaming session receives: ticks of one frame and its audio, on the session's media clock.

A session's producer makes one `MediaTick` per frame, `fps` per second, wall-clock paced, and hands
each to every open `Subscription` when its time comes. A tick pairs the frame with exactly the
`SAMPLE_RATE // fps` samples that play with it, so a transport that sends both from the same tick
cannot drift: audio RTP timestamps = index * samples_per_tick, video = index * 90000 / fps.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

SAMPLE_RATE = 48_000
"""Session audio: mono s16 at 48 kHz (Opus's rate, so WebRTC needs no resampling)."""

MIN_FPS = 10
MAX_FPS = 60
"""fps a session may run at; SAMPLE_RATE must divide evenly by it (checked on creation)."""


def samples_per_tick(fps: int) -> int:
    """Samples of session audio that play with one frame at `fps`."""
    return SAMPLE_RATE // int(fps)


class SessionClosed(Exception):
    """The session ended (deleted, reaped, or the service stopped): no more ticks or events."""


@dataclass(frozen=True)
class MediaTick:
    """One frame and the audio that plays with it."""

    index: int
    """Frame number on the session clock: 0, 1, 2, ... never skips."""
    pts_s: float
    """index / fps, the presentation time of the frame and of its audio."""
    frame: np.ndarray
    """(H, W, 3) uint8 RGB, H and W even."""
    audio: np.ndarray
    """(SAMPLE_RATE // fps,) int16 mono: exactly the audio that plays with this frame."""
    utterance_id: Optional[str]
    """The utterance whose audio is in this tick, None when idle."""
    mouth_open: float
    """The control that drove this frame (for tests and benchmarks)."""


class Subscription:
    """One viewer's feed. A slow viewer drops its own oldest ticks; it never slows the session or other viewers.

    Fed on the event loop by the session (`_deliver`); `get` waits for the next tick. At most
    `buffer` ticks wait: past that the oldest is dropped and counted in `dropped`.
    """

    def __init__(self, buffer: int = 8, on_close: Optional[Callable[["Subscription"], None]] = None) -> None:
        self._queue: collections.deque[MediaTick] = collections.deque()
        self._buffer = max(1, int(buffer))
        self._waiter: Optional[asyncio.Future] = None
        self._on_close = on_close
        self._closed = False  # the viewer left
        self._ended = False  # the session ended
        self.dropped = 0
        """Ticks this viewer lost because it did not take them in time."""
        self.delivered = 0
        """Ticks handed to this viewer (taken or still waiting)."""

    @property
    def closed(self) -> bool:
        """Whether the viewer left or the session ended."""
        return self._closed or self._ended

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _deliver(self, tick: MediaTick) -> None:
        """Queue a tick (event loop only); drops the oldest past the buffer."""
        if self.closed:
            return
        self._queue.append(tick)
        self.delivered += 1
        while len(self._queue) > self._buffer:
            self._queue.popleft()
            self.dropped += 1
        self._wake()

    def _end(self) -> None:
        """The session ended (event loop only): `get` drains what is queued, then raises SessionClosed."""
        self._ended = True
        self._wake()

    def pending(self) -> int:
        """Ticks waiting to be taken."""
        return len(self._queue)

    async def get(self) -> MediaTick:
        """The next tick, waiting for it; raises SessionClosed when the session ends (or this feed was closed)."""
        while True:
            if self._closed:
                raise SessionClosed("this subscription was closed")
            if self._queue:
                return self._queue.popleft()
            if self._ended:
                raise SessionClosed("the session ended")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def get_nowait(self) -> Optional[MediaTick]:
        """The next tick if one is waiting, else None (raises SessionClosed once closed and drained)."""
        if self._queue and not self._closed:
            return self._queue.popleft()
        if self.closed:
            raise SessionClosed("the session ended" if self._ended else "this subscription was closed")
        return None

    def close(self) -> None:
        """The viewer left (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._wake()
        if self._on_close is not None:
            self._on_close(self)

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> MediaTick:
        try:
            return await self.get()
        except SessionClosed:
            raise StopAsyncIteration from None
