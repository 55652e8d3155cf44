"""The global upstream budget: what the PVS sees, whoever calls.

At most ``max_concurrency`` requests in flight, starts at least
``min_interval`` apart, waiters served first come first served, a bounded
queue and a bounded wait. A full queue sheds load at once (503) instead of
piling up work the PVS could never finish.

With a ``Shared`` Redis the budget is cluster-wide (SPEC §2 ``[cluster]``):
- a slot is first taken locally (the FIFO queue above), then as a *lease* in
  a Redis sorted set (member = holder, score = expiry). The holder renews it
  while it holds it; a gateway that dies stops renewing and its lease expires
  within ``lease_ttl``, so a dead replica never keeps the PVS's slot.
- the next allowed start time is one Redis value, reserved atomically, so
  ``min_interval`` holds between the starts of any two gateways.
While Redis is unreachable each gateway carries on with its local budget.

A slot is held for as long as the PVS works on the request, not as long as
the caller waits: ``Slot.keep_until(work)`` hands the release over to the
unfinished exchange (a caller that timed out or hung up), so the PVS never
sees more than ``max_concurrency`` requests, whoever gave up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

from gateway.errors import Overloaded
from gateway.shared import Shared, key

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.upstream")

LEASES_KEY = key("budget", "leases")
NEXT_START_KEY = key("budget", "next_start")
# A lease not renewed for this long is free again (its holder died or lost Redis).
LEASE_TTL = 5.0
POLL_MIN, POLL_MAX = 0.02, 0.1  # seconds between tries for a cluster slot

# ARGV[1] = now (Unix seconds; negative: use Redis's clock), so one clock rules all gateways.
_NOW = "local now = tonumber(ARGV[1]) if now < 0 then local t = redis.call('TIME') now = t[1] + t[2] / 1000000 end "
# Take or renew the lease ARGV[2] for ARGV[4] seconds if fewer than ARGV[3] live leases exist.
_ACQUIRE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) * 1000))
  return 1
end
return 0
"""
# Reserve the next start at least ARGV[2] seconds after the previous one; reply: seconds to wait.
_PACE = _NOW + """
local start = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
redis.call('SET', KEYS[1], tostring(start + tonumber(ARGV[2])), 'PX', math.ceil((start - now + tonumber(ARGV[2])) * 1000) + 1000)
return tostring(start - now)
"""


class Slot:
    """One held upstream slot (and its cluster lease, when Redis is in use)."""

    def __init__(self, lease: str | None) -> None:
        self.lease = lease
        self.kept: asyncio.Future[Any] | None = None
        self.renewer: asyncio.Task[None] | None = None

    def keep_until(self, work: asyncio.Future[Any]) -> None:
        """Hold the slot after the ``async with`` ends, until ``work`` (the PVS exchange) is done."""
        self.kept = work


class UpstreamBudget:
    def __init__(
        self,
        *,
        max_concurrency: int,
        min_interval: float,
        max_queue: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        shared: Shared | None = None,
        wall: Callable[[], float] | None = None,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        self._max = max_concurrency
        self._free = max_concurrency
        self._min_interval = min_interval
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._clock = clock
        self._shared = shared if shared is not None and shared.configured else None
        self._wall = wall  # None: Redis's own clock (one clock for every gateway)
        self._lease_ttl = lease_ttl
        self._me = secrets.token_hex(6)
        self._leases = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._next_start = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.shed = 0
        self.started = 0
        self.kept_after_caller = 0  # slots held on for a PVS still working after its caller left

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Hold one upstream slot; call ``pace()`` before each request sent in it."""
        deadline = self._clock() + self._queue_timeout
        await self._acquire()
        try:
            lease = await self._cluster_acquire(deadline)
        except BaseException:
            self._release()
            raise
        slot = Slot(lease)
        if lease is not None:
            slot.renewer = asyncio.get_running_loop().create_task(self._renew(lease), name="budget-lease")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield slot
        finally:
            work = slot.kept
            if work is not None and not work.done():
                self.kept_after_caller += 1
                self._spawn(self._finish_after(slot, work))
            else:
                await self._finish(slot)

    async def pace(self) -> None:
        """Wait until the next start is allowed (cluster-wide with Redis), and reserve it."""
        delay = await self.reserve_start()
        if delay > 0:
            await asyncio.sleep(delay)

    async def reserve_start(self) -> float:
        """Reserve the next start; return the seconds to wait for it."""
        now = self._clock()
        start = max(now, self._next_start)
        self._next_start = start + self._min_interval
        self.started += 1
        delay = start - now
        if self._shared is not None and self._min_interval > 0:
            shared_delay = await self._shared.run(self._pace_script)
            if shared_delay is not None:  # the cluster's next start rules; the local one is the fallback
                delay = shared_delay
                self._next_start = now + delay + self._min_interval
        return delay

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # -------------------------------------------------------------- cluster

    def _now_arg(self) -> float:
        return self._wall() if self._wall is not None else -1.0

    async def _pace_script(self, redis: Redis) -> float:
        reply = await redis.eval(_PACE, 1, NEXT_START_KEY, self._now_arg(), self._min_interval)
        return max(0.0, float(reply))

    async def _try_lease(self, lease: str) -> bool | None:
        async def op(redis: Redis) -> bool:
            got = await redis.eval(_ACQUIRE, 1, LEASES_KEY, self._now_arg(), lease, self._max, self._lease_ttl)
            return bool(got)

        return await self._shared.run(op) if self._shared is not None else None

    async def _cluster_acquire(self, deadline: float) -> str | None:
        """A cluster lease (its id), or None when there is no Redis to share through."""
        if self._shared is None:
            return None
        self._leases += 1
        lease = f"{self._me}:{self._leases}"
        pause = POLL_MIN
        while True:
            got = await self._try_lease(lease)
            if got is None:
                return None  # Redis unreachable: the local slot is the budget now
            if got:
                return lease
            if self._clock() + pause > deadline:
                self.shed += 1
                raise Overloaded(
                    f"waited {self._queue_timeout:g} s for the PVS without a turn (other gateways hold it); retry later",
                    retry_after=self._retry_after(),
                )
            await asyncio.sleep(pause)
            pause = min(POLL_MAX, pause * 2)

    async def _renew(self, lease: str) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            if await self._try_lease(lease) is False:
                log.warning("cluster: upstream lease %s lapsed and the budget is full; finishing this request", lease)

    async def _finish(self, slot: Slot) -> None:
        if slot.renewer is not None:
            slot.renewer.cancel()
        try:
            if slot.lease is not None and self._shared is not None:
                lease = slot.lease
                await self._shared.run(lambda r: r.zrem(LEASES_KEY, lease))  # else it expires by itself
        finally:
            self.in_flight -= 1
            self._release()

    async def _finish_after(self, slot: Slot, work: asyncio.Future[Any]) -> None:
        with suppress(BaseException):
            await asyncio.wait([work])
        await self._finish(slot)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="budget-release")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -------------------------------------------------------------- local

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
                with suppress(ValueError):
                    self._waiters.remove(fut)
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
