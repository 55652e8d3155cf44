"""Background work against the PVS: fixed-cadence polling and keep-alive.

Polling keeps chosen resources fresh so callers are always served from
memory: each is refreshed shortly before its TTL runs out, through the same
cache (so a refresh and a caller's miss coalesce) and the same budget. The
keep-alive sends one cheap read after ``keepalive_interval`` seconds of
upstream silence: some PVS units drop their Wi-Fi hotspot when nobody polls.

With polling on, the poller first prefetches the cheap reads that legacy clients
make around their DeviceList (``PREFETCH``): with one upstream slot, a cold
``Get_Comm`` asked while the ~10 s DeviceList is in flight waits behind it, longer
than the Prometheus exporter's 10 s timeout (which then stops scraping).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.allowlist import Resource, classify
from gateway.cache import Lookup, ResponseCache
from gateway.errors import GatewayError
from gateway.normalize import supervisor_from_device_list, supervisor_from_info
from gateway.proxy import Proxy
from gateway.settings import Settings
from gateway.upstream import UpstreamClient

log = logging.getLogger("gateway.poller")

KEEPALIVE = {"legacy": "/cgi-bin/dl_cgi/supervisor/info", "localapi": "/vars?name=/sys/info/uptime&fmt=obj"}
SUPERVISOR_INFO = "/cgi-bin/dl_cgi/supervisor/info"
DEVICE_LIST = "/cgi-bin/dl_cgi?Command=DeviceList"
# Read once at start when polling is on, before the polled resources. supervisor/info
# first: it answers Command=Start, is open without a session on every firmware, and its
# read settles the firmware kind. Then what the exporter and sungazer read next to
# DeviceList, on legacy firmware only (on LocalAPI firmware dl_cgi commands need a
# session, and those clients do not work there anyway).
PREFETCH_LEGACY = ("Get_Comm", "GridProfileGet")


def poll_resource(spec: str) -> Resource:
    """"DeviceList" or "/vars?match=/sys/livedata/&fmt=obj" -> an allowlisted Resource."""
    if "/" not in spec and "?" not in spec:
        spec = f"/cgi-bin/dl_cgi?Command={spec}"
    path, _, query = spec.partition("?")
    resource = classify(path.encode(), query.encode())
    if resource.kind == "local" or not resource.target:
        raise ValueError(f"{spec!r} cannot be polled")
    return resource


async def start_supervisor(
    cache: ResponseCache, lookup: Callable[[Resource], Awaitable[Lookup]] | None = None
) -> dict[str, Any]:
    """The ``supervisor`` object the PVS puts in its answer to ``Command=Start``.

    From the cached ``supervisor/info`` answer, else the PVS entry of a cached DeviceList;
    on a cold cache, one read of ``supervisor/info`` through ``lookup`` (the proxy's:
    cached, coalesced, within the budget; 0.2 s on the PVS). sungazer refuses a Start
    without it, the exporter reads it. {} when none of these can be had (PVS down).
    """
    info = poll_resource(SUPERVISOR_INFO)
    found = _supervisor_in(cache, info.key)
    if found or lookup is None:
        return found
    try:
        await lookup(info)
    except GatewayError as exc:
        log.info("no supervisor object for Command=Start: %s", exc.detail)
        return {}
    return _supervisor_in(cache, info.key)


def _supervisor_in(cache: ResponseCache, info_key: str) -> dict[str, Any]:
    for key, read in ((info_key, supervisor_from_info), (DEVICE_LIST, supervisor_from_device_list)):
        entry = cache.peek(key)
        if entry is not None and entry.status == 200:
            try:
                found = read(json.loads(entry.body))
            except ValueError:
                continue
            if found:
                return found
    return {}


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

    async def prefetch(self) -> None:
        """Read the start-up set once, in order; a failure is logged and skipped (clients then ask themselves)."""
        await self._prefetch_one(SUPERVISOR_INFO)
        if (self._upstream.firmware or "legacy") == "legacy":
            for spec in PREFETCH_LEGACY:
                await self._prefetch_one(spec)

    async def _prefetch_one(self, spec: str) -> None:
        try:
            await self._proxy.lookup(poll_resource(spec))
        except GatewayError as exc:
            log.info("prefetch of %s failed: %s", spec, exc.detail)

    async def run(self) -> None:
        if self._resources:
            await self.prefetch()
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
