"""PVS health as the gateway sees it: failures, back-off, reboots.

After ``failure_threshold`` consecutive failures the gateway stops calling
the PVS for an exponentially growing, capped while, then lets one request
through to probe it. A PVS that is rebooting or wedged is left alone instead
of being hammered, and callers get a fast 503 (or stale data) instead of a
slow timeout. Outside automations (power-cycling a hung PVS) read
``consecutive_failures`` and ``last_success`` from /readyz and /metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.errors import UpstreamUnavailable

log = logging.getLogger("gateway.upstream")


class UpstreamHealth:
    def __init__(
        self,
        *,
        failure_threshold: int,
        backoff_initial: float,
        backoff_max: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
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
