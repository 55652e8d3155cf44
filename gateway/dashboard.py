"""The normalized data API and the dashboard page that shows it.

``/api/v1/summary`` and ``/api/v1/devices`` read the PVS through the same
cache as proxied clients (``Proxy.lookup``): a cold cache fills once, with
concurrent callers coalesced, inside the upstream budget; freshness is
reported as it is (``Age``, ``Cache-Status``, and in the JSON).

Which PVS resources hold the site: legacy firmware, the DeviceList; LocalAPI
firmware, one ``/vars?match=/sys/`` read (live totals, devices and system
info in a single request, instead of three the PVS would each have to
answer). While the firmware is still unknown, ``supervisor/info`` (open and
cheap on both) is read first: the upstream client detects the firmware on
its first request.

The page ``/`` and its assets are the same for everybody and hold no data,
so they load without credentials (``/`` only while OIDC is off: see
``gateway.routetable``); the script then asks the API, which needs a viewer. API-key users type their key once: the page trades it at
``/auth?login`` for the gateway's HttpOnly, SameSite=Strict session cookie,
so no script ever keeps the key (sessionStorage would hand it to any
injected script); OIDC users already have their cookie.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from importlib import resources as package_files
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from gateway import live, metrics, normalize
from gateway.allowlist import Resource, classify
from gateway.cache import Entry, Lookup, ResponseCache
from gateway.errors import (
    PROBLEM_TYPE,
    GatewayError,
    UpstreamBadResponse,
    UpstreamError,
    problem_body,
)
from gateway.health import UpstreamHealth
from gateway.proxy import Proxy
from gateway.responses import problem_headers
from gateway.routetable import RouteTable
from gateway.scopes import RequestState, request_state
from gateway.settings import Settings
from gateway.shared import Shared

SUPERVISOR = classify(b"/cgi-bin/dl_cgi/supervisor/info", b"")
DEVICE_LIST = classify(b"/cgi-bin/dl_cgi", b"Command=DeviceList")
SYS_VARS = classify(b"/vars", b"match=/sys/&fmt=obj")

MIN_REFRESH = 15.0  # seconds between dashboard refreshes, however short the TTL

# A strict policy that still lets the page run its own script and style:
# nothing inline, nothing from elsewhere, no framing, no form posts.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PUBLIC_ASSETS = frozenset(f"/static/{name}" for name in ASSETS)


@dataclass(frozen=True, slots=True)
class Source:
    """One cached PVS answer behind a reading, as its freshness is reported."""

    resource: Resource
    entry: Entry
    age: float
    cache_status: str
    error: GatewayError | None = None  # why stale data was served, if it was


@dataclass(frozen=True, slots=True)
class Reading:
    site: normalize.SiteReading
    sources: tuple[Source, ...]

    @property
    def fetched_at(self) -> float:
        return min(s.entry.fetched_at for s in self.sources)

    @property
    def age(self) -> float:
        return max(s.age for s in self.sources)

    @property
    def fresh_for(self) -> float:
        return max(0.0, min(s.entry.ttl - s.age for s in self.sources))


class SiteReader:
    def __init__(self, settings: Settings, *, cache: ResponseCache, proxy: Proxy, upstream: Any) -> None:
        self._settings = settings
        self._cache = cache
        self._proxy = proxy
        self._upstream = upstream
        self._parsed: tuple[Entry, normalize.SiteReading] | None = None
        self._triggered: dict[str, float] = {}

    def resource(self) -> Resource | None:
        firmware = self._upstream.firmware
        if firmware == "localapi":
            return SYS_VARS
        if firmware == "legacy":
            return DEVICE_LIST
        return None

    async def read(self) -> Reading:
        """The site through the cache (may wait for the PVS, within the budget)."""
        if self.resource() is None:
            await self._proxy.lookup(SUPERVISOR)  # teaches the upstream client the firmware
        resource = self.resource() or DEVICE_LIST
        lookup: Lookup = await self._proxy.lookup(resource)
        if lookup.entry.status != 200:
            raise UpstreamBadResponse(
                f"the PVS refused {resource.target} (HTTP {lookup.entry.status})", received_status=lookup.entry.status
            )
        site = self._parse(resource, lookup.entry)
        return Reading(site, (Source(resource, lookup.entry, lookup.age, lookup.cache_status, lookup.error),))

    def peek(self) -> tuple[normalize.SiteReading, float] | None:
        """The site from the cache as it is, never fetching: (site, fetched_at) or None."""
        resource = self.resource()
        entry = self._cache.peek(resource.key) if resource is not None else None
        if resource is None or entry is None or entry.status != 200:
            return None
        return self._parse(resource, entry), entry.fetched_at

    def refresh_if_stale(self) -> None:
        """Start a background refresh of the site's resource if it is missing or expired.

        For /metrics: without it, a gateway whose only client is Prometheus
        would never have solar data to export. The scrape itself never waits.
        At most one refresh per TTL is started this way, even while fetches
        fail (nothing new is stored then), and none while the PVS is left
        alone after failures; the cache's single flight joins it with any
        caller's miss.
        """
        if self._upstream.health.backoff_remaining() > 0:
            return
        resource = self.resource() or SUPERVISOR
        ttl = self._settings.ttl_for(resource.name)
        entry = self._cache.peek(resource.key)
        if entry is not None and self._cache.age(entry) < entry.ttl:
            return
        now = time.monotonic()
        if now - self._triggered.get(resource.key, float("-inf")) < ttl:
            return
        self._triggered[resource.key] = now
        self._cache.refresh(resource.key, ttl, lambda: self._proxy.fetch(resource))

    def _parse(self, resource: Resource, entry: Entry) -> normalize.SiteReading:
        # Entries are replaced, never changed: parse each one once, however often it is read.
        parsed = self._parsed
        if parsed is not None and parsed[0] is entry:
            return parsed[1]
        try:
            body = json.loads(entry.body)
        except ValueError:
            body = {}
        if resource is SYS_VARS:
            site = normalize.from_vars(body)
            if site.pvs.uptime_s is not None:
                # The proxy does this for DeviceList; LocalAPI's uptime arrives here.
                self._upstream.health.observe_uptime(site.pvs.uptime_s)
        else:
            site = normalize.from_device_list(body)
        self._parsed = (entry, site)
        return site


def health_json(health: UpstreamHealth) -> dict[str, Any]:
    """The gateway's view of the PVS: can it be reached right now?"""
    if health.backoff_remaining() > 0:
        state = "unreachable"
    elif health.consecutive_failures:
        state = "failing"
    elif health.last_success is None:
        state = "unknown"
    else:
        state = "ok"
    return {
        "state": state,
        "consecutive_failures": health.consecutive_failures,
        "last_success": normalize.iso(health.last_success),
        "last_error": health.last_error,
        "reboots_noticed": health.reboots_noticed,
        "backoff_remaining_s": round(health.backoff_remaining(), 1),
    }


