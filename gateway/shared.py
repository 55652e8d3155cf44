"""State shared between gateways through Redis (``cluster.redis_url``), or kept locally.

Every component keeps its own local state and asks ``Shared.run`` to do the
shared part. ``run`` never raises for Redis trouble: while Redis is not
configured or unreachable it returns ``None`` and the caller carries on with
its local state (SPEC §2 ``[cluster]``: never a 500). Each change between
reachable and unreachable is logged once.

Keys all start with ``pvsgw:``. Times stored in Redis are Unix (wall-clock)
seconds: several hosts read them, and monotonic clocks mean nothing across
hosts, so the gateways' clocks should be NTP-synchronised (the skew between
them is the error in cluster-wide ages and intervals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.cluster")
T = TypeVar("T")

PREFIX = "pvsgw:"
# After a failure, Redis is not asked again for this long (each caller would otherwise wait
# for its own connect timeout); the first success after it ends the outage.
RETRY_AFTER = 1.0
# How often ``watch`` checks Redis, so the state (and /metrics) follows Redis even when idle.
WATCH_INTERVAL = 1.0


class Shared:
    def __init__(self, url: str = "", *, clock: Callable[[], float] = time.monotonic, timeout: float = 0.5) -> None:
        self.url = url
        self._clock = clock
        self._timeout = timeout
        self._redis: Redis | None = None
        self._down_until = 0.0
        self._probing = False
        self.available = False  # True once Redis answered, until it fails
        self.outages = 0
        self.changed_at: float | None = None  # monotonic, the last change between reachable and not

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
        # During an outage one call at a time finds out whether Redis is back; the others carry
        # on locally at once instead of each waiting for a timeout from a silent Redis.
        recovering = self.outages > 0 and not self.available
        if recovering and self._probing:
            return None
        if recovering:
            self._probing = True
        try:
            try:
                result = await op(redis)
            except Exception as exc:
                # A connection pooled before Redis restarted fails once ("closed by server"); the
                # retry gets a fresh one. Not during an outage, nor after a timeout (a silent Redis).
                if not (self.available and _is_closed_connection(exc)):
                    raise
                result = await op(redis)
        except Exception as exc:  # redis-py raises ConnectionError, TimeoutError, OSError, ...
            self._down_until = self._clock() + RETRY_AFTER
            # Drop every pooled connection: those to a Redis that went away would each fail once
            # more after it returns, and each failure would count as a new outage.
            with contextlib.suppress(Exception):
                await redis.connection_pool.disconnect()
            if self.available or self.outages == 0:
                self.outages += 1
                self.changed_at = self._clock()
                log.warning(
                    "cluster: Redis at %s unreachable (%s: %.200s); carrying on with local state",
                    _safe(self.url), type(exc).__name__, exc,
                )
            self.available = False
            return None
        finally:
            if recovering:
                self._probing = False
        if not self.available:
            self.available = True
            self.changed_at = self._clock()
            log.info("cluster: Redis at %s reachable; using shared state", _safe(self.url))
        return result

    async def watch(self) -> None:
        """Ping Redis every second, so an idle gateway notices outages and returns to shared state."""
        if not self.configured:
            return
        while True:
            await self.run(lambda r: r.ping())
            await asyncio.sleep(WATCH_INTERVAL)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


class Lease:
    """A lock with an expiry in Redis (``SET NX PX``): it frees itself if its holder dies.

    The holder renews it (``renew``) while it works; only the holder's token can
    renew or release it. Used for one fetch per resource cluster-wide.
    """

    # Renew or release only when the lock is still ours.
    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, shared: Shared, key: str, ttl: float) -> None:
        self._shared = shared
        self.key = key
        self._ttl_ms = max(1, int(ttl * 1000))
        self.token = secrets.token_hex(8)

    async def acquire(self) -> bool | None:
        """True: ours; False: someone else holds it; None: Redis unavailable."""
        async def op(r: Redis) -> bool:
            return bool(await r.set(self.key, self.token, nx=True, px=self._ttl_ms))

        return await self._shared.run(op)

    async def renew(self) -> None:
        await self._shared.run(lambda r: r.eval(self._RENEW, 1, self.key, self.token, self._ttl_ms))

    async def release(self) -> None:
        await self._shared.run(lambda r: r.eval(self._RELEASE, 1, self.key, self.token))


def _is_closed_connection(exc: Exception) -> bool:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, RedisConnectionError) and not isinstance(exc, RedisTimeoutError)


def key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def _safe(url: str) -> str:
    """The URL without a password, for logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    return url


def status(shared: Shared) -> dict[str, Any]:
    """For /readyz's body and /stats: ``{"mode": ..., "outages": n}``."""
    if not shared.configured:
        return {"mode": "local"}
    return {"mode": "shared" if shared.available else "local (Redis unreachable)", "outages": shared.outages}


class SharedCollector:
    """``pvsgw_cluster_redis_up`` and ``pvsgw_cluster_redis_outages_total`` for /metrics (only with Redis)."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    def collect(self) -> Iterator[Metric]:
        if not self._shared.configured:
            return
        yield GaugeMetricFamily(
            "pvsgw_cluster_redis_up", "1 while the shared Redis answers, 0 while this gateway runs on local state",
            value=1 if self._shared.available else 0,
        )
        yield CounterMetricFamily(
            "pvsgw_cluster_redis_outages", "Times Redis became unreachable", value=self._shared.outages
        )
