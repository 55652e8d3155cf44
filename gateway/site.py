"""A site: everything that belongs to one PVS.

The upstream client and its LocalAPI session, the budget (what the PVS may
be asked, by everybody together), its health and back-off, the response cache
(its namespace in Redis), the certificate pin of the connection to it, the
proxy that answers the PVS's paths from all of these, and the poller that
keeps them fresh. One site today; a second PVS would be a second ``Site``
built from its own settings, not a rewrite.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import httpx

from gateway import local, metrics
from gateway.budget import UpstreamBudget
from gateway.cache import ResponseCache
from gateway.health import UpstreamHealth
from gateway.poller import Poller
from gateway.proxy import LocalHandler, Proxy
from gateway.settings import Settings
from gateway.shared import Shared
from gateway.upstream import UpstreamClient


def pinned_transport(settings: Settings) -> httpx.AsyncBaseTransport:
    """The connection to the PVS: its LocalAPI certificate pinned on first use (``gateway.pinning``)."""
    from gateway import pinning

    up = settings.upstream
    return pinning.make_transport(
        up.url,
        mode=up.verify_tls,
        pin_file=settings.path(settings.server.cert_dir) / pinning.PIN_FILE,
        ca_file=str(settings.path(up.ca_file)) if up.ca_file else "",
        connect_timeout=up.connect_timeout,
        limits=httpx.Limits(max_connections=up.max_concurrency + 1, max_keepalive_connections=up.max_concurrency),
    )


@dataclass
class Site:
    settings: Settings
    transport: httpx.AsyncBaseTransport  # pinned; what reaches the PVS
    timed: metrics.TimedTransport  # the same, counted and timed for /metrics
    health: UpstreamHealth
    budget: UpstreamBudget
    upstream: UpstreamClient
    cache: ResponseCache
    proxy: Proxy
    poller: Poller

    @classmethod
    def build(
        cls,
        settings: Settings,
        shared: Shared,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        login: dict[str, LocalHandler],
    ) -> Site:
        """``login``: the handlers of ``/auth?login``/``?logout``, which the PVS's paths include but the
        gateway answers with its own sessions."""
        up = settings.upstream
        health = UpstreamHealth(
            failure_threshold=up.failure_threshold,
            backoff_initial=up.backoff_initial,
            backoff_max=up.backoff_max,
            shared=shared,
        )
        budget = UpstreamBudget(
            max_concurrency=up.max_concurrency,
            min_interval=up.min_interval,
            max_queue=up.max_queue,
            queue_timeout=up.queue_timeout,
            shared=shared,
        )
        pvs = transport or pinned_transport(settings)
        timed = metrics.TimedTransport(pvs)
        upstream = UpstreamClient(up, transport=timed, budget=budget, health=health, shared=shared)
        cache = ResponseCache(settings.cache, is_failing=lambda: health.failing, shared=shared)
        proxy = Proxy(
            settings,
            cache=cache,
            upstream=upstream,
            local={
                # Late-bound: the proxy is built from this table.
                "Start": local.session_control(cache, lambda resource: proxy.lookup(resource)),
                "Stop": local.session_control(cache),
                **login,
            },
        )
        poller = Poller(settings, proxy=proxy, cache=cache, upstream=upstream)
        return cls(settings, pvs, timed, health, budget, upstream, cache, proxy, poller)

    @property
    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [self.poller.run, self.health.follow]

    @property
    def reloaders(self) -> list[Callable[[], object]]:
        """SIGHUP: the PVS's pin is read again (``gateway.pinning.PinningTransport``)."""
        reload_pin = getattr(self.transport, "reload_pin", None)
        return [reload_pin] if reload_pin is not None else []

    async def aclose(self) -> None:
        await self.cache.aclose()
        await self.upstream.aclose()