def _cache_json(reading: Reading) -> dict[str, Any]:
    fresh_for = reading.fresh_for
    return {
        "status": _cache_word(reading.sources[0].cache_status),
        "fresh_for_s": int(fresh_for),
        # Poll again when new data can be there, never faster than MIN_REFRESH.
        "refresh_after_s": int(max(MIN_REFRESH, fresh_for + 1)),
        "sources": [
            {
                "resource": s.resource.target,
                "cache_status": s.cache_status,
                "age_s": int(s.age),
                "fetched_at": normalize.iso(s.entry.fetched_at),
            }
            for s in reading.sources
        ],
    }


def _cache_word(cache_status: str) -> str:
    if "detail=pvs-" in cache_status:
        return "stale"  # served old data because the PVS failed
    if "detail=revalidating" in cache_status:
        return "revalidating"
    if "; hit" in cache_status:
        return "hit"
    if "collapsed" in cache_status:
        return "coalesced"
    return "miss"


class DataAPI:
    """``/api/v1/summary`` and ``/api/v1/devices``."""

    def __init__(self, reader: SiteReader, health: UpstreamHealth) -> None:
        self._reader = reader
        self._health = health

    async def summary(self, request: Request) -> Response:
        return await self._answer(request, normalize.summary_json)

    async def devices(self, request: Request) -> Response:
        return await self._answer(request, normalize.devices_json)

    async def _answer(self, request: Request, render: Any) -> Response:
        state = request_state(request.scope)
        try:
            reading = await self._reader.read()
        except GatewayError as exc:
            state.detail = exc.detail
            headers = {k.decode(): v.decode() for k, v in problem_headers(exc)}
            return Response(problem_body(exc.status, exc.detail, exc.extra), exc.status, headers, PROBLEM_TYPE)
        body = render(reading.site)
        body = {
            "firmware": body.pop("firmware"),
            "measured_at": body.pop("measured_at"),
            "fetched_at": normalize.iso(reading.fetched_at),
            "age_s": int(reading.age),
            "cache": _cache_json(reading),
            **body,
            "health": health_json(self._health),
        }
        main = reading.sources[0]
        state.cache_status = main.cache_status
        headers = {
            "Age": str(int(reading.age)),
            "Cache-Status": main.cache_status,
            "Cache-Control": f"private, max-age={int(reading.fresh_for)}",
        }
        if isinstance(main.error, UpstreamError):
            headers["Proxy-Status"] = main.error.proxy_status()
        return JSONResponse(body, headers=headers)


