"""Per-engine slots with a bounded wait queue; engine calls run in worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import AsyncIterator, Callable, Iterator, TypeVar

from gpu_service.errors import Overloaded

T = TypeVar("T")


class EngineSlots:
    """At most `slots` calls run at once; at most `queue_size` wait; the rest get 429."""

    def __init__(self, name: str, slots: int, queue_size: int, retry_after_s: int = 1) -> None:
        self.name = name
        self.slots = slots
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self._sem = asyncio.Semaphore(slots)
        self.busy = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block, or raise Overloaded at once."""
        if self.busy >= self.slots and self.waiting >= self.queue_size:
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
        try:
            yield
        finally:
            self.busy -= 1
            self._sem.release()

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run a blocking engine call in a thread while holding a slot."""
        async with self.acquire():
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def stream(self, make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Drive a blocking generator in a thread, handing items to the event loop as they come."""
        async with self.acquire():
            items: "queue.Queue[tuple[str, object]]" = queue.Queue(maxsize=4)
            stop = threading.Event()

            def produce() -> None:
                try:
                    for item in make_iter():
                        while not stop.is_set():
                            try:
                                items.put(("item", item), timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                    items.put(("end", None))
                except BaseException as exc:  # handed to the consumer, which re-raises it
                    items.put(("error", exc))

            worker = threading.Thread(target=produce, name=f"{self.name}-stream", daemon=True)
            worker.start()
            try:
                while True:
                    kind, value = await asyncio.to_thread(items.get)
                    if kind == "item":
                        yield value  # type: ignore[misc]
                    elif kind == "error":
                        raise value  # type: ignore[misc]
                    else:
                        break
            finally:
                stop.set()
                await asyncio.to_thread(worker.join, 30)
