"""State shared between gateways through Redis (``cluster.redis_url``), or kept locally.

Every component keeps its own local state and asks ``Shared.run`` to do the
shared part. ``run`` never raises for Redis trouble: while Redis is not
configured or unreachable it returns ``None`` and the caller carries on with
its local state (SPEC §2 ``[cluster]``: never a 500). Each change between
reachable and unreachable is logged once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.cluster")
T = TypeVar("T")

# After a failure, Redis is not asked again for this long (each caller would otherwise wait
# for its own connect timeout); the first success after it ends the outage.
RETRY_AFTER = 1.0


class Shared:
    def __init__(self, url: str = "", *, clock: Callable[[], float] = time.monotonic, timeout: float = 0.5) -> None:
        self.url = url
        self._clock = clock
        self._timeout = timeout
        self._redis: Redis | None = None
        self._down_until = 0.0
        self.available = False  # True once Redis answered, until it fails
        self.outages = 0

    @property
    def configured(self) -> bool:
        return bool(self.url)

    def client(self) -> Redis | None:
        if not self.url:
            return None
        if self._redis is None:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(
                self.url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout, health_check_interval=5
            )
        return self._redis

    async def run(self, op: Callable[[Redis], Awaitable[T]]) -> T | None:
        """``op(redis)``, or None when Redis is not configured, down, or failed this time."""
        redis = self.client()
        if redis is None or self._clock() < self._down_until:
            return None
        try:
            result = await op(redis)
        except Exception as exc:  # redis-py raises ConnectionError, TimeoutError, OSError, ...
            self._down_until = self._clock() + RETRY_AFTER
            if self.available or self.outages == 0:
                self.outages += 1
                log.warning("cluster: Redis at %s unreachable (%s); carrying on with local state", _safe(self.url), type(exc).__name__)
            self.available = False
            return None
        if not self.available:
            self.available = True
            log.info("cluster: Redis at %s reachable; using shared state", _safe(self.url))
        return result

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def _safe(url: str) -> str:
    """The URL without a password, for logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    return url


def status(shared: Shared) -> dict[str, Any]:
    """For /readyz's body and /stats."""
    if not shared.configured:
        return {"mode": "local"}
    return {"mode": "shared" if shared.available else "local (Redis unreachable)", "outages": shared.outages}
