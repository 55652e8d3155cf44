"""The global upstream budget: what the PVS sees, whoever calls.

At most ``max_concurrency`` requests in flight, starts at least
``min_interval`` apart, waiters served first come first served, a bounded
queue and a bounded wait. A full queue sheds load at once (503) instead of
piling up work the PVS could never finish.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.errors import Overloaded


class UpstreamBudget:
    def __init__(
        self,
        *,
        max_concurrency: int,
        min_interval: float,
        max_queue: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = max_concurrency
        self._min_interval = min_interval
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._clock = clock
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._next_start = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.shed = 0
        self.started = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one upstream slot; call ``pace()`` before each request sent in it."""
        await self._acquire()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self._release()

    async def pace(self) -> None:
        """Wait until the next start is allowed, and reserve it."""
        now = self._clock()
        start = max(now, self._next_start)
        self._next_start = start + self._min_interval
        self.started += 1
        if start > now:
            await asyncio.sleep(start - now)

    def _retry_after(self) -> float:
        return max(1.0, self._min_interval * (len(self._waiters) + 1))

    async def _acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self._max_queue:
            self.shed += 1
            raise Overloaded(
                "the PVS is busy and the gateway's queue for it is full; retry later",
                retry_after=self._retry_after(),
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self._queue_timeout):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us just as we gave up: pass it on.
                self._release()
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                self.shed += 1
                raise Overloaded(
                    f"waited {self._queue_timeout:g} s for the PVS without a turn; retry later",
                    retry_after=self._retry_after(),
                ) from None
            raise

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot over directly: FIFO, no barging
                return
        self._free += 1