class Pages:
    """The dashboard page and its three assets, read from the package once."""

    def __init__(self, *, oidc_login: bool, api_keys: bool) -> None:
        # The page offers only the logins this gateway accepts.
        self._logins = f'data-oidc="{"on" if oidc_login else "off"}" data-keys="{"on" if api_keys else "off"}"'.encode()
        self._files: dict[str, tuple[bytes, str]] = {}

    def _load(self, name: str) -> tuple[bytes, str]:
        found = self._files.get(name)
        if found is None:
            body = package_files.files("gateway").joinpath("static", name).read_bytes()
            if name == "index.html":
                body = body.replace(b'data-oidc="off" data-keys="on"', self._logins)
            found = self._files[name] = (body, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
        return found

    def _send(self, request: Request, name: str, media_type: str, headers: dict[str, str]) -> Response:
        body, etag = self._load(name)
        headers = {**headers, "ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    async def page(self, request: Request) -> Response:
        return self._send(request, "index.html", "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_CSP})

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404)
        return self._send(request, name, media_type, {})


@dataclass(frozen=True)
class Observability:
    """What app.py wires in: routes, the per-request observer, upstream timings, background tasks."""

    routes: list[Route]
    observe: Callable[[Scope, RequestState, int, float], None]
    timings: Callable[[], dict[str, dict[str, float]]]
    background: list[Callable[[], Coroutine[Any, Any, None]]]  # live data and history (gateway.live)


def build(
    settings: Settings,
    *,
    cache: ResponseCache,
    upstream: Any,
    proxy: Proxy,
    limiter: Any,
    transport: metrics.TimedTransport,
    table: RouteTable,
    collectors: Iterable[object] = (),
    shared: Shared | None = None,
) -> Observability:
    reader = SiteReader(settings, cache=cache, proxy=proxy, upstream=upstream)
    feed = live.build(settings, upstream=upstream, peek=reader.peek, refresh=reader.refresh_if_stale, shared=shared)
    requests = metrics.RequestMetrics(table)
    registry = metrics.build_registry(
        [
            metrics.GatewayCollector(
                requests=requests,
                transport=transport,
                cache=cache,
                upstream=upstream,
                limiter=limiter,
                certificate=metrics.CertificateExpiry(metrics.served_certificate(settings)),
                started=time.time(),
            ),
            metrics.SolarCollector(reader.peek),
            feed.collector,
            *collectors,
        ]
    )
    api = DataAPI(reader, upstream.health)
    pages = Pages(oidc_login="oidc" in settings.auth.methods, api_keys="api_key" in settings.auth.methods)
    routes = [
        Route("/metrics", metrics.endpoint(registry, before_scrape=reader.refresh_if_stale)),
        Route("/api/v1/summary", api.summary),
        Route("/api/v1/devices", api.devices),
        *feed.routes,
        Route("/", pages.page),
        Route("/static/{name}", pages.asset),
    ]
    return Observability(routes, requests.observe, transport.summary, feed.background)
