"""Prometheus metrics: the gateway's own and the site's, one registry per app.

Nothing here updates a prometheus_client metric per request. Requests
are counted into plain dicts by ``RequestMetrics.observe`` (called by the
access-log middleware, which already times every request); everything else
is read from the running parts when Prometheus scrapes, by custom
collectors. A scrape therefore costs nothing between scrapes, and the
registry is built per app, so two apps in one process never share counters.

Solar metrics come from what the cache already holds (``peek``); a scrape
never waits on the PVS. Names follow Prometheus base units (watts, joules,
seconds, bytes, ratios): ``rate(pvsgw_production_energy_joules_total[5m])``
is then the mean production in watts, and kWh = joules / 3.6e6.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from gateway import __version__
from gateway.allowlist import COMMANDS, PATHS
from gateway.normalize import SiteReading
from gateway.routetable import RouteTable
from gateway.scopes import RequestState, strip_root
from gateway.settings import Settings

PREFIX = "pvsgw_"
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
J_PER_KWH = 3.6e6

# Route labels are a fixed set: raw paths would let any client mint new series.
class _Histograms:
    """Per-label histograms in plain lists: a bisect and two adds per observation."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, label: str, value: float) -> None:
        counts = self.counts.get(label)
        if counts is None:
            counts = self.counts[label] = [0] * (len(self.bounds) + 1)
            self.sums[label] = 0.0
        counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[label] += value

    def family(self, name: str, doc: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=[label])
        for value, counts in sorted(self.counts.items()):
            running = 0
            buckets = []
            for bound, n in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
                running += n
                buckets.append((bound, running))
            family.add_metric([value], buckets, self.sums[value])
        return family


class RequestMetrics:
    """Requests by route, status and role, and their latency by route.

    A request only appends its raw facts; they are counted in batches (every
    256 requests, and before every scrape), in one tight loop instead of
    between each answer's TLS and syscall work, where the same counting
    costs several times more (see ``bench/README.md``).
    """

    BATCH = 256

    def __init__(self, routes: RouteTable) -> None:
        self.routes = routes
        self.counts: dict[tuple[str, str, str], int] = {}
        self.latency = _Histograms(HTTP_BUCKETS)
        self._pending: list[tuple[str, str, str, int, float]] = []

    def observe(self, scope: Scope, state: RequestState, status: int, duration: float) -> None:
        principal = state.principal
        pending = self._pending
        pending.append(
            (scope["path"], scope.get("root_path", ""), principal.role if principal is not None else "none", status, duration)
        )
        if len(pending) >= self.BATCH:
            self.tally()

    def tally(self) -> None:
        """Count what was observed since the last tally."""
        pending, self._pending = self._pending, []
        counts = self.counts
        for path, root, role, status, duration in pending:
            route = self.routes.policy(strip_root(path, root)).label
            key = (route, str(status), role)
            counts[key] = counts.get(key, 0) + 1
            self.latency.observe(route, duration)

    def collect(self) -> Iterator[Metric]:
        self.tally()
        requests = CounterMetricFamily(
            f"{PREFIX}http_requests", "HTTP requests answered, by route, status and caller role", labels=["route", "status", "role"]
        )
        for labels, n in sorted(self.counts.items()):
            requests.add_metric(labels, n)
        yield requests
        yield self.latency.family(f"{PREFIX}http_request_duration_seconds", "Time to answer a request, by route", "route")


def upstream_resource(request: httpx.Request) -> str:
    """A bounded label for a request to the PVS: only allowlisted names pass."""
    path = request.url.path
    if path == "/cgi-bin/dl_cgi":
        command = request.url.params.get("Command", "")
        return command if command in COMMANDS else "other"
    if path.startswith("/cgi-bin/dl_cgi/"):
        sub = path[len("/cgi-bin/dl_cgi/") :]
        return sub if sub in PATHS else "other"
    if path in ("/vars", "/auth"):
        return path[1:]
    return "other"


