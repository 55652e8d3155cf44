"""PVS health as the gateway sees it: failures, back-off, reboots.

After ``failure_threshold`` consecutive failures the gateway stops calling
the PVS for an exponentially growing, capped while, then lets one request
through to probe it. A PVS that is rebooting or wedged is left alone instead
of being hammered, and callers get a fast 503 (or stale data) instead of a
slow timeout. Outside automations (power-cycling a hung PVS) read
``consecutive_failures`` and ``last_success`` from /readyz and /metrics.

With a ``Shared`` Redis the count, the back-off and the last success are the
cluster's (one hash, times in Unix seconds): a PVS that failed for one
gateway is left alone by all of them. ``pull`` adopts the shared state before
each upstream request; ``record_success`` / ``record_failure`` update both.
While Redis is unreachable the local state carries on alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.errors import UpstreamUnavailable
from gateway.shared import Shared, key

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.upstream")

HEALTH_KEY = key("pvs", "health")  # hash: failures, backoff_until, last_success, last_error
KEEP_FOR_MS = 24 * 3600 * 1000  # the hash outlives any back-off; a day without writes drops it
FOLLOW_INTERVAL = 1.0  # seconds between adoptions of the cluster's state by an idle gateway


class UpstreamHealth:
    def __init__(
        self,
        *,
        failure_threshold: int,
        backoff_initial: float,
        backoff_max: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        shared: Shared | None = None,
    ) -> None:
        self._shared = shared if shared is not None and shared.configured else None
        self._threshold = failure_threshold
        self._initial = backoff_initial
        self._max = backoff_max
        self._clock = clock
        self._wall = wall
        self.consecutive_failures = 0
        self.last_success: float | None = None  # wall clock
        self.last_success_mono: float | None = None
        self.last_error: str | None = None
        self.backoff_until = 0.0
        self.reboots_noticed = 0
        self.errors_by_kind: dict[str, int] = {}
        self._last_uptime: float | None = None

    @property
    def failing(self) -> bool:
        return self.consecutive_failures > 0

    def backoff_remaining(self) -> float:
        return max(0.0, self.backoff_until - self._clock())

    def check(self) -> None:
        """Raise if the gateway is currently leaving the PVS alone."""
        remaining = self.backoff_remaining()
        if remaining > 0:
            raise UpstreamUnavailable(
                f"the PVS failed {self.consecutive_failures} times in a row "
                f"(last: {self.last_error}); the gateway is giving it {remaining:.0f} s to recover",
                retry_after=remaining,
            )

    def success(self) -> None:
        if self.consecutive_failures >= self._threshold:
            log.info("PVS answering again after %d failures", self.consecutive_failures)
        self.consecutive_failures = 0
        self.backoff_until = 0.0
        self.last_success = self._wall()
        self.last_success_mono = self._clock()

    def failure(self, kind: str, detail: str) -> None:
        self.consecutive_failures += 1
        self.last_error = detail
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
        over = self.consecutive_failures - self._threshold
        if over >= 0:
            delay = min(self._max, self._initial * (2**over))
            self.backoff_until = self._clock() + delay
            log.warning(
                "PVS failed %d times in a row (%s); backing off %.0f s",
                self.consecutive_failures,
                detail,
                delay,
            )

    def observe_uptime(self, uptime: float) -> bool:
        """Record the PVS's uptime; return True when it went down (a reboot)."""
        rebooted = self._last_uptime is not None and uptime + 1 < self._last_uptime
        if rebooted:
            self.reboots_noticed += 1
            log.warning("PVS rebooted (uptime %.0f s, was %.0f s)", uptime, self._last_uptime)
        self._last_uptime = uptime
        return rebooted

    def since_success(self) -> float | None:
        if self.last_success_mono is None:
            return None
        return self._clock() - self.last_success_mono

    # -------------------------------------------------------------- cluster

    async def pull(self) -> None:
        """Adopt the cluster's failures, back-off and last success (no-op without Redis)."""
        if self._shared is None:
            return
        found = await self._shared.run(lambda r: r.hgetall(HEALTH_KEY))
        if not found:
            return
        values = {_text(k): _text(v) for k, v in found.items()}
        now, wall = self._clock(), self._wall()
        self.consecutive_failures = int(values.get("failures") or 0)
        backoff_until = float(values.get("backoff_until") or 0)
        self.backoff_until = now + (backoff_until - wall) if backoff_until > wall else 0.0
        self.last_error = values.get("last_error") or self.last_error
        last_success = float(values.get("last_success") or 0)
        if last_success and (self.last_success is None or last_success > self.last_success):
            self.last_success = last_success
            self.last_success_mono = now - max(0.0, wall - last_success)

    async def follow(self) -> None:
        """Keep adopting the cluster's state, so /readyz on an idle replica knows what the others saw."""
        if self._shared is None:
            return
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            await self.pull()

    async def record_success(self) -> None:
        self.success()
        if self._shared is not None:
            mapping = {"failures": "0", "backoff_until": "0", "last_success": repr(self.last_success)}
            await self._shared.run(lambda r: _write(r, mapping))

    async def record_failure(self, kind: str, detail: str) -> None:
        if self._shared is not None:
            failures = await self._shared.run(lambda r: r.hincrby(HEALTH_KEY, "failures", 1))
            if failures is not None:
                self.consecutive_failures = int(failures) - 1  # failure() counts this one
        self.failure(kind, detail)
        if self._shared is not None:
            until = self._wall() + self.backoff_remaining() if self.backoff_remaining() > 0 else 0.0
            mapping = {"backoff_until": repr(until), "last_error": detail}
            await self._shared.run(lambda r: _write(r, mapping))


async def _write(redis: Redis, mapping: dict[str, str]) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(HEALTH_KEY, mapping=mapping)  # type: ignore[arg-type]
        pipe.pexpire(HEALTH_KEY, KEEP_FOR_MS)
        await pipe.execute()


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")
