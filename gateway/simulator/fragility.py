"""What makes a PVS fall over: few request slots, and reboots under sustained overload.

A request that finds every slot busy is rejected (the caller answers 503 or
hangs); ``overload_limit`` rejections within ``overload_window`` seconds make
the device reboot. While rebooting it answers nothing; when it comes back
its uptime restarts.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable


class Fragility:
    def __init__(
        self,
        *,
        capacity: int,
        overload_limit: int,
        overload_window: float,
        reboot_seconds: float,
        on_power_lost: Callable[[], None],
        on_booted: Callable[[], None],
    ) -> None:
        self.capacity = capacity
        self.busy = 0
        self._limit = overload_limit
        self._window = overload_window
        self._reboot_seconds = reboot_seconds
        self._on_power_lost = on_power_lost
        self._on_booted = on_booted
        self._rejections: collections.deque[float] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self.rebooting_until: float | None = None
        self.epoch = 0  # changes at every power loss: work begun before it is lost

    @property
    def rebooting(self) -> bool:
        return self.rebooting_until is not None

    def try_acquire(self) -> bool:
        if self.busy >= self.capacity:
            return False
        self.busy += 1
        return True

    def release(self) -> None:
        self.busy -= 1

    def rejected(self) -> None:
        now = time.monotonic()
        self._rejections.append(now)
        while self._rejections and now - self._rejections[0] > self._window:
            self._rejections.popleft()
        if len(self._rejections) >= self._limit:
            self.reboot()

    def reset_window(self) -> None:
        self._rejections.clear()

    def reboot(self, seconds: float | None = None) -> None:
        """Lose power now and come back after ``seconds``; ignored while already rebooting."""
        if self.rebooting:
            return
        duration = self._reboot_seconds if seconds is None else seconds
        self.rebooting_until = time.monotonic() + duration
        self.epoch += 1
        self._rejections.clear()
        self._timer = asyncio.get_running_loop().call_later(duration, self._boot)
        self._on_power_lost()

    def remaining(self) -> float | None:
        if self.rebooting_until is None:
            return None
        return max(0.0, self.rebooting_until - time.monotonic())

    def boot_now(self) -> None:
        """End a reboot in progress at once (a test asking for normal service)."""
        if self._timer is not None:
            self._timer.cancel()
        if self.rebooting:
            self._boot()

    def _boot(self) -> None:
        self._timer = None
        self.rebooting_until = None
        self._on_booted()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