class TimedTransport(httpx.AsyncBaseTransport):
    """Wraps the upstream transport to count and time what really reaches the PVS.

    Timing stops at the response headers: the PVS computes an answer (10 s
    for a DeviceList) before it sends anything, so that is its latency.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self.counts: dict[tuple[str, str], int] = {}
        self.latency = _Histograms(UPSTREAM_BUCKETS)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        start = time.perf_counter()
        resource = upstream_resource(request)
        status = "error"
        try:
            response = await self._inner.handle_async_request(request)
            status = str(response.status_code)
            return response
        finally:
            self.latency.observe(resource, time.perf_counter() - start)
            key = (resource, status)
            self.counts[key] = self.counts.get(key, 0) + 1

    async def aclose(self) -> None:
        await self._inner.aclose()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per resource: count and mean seconds, for /stats."""
        return {
            resource: {"requests": sum(counts), "mean_seconds": round(self.latency.sums[resource] / sum(counts), 3)}
            for resource, counts in self.latency.counts.items()
            if sum(counts)
        }

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}upstream_requests",
            "Requests sent to the PVS, by resource and HTTP status (\"error\": no answer)",
            labels=["resource", "status"],
        )
        for labels, n in sorted(self.counts.items()):
            requests.add_metric(labels, n)
        yield requests
        yield self.latency.family(
            f"{PREFIX}upstream_request_duration_seconds", "Time until the PVS's answer began, by resource", "resource"
        )


