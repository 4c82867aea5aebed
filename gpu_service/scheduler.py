"""Per-engine slots with a bounded wait queue; engine calls run in the engine's own worker threads.

A slot is held for as long as the engine really works: a request that is cancelled (its client
went away) gives its slot back only when the worker thread has returned, so `slots` always
bounds the calls running at once, and a stream's producer is told to stop and its generator
closed whatever way its consumer ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator, TypeVar

from gpu_service.errors import Overloaded

T = TypeVar("T")

STREAM_AHEAD = 4
"""Items a stream's producer may make before the consumer takes them (backpressure)."""


class EngineSlots:
    """At most `slots` calls run at once; at most `queue_size` wait; the rest get 429."""

    def __init__(self, name: str, slots: int, queue_size: int, retry_after_s: int = 1) -> None:
        self.name = name
        self.slots = slots
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self._sem = asyncio.Semaphore(slots)
        # One thread per slot: engine work never waits behind (or starves) the loop's shared pool.
        self._threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix=f"{name}-worker")
        self.busy = 0
        self.waiting = 0

    @property
    def load(self) -> float:
        """Running and waiting calls per slot: what least-loaded placement compares."""
        return (self.busy + self.waiting) / self.slots

    @property
    def full(self) -> bool:
        """Every slot busy and the queue full: the next call would be refused."""
        return self.busy >= self.slots and self.waiting >= self.queue_size

    def close(self) -> None:
        """Let the worker threads end once their current call returns (the app is stopping)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _enter(self) -> None:
        """Take a slot, waiting in the queue if there is room in it, else raise Overloaded."""
        if self.full:
            raise Overloaded(
                f"engine {self.name!r} is busy: {self.busy} running and {self.waiting} waiting; retry shortly",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1

    def _leave(self) -> None:
        """Give a slot back (on the event loop's thread)."""
        self.busy -= 1
        self._sem.release()

    def _leave_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the slot any more
            loop.call_soon_threadsafe(self._leave)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block, or raise Overloaded at once."""
        await self._enter()
        try:
            yield
        finally:
            self._leave()

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run a blocking engine call in a worker thread while holding a slot (until the thread returns)."""
        await self._enter()
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        try:
            future = self._threads.submit(call)
        except BaseException:
            self._leave()
            raise
        future.add_done_callback(lambda _: self._leave_from_thread(loop))
        return await asyncio.wrap_future(future)

    async def stream(self, make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Drive a blocking generator in a worker thread, handing items to the event loop as they come.

        However the consumer ends (exhausted, an error, cancelled, closed by a client that left),
        the producer stops at its next item, the generator is closed (its own `finally` runs) and
        the slot is given back when the thread is done: before the consumer sees the end or the
        error, so a caller that goes on to the next call finds the slot free. The consumer waits on
        an asyncio queue, so no thread is ever parked on its behalf.
        """
        await self._enter()
        loop = asyncio.get_running_loop()
        out: "asyncio.Queue[tuple[str, object]]" = asyncio.Queue()
        credit = threading.Semaphore(STREAM_AHEAD)
        stop = threading.Event()

        def deliver(kind: str, value: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(out.put_nowait, (kind, value))

        def produce() -> None:
            items, last = None, ("end", None)
            try:
                items = make_iter()
                for item in items:
                    while not credit.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    deliver("item", item)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                last = ("error", exc)
            finally:
                close = getattr(items, "close", None)
                try:
                    if close is not None:
                        close()
                finally:
                    # The loop runs these in order: the slot is free by the time the consumer sees the last word.
                    self._leave_from_thread(loop)
                    deliver(*last)

        try:
            self._threads.submit(contextvars.copy_context().run, produce)
        except BaseException:
            self._leave()
            raise
        try:
            while True:
                kind, value = await out.get()
                if kind == "item":
                    credit.release()
                    yield value  # type: ignore[misc]
                elif kind == "error":
                    raise value  # type: ignore[misc]
                else:
                    return
        finally:
            stop.set()  # no await here: a cancelled consumer may not wait for anything


class SlotTotals:
    """The counts of several EngineSlots summed (one engine's replicas on several devices), read-only."""

    def __init__(self, name: str, members: list[EngineSlots]) -> None:
        self.name = name
        self.members = members

    @property
    def slots(self) -> int:
        """Slots over every member."""
        return sum(m.slots for m in self.members)

    @property
    def busy(self) -> int:
        """Calls running over every member."""
        return sum(m.busy for m in self.members)

    @property
    def waiting(self) -> int:
        """Calls waiting over every member."""
        return sum(m.waiting for m in self.members)

    @property
    def queue_size(self) -> int:
        """Queue room over every member."""
        return sum(m.queue_size for m in self.members)
