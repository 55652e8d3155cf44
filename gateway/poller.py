"""Background work against the PVS: fixed-cadence polling and keep-alive.

Polling keeps chosen resources fresh so callers are always served from
memory: each is refreshed shortly before its TTL runs out, through the same
cache (so a refresh and a caller's miss coalesce) and the same budget. The
keep-alive sends one cheap read after ``keepalive_interval`` seconds of
upstream silence: some PVS units drop their Wi-Fi hotspot when nobody polls.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.allowlist import Resource, classify
from gateway.cache import ResponseCache
from gateway.errors import GatewayError
from gateway.proxy import Proxy
from gateway.settings import Settings
from gateway.upstream import UpstreamClient

log = logging.getLogger("gateway.poller")

KEEPALIVE = {"legacy": "/cgi-bin/dl_cgi/supervisor/info", "localapi": "/vars?name=/sys/info/uptime&fmt=obj"}


def poll_resource(spec: str) -> Resource:
    """"DeviceList" or "/vars?match=/sys/livedata/&fmt=obj" -> an allowlisted Resource."""
    if "/" not in spec and "?" not in spec:
        spec = f"/cgi-bin/dl_cgi?Command={spec}"
    path, _, query = spec.partition("?")
    resource = classify(path.encode(), query.encode())
    if resource.kind == "local" or not resource.target:
        raise ValueError(f"{spec!r} cannot be polled")
    return resource


# /readyz is unauthenticated: it may make the gateway probe the PVS, but at most this often.
PROBE_FLOOR = 10.0


class Poller:
    def __init__(self, settings: Settings, *, proxy: Proxy, cache: ResponseCache, upstream: UpstreamClient) -> None:
        self._settings = settings
        self._proxy = proxy
        self._cache = cache
        self._upstream = upstream
        self._resources = [poll_resource(spec) for spec in settings.upstream.poll]
        self._probe: asyncio.Task[object] | None = None
        self._last_probe = -PROBE_FLOOR

    async def probe(self, wait: float = 2.0) -> None:
        """One cheap upstream read (within the budget) so readiness reflects the PVS now.

        Coalesced and floored, so polling /readyz cannot turn into load on the PVS.
        """
        if self._probe is None or self._probe.done():
            now = time.monotonic()
            if now - self._last_probe < PROBE_FLOOR:
                return
            self._last_probe = now
            target = KEEPALIVE.get(self._upstream.firmware or "legacy", KEEPALIVE["legacy"])
            self._probe = asyncio.create_task(self._upstream.fetch(target))
            self._probe.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.wait({self._probe}, timeout=wait)

    async def run(self) -> None:
        jobs = [self._poll(r) for r in self._resources]
        if self._settings.upstream.keepalive_interval > 0:
            jobs.append(self._keepalive())
        if jobs:
            await asyncio.gather(*jobs)

    async def _poll(self, resource: Resource) -> None:
        ttl = self._settings.ttl_for(resource.name)
        while True:
            try:
                await self._proxy.lookup(resource)
            except GatewayError as exc:
                log.debug("poll of %s failed: %s", resource.target, exc.detail)
            entry = self._cache.peek(resource.key)
            # Refresh at 90% of the TTL, so callers never see it expire; after a failure, retry after the back-off.
            wait = ttl * 0.9 - self._cache.age(entry) if entry is not None else 1.0
            wait = max(wait, self._upstream.health.backoff_remaining(), 0.5)
            await asyncio.sleep(wait)

    async def _keepalive(self) -> None:
        interval = self._settings.upstream.keepalive_interval
        while True:
            idle = time.monotonic() - self._upstream.last_request_mono
            if self._upstream.budget.in_flight:
                idle = 0.0
            elif idle >= interval:
                target = KEEPALIVE.get(self._upstream.firmware or "legacy", KEEPALIVE["legacy"])
                try:
                    await self._upstream.fetch(target)
                except GatewayError as exc:
                    log.info("keep-alive request failed: %s", exc.detail)
                idle = 0.0
            await asyncio.sleep(max(1.0, interval - idle))