class CertificateExpiry:
    """The served leaf's notAfter, re-read only when the file changes (renewals are hot-swapped)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._seen: tuple[int, int] | None = None
        self._value: float | None = None

    def not_after(self) -> float | None:
        if self._path is None:
            return None
        try:
            st = self._path.stat()
            if (st.st_mtime_ns, st.st_size) != self._seen:
                from cryptography import x509

                cert = x509.load_pem_x509_certificate(self._path.read_bytes())
                self._value = cert.not_valid_after_utc.timestamp()
                self._seen = (st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            return None
        return self._value

    def renewal_failures(self) -> int | None:
        """Renewals of the served leaf that could not be written (full disk, read-only cert_dir)."""
        if self._path is None:
            return None
        from gateway.tls import renewal_failures

        return renewal_failures(self._path.parent)


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(f"{PREFIX}{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(f"{PREFIX}{name}", doc, value=value)


class GatewayCollector:
    """Cache, upstream, rate-limit and TLS state, read at scrape time."""

    def __init__(
        self,
        *,
        requests: RequestMetrics,
        transport: TimedTransport | None,
        cache: Any,
        upstream: Any,
        limiter: Any,
        certificate: CertificateExpiry,
        started: float,
    ) -> None:
        self._requests = requests
        self._transport = transport
        self._cache = cache
        self._upstream = upstream
        self._limiter = limiter
        self._certificate = certificate
        self._started = started

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily(f"{PREFIX}build", "The gateway's version")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily(f"{PREFIX}start_time_seconds", "When the gateway started (Unix time)", value=self._started)
        yield from self._requests.collect()
        yield from self._cache_metrics()
        yield from self._upstream_metrics()
        rejections = CounterMetricFamily(
            f"{PREFIX}ratelimit_rejections", "Requests refused with 429, by policy", labels=["policy"]
        )
        for policy, n in sorted(self._limiter.rejections.items()):
            rejections.add_metric([policy], n)
        yield rejections
        yield from _gauge(
            "tls_certificate_expiry_timestamp_seconds",
            "When the served TLS certificate expires (Unix time)",
            self._certificate.not_after(),
        )
        failures = self._certificate.renewal_failures()
        if failures is not None:
            yield _counter(
                "certificate_renewal_failures",
                "Leaf certificate renewals that could not be written; the current leaf stays in service",
                failures,
            )

    def _cache_metrics(self) -> Iterator[Metric]:
        s = self._cache.stats
        lookups = CounterMetricFamily(
            f"{PREFIX}cache_lookups",
            "Cache lookups by outcome: hit, miss, stale served while revalidating or because the PVS failed, "
            "coalesced (waited for another caller's fetch)",
            labels=["result"],
        )
        for result, n in (
            ("hit", s.hits),
            ("miss", s.misses),
            ("stale_revalidating", s.stale_revalidating),
            ("stale_on_error", s.stale_on_error),
            ("coalesced", s.collapsed),
        ):
            lookups.add_metric([result], n)
        yield lookups
        yield _counter("cache_stores", "Answers stored in the cache", s.stored)
        yield _counter("cache_evictions", "Entries evicted to stay within the cache's size limits", s.evicted)
        yield _counter("cache_refresh_failures", "Background refreshes that failed", s.refresh_failures)
        yield GaugeMetricFamily(f"{PREFIX}cache_entries", "Entries in the cache", value=len(self._cache))
        yield GaugeMetricFamily(f"{PREFIX}cache_size_bytes", "Bytes held by the cache", value=self._cache.size_bytes)

    def _upstream_metrics(self) -> Iterator[Metric]:
        up = self._upstream
        health = up.health
        if self._transport is not None:
            yield from self._transport.collect()
        errors = CounterMetricFamily(f"{PREFIX}upstream_errors", "Failed PVS requests, by kind", labels=["kind"])
        for kind, n in sorted(health.errors_by_kind.items()):
            errors.add_metric([kind], n)
        yield errors
        yield GaugeMetricFamily(
            f"{PREFIX}upstream_consecutive_failures", "PVS failures since its last good answer", value=health.consecutive_failures
        )
        yield from _gauge(
            "upstream_last_success_timestamp_seconds", "When the PVS last answered well (Unix time)", health.last_success
        )
        yield GaugeMetricFamily(
            f"{PREFIX}upstream_backoff_seconds",
            "Seconds the gateway will still leave a failing PVS alone",
            value=health.backoff_remaining(),
        )
        yield GaugeMetricFamily(f"{PREFIX}upstream_in_flight", "Requests at the PVS right now", value=up.budget.in_flight)
        yield GaugeMetricFamily(f"{PREFIX}upstream_queued", "Requests waiting for an upstream slot", value=up.budget.queued)
        yield _counter("upstream_shed", "Requests refused because the upstream queue was full", up.budget.shed)
        yield _counter("pvs_reboots_noticed", "PVS reboots noticed (its uptime went down)", health.reboots_noticed)


class SolarCollector:
    """The site's data, from whatever the cache holds; absent until something was fetched."""

    def __init__(self, peek: Callable[[], tuple[SiteReading, float] | None]) -> None:
        self._peek = peek

    def collect(self) -> Iterator[Metric]:
        found = self._peek()
        if found is None:
            return
        site, fetched_at = found
        t, pvs = site.totals, site.pvs
        yield from _gauge("solar_data_timestamp_seconds", "When the PVS measured the site data (Unix time)", site.measured_at)
        yield GaugeMetricFamily(
            f"{PREFIX}solar_data_fetched_timestamp_seconds", "When the gateway fetched the site data (Unix time)", value=fetched_at
        )
        yield from _gauge("production_power_watts", "SiteReading production", _w(t.production_kw))
        yield from _gauge("consumption_power_watts", "SiteReading consumption (household load)", _w(t.consumption_kw))
        yield from _gauge("net_power_watts", "Grid power: positive importing, negative exporting", _w(t.net_kw))
        for name, doc, value in (
            ("production_energy_joules", "Lifetime production", t.lifetime_production_kwh),
            ("consumption_energy_joules", "Lifetime consumption", t.lifetime_consumption_kwh),
            ("grid_import_energy_joules", "Lifetime energy imported from the grid", t.lifetime_import_kwh),
            ("grid_export_energy_joules", "Lifetime energy exported to the grid", t.lifetime_export_kwh),
        ):
            if value is not None:
                yield CounterMetricFamily(f"{PREFIX}{name}", doc, value=value * J_PER_KWH)
        yield from _gauge("net_energy_joules", "Lifetime grid import minus export", _j(t.lifetime_net_kwh))
        yield from self._meters(site)
        yield from self._inverters(site)
        info = InfoMetricFamily(f"{PREFIX}pvs", "The PVS: serial, model, software and firmware kind")
        info.add_metric(
            [],
            {
                "serial": pvs.serial or "",
                "model": pvs.model or "",
                "software_version": pvs.software_version or "",
                "firmware": site.firmware,
            },
        )
        yield info
        yield from _gauge("pvs_uptime_seconds", "PVS uptime", pvs.uptime_s)
        yield from _gauge("pvs_cpu_load", "PVS load average (legacy firmware)", pvs.cpu_load)
        yield from _gauge("pvs_cpu_usage_ratio", "PVS CPU usage (LocalAPI firmware)", _ratio(pvs.cpu_usage_percent))
        yield from _gauge("pvs_memory_used_bytes", "PVS memory in use (legacy firmware)", _kib(pvs.memory_used_kib))
        yield from _gauge("pvs_memory_usage_ratio", "PVS memory usage (LocalAPI firmware)", _ratio(pvs.ram_usage_percent))
        yield from _gauge("pvs_flash_available_bytes", "PVS free flash (legacy firmware)", _kib(pvs.flash_available_kib))
        yield from _gauge("pvs_flash_usage_ratio", "PVS flash usage (LocalAPI firmware)", _ratio(pvs.flash_usage_percent))

    def _meters(self, site: SiteReading) -> Iterator[Metric]:
        labels = ["meter", "serial"]
        power = GaugeMetricFamily(f"{PREFIX}meter_power_watts", "Real power through each meter", labels=labels)
        energy = GaugeMetricFamily(
            f"{PREFIX}meter_energy_joules",
            "Each meter's lifetime energy counters (net, import, export)",
            labels=[*labels, "direction"],
        )
        for m in site.meters:
            key = [m.role, m.serial]
            _add(power, key, _w(m.power_kw))
            for direction, value in (("net", m.lifetime_net_kwh), ("import", m.lifetime_import_kwh), ("export", m.lifetime_export_kwh)):
                _add(energy, [*key, direction], _j(value))
        yield power
        yield energy

    def _inverters(self, site: SiteReading) -> Iterator[Metric]:
        power = GaugeMetricFamily(f"{PREFIX}inverter_power_watts", "Each inverter's AC output", labels=["serial"])
        temperature = GaugeMetricFamily(f"{PREFIX}inverter_temperature_celsius", "Heat-sink temperature", labels=["serial"])
        working = GaugeMetricFamily(f"{PREFIX}inverter_working", "1 while the inverter produces (0 at night or failed)", labels=["serial"])
        energy = CounterMetricFamily(f"{PREFIX}inverter_energy_joules", "Each inverter's lifetime production", labels=["serial"])
        for inv in site.inverters:
            _add(power, [inv.serial], _w(inv.power_kw))
            _add(temperature, [inv.serial], inv.temperature_c)
            _add(working, [inv.serial], 1.0 if inv.state == "working" else 0.0)
            _add(energy, [inv.serial], _j(inv.lifetime_production_kwh))
        yield from (power, temperature, working, energy)


def _add(family: GaugeMetricFamily | CounterMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:
        family.add_metric(labels, value)


def _w(kw: float | None) -> float | None:
    return None if kw is None else round(kw * 1000, 4)


def _j(kwh: float | None) -> float | None:
    return None if kwh is None else kwh * J_PER_KWH


def _kib(value: float | None) -> float | None:
    return None if value is None else value * 1024


def _ratio(percent: float | None) -> float | None:
    return None if percent is None else percent / 100


def build_registry(collectors: Iterable[object]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return registry


def endpoint(registry: CollectorRegistry, before_scrape: Callable[[], None] | None = None) -> Callable[[Request], Any]:
    """``/metrics``: the text format Prometheus asks for (OpenMetrics on request)."""

    async def metrics(request: Request) -> Response:
        if before_scrape is not None:
            before_scrape()
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    return metrics


def served_certificate(settings: Settings) -> Path | None:
    """The leaf certificate the gateway serves, if it serves TLS itself."""
    server = settings.server
    if server.tls == "self-signed":
        from gateway.tls import LEAF_CERT

        return settings.path(server.cert_dir) / LEAF_CERT
    if server.tls == "files" and server.cert_file:
        return settings.path(server.cert_file)
    return None
