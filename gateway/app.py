"""Wiring: the only module that builds and connects the gateway's parts.

``create_app(settings)`` is pure construction (no I/O until the lifespan
starts), so tests and the CLI build the same app. Request flow, outermost
first: access log -> forwarded headers (trusted proxies only) -> guard
(method, sizes, security headers) -> authentication -> rate limits -> routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import dashboard, local, metrics, routes
from gateway.auth import Principal
from gateway.auth.frontproxy import front_proxy_verifier
from gateway.auth.keys import KeyStore
from gateway.auth.middleware import Authenticator, AuthMiddleware, FailureGate
from gateway.auth.sessions import SessionSigner, load_or_create_secret
from gateway.budget import UpstreamBudget
from gateway.cache import ResponseCache
from gateway.errors import PROBLEM_TYPE, problem_body
from gateway.health import UpstreamHealth
from gateway.hotpath import HotPath
from gateway.logbuffer import LineBuffer
from gateway.middleware.accesslog import AccessLogMiddleware
from gateway.middleware.forwarded import ForwardedMiddleware, parse_networks
from gateway.middleware.guard import GuardMiddleware
from gateway.poller import Poller
from gateway.proxy import Proxy, is_proxied
from gateway.ratelimit import RateLimiter, RateLimitMiddleware
from gateway.scopes import route_path
from gateway.settings import Settings
from gateway.shared import Shared, SharedCollector
from gateway.shared import status as shared_status
from gateway.upstream import UpstreamClient

log = logging.getLogger("gateway")

ADMIN_PATHS = frozenset({"/stats", "/metrics"})


@dataclass
class Components:
    """The running parts, exposed on ``app.state.gateway`` for tests and tools."""

    settings: Settings
    keys: KeyStore
    cache: ResponseCache
    upstream: UpstreamClient
    limiter: RateLimiter
    shared: Shared = field(default_factory=Shared)
    hot: HotPath | None = None
    per_identity: dict[str, dict[str, int]] = field(default_factory=dict)
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def upstream_transport(settings: Settings) -> httpx.AsyncBaseTransport:
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


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    access_stream: TextIO | None = None,
) -> GatewayApp:
    """``access_stream``: where access lines go, batched (the CLI's log stream); else the ``gateway.access`` logger."""
    up = settings.upstream
    shared = Shared(settings.cluster.redis_url.get())  # cluster state; local while unset or unreachable
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
    timed = metrics.TimedTransport(transport or upstream_transport(settings))  # counts what reaches the PVS
    upstream = UpstreamClient(up, transport=timed, budget=budget, health=health, shared=shared)
    cache = ResponseCache(settings.cache, is_failing=lambda: health.failing, shared=shared)
    keys = KeyStore(settings.path(settings.auth.keys_file))
    limiter = RateLimiter(settings.ratelimit)
    parts = Components(settings, keys, cache, upstream, limiter, shared)

    secret = settings.auth.session_secret.get().encode()
    signer = SessionSigner(secret or load_or_create_secret(settings.path(settings.server.cert_dir) / "session.key"))

    def api_key(presented: str) -> tuple[Principal, Callable[[], bool]] | None:
        record = keys.verify(presented)  # records the use itself
        return (keys.principal(record), keys.holds(record)) if record is not None else None

    def session(token: str) -> Principal | None:
        kid = signer.verify(token)
        record = keys.lookup(kid) if kid else None
        if record is None:
            return None
        keys.record_use(record.id)
        p = keys.principal(record)
        return Principal(p.id, p.name, p.role, "session", p.rate_limit)

    proxy = Proxy(
        settings,
        cache=cache,
        upstream=upstream,
        local={
            "Start": local.session_control(cache),
            "Stop": local.session_control(cache),
            "auth.login": local.login(signer, settings.auth.session_lifetime),
            "auth.logout": local.login(signer, settings.auth.session_lifetime),
        },
    )
    poller = Poller(settings, proxy=proxy, cache=cache, upstream=upstream)
    observed = dashboard.build(
        settings, cache=cache, upstream=upstream, proxy=proxy, limiter=limiter, transport=timed,
        collectors=[SharedCollector(shared)],
    )

    # The proxied PVS paths are dispatched before the router (see ProxyDispatch).
    route_list = [
        Route("/healthz", routes.healthz),
        Route("/readyz", routes.readyz(health, settings.cache.max_stale, poller.probe, cluster=lambda: shared_status(shared))),
        Route(
            "/stats",
            routes.stats(
                cache, upstream, parts.per_identity, time.monotonic(), observed.timings,
                hot_answered=lambda: parts.hot.answered if parts.hot is not None else None,
                hot_repeats=lambda: parts.hot.repeats if parts.hot is not None else None,
            ),
        ),
        Route("/auth/verify", routes.verify),
        *observed.routes,
    ]

    async def gate_hit(ip: str) -> bool:
        return await limiter.auth_failure(ip)

    oidc = _oidc(settings, signer_secret=signer.secret_for("oidc-session")) if "oidc" in settings.auth.methods else None
    authenticator = Authenticator(
        api_key=api_key if "api_key" in settings.auth.methods else None,
        session=session,
        bearer_jwt=oidc.verifier.verify_bearer if oidc else None,
        browser_session=oidc.principal_from_scope if oidc else None,
        front_proxy=front_proxy_verifier(settings),
    )
    if oidc is not None:
        route_list += oidc.login.routes
    access_lines = LineBuffer(access_stream) if access_stream is not None else None
    middleware = [
        Middleware(
            AccessLogMiddleware,
            style=settings.server.access_log,
            per_identity=parts.per_identity,
            observe=observed.observe,
            write_later=access_lines.add_later if access_lines is not None else None,
        ),
        Middleware(ForwardedMiddleware, trusted=parse_networks(settings.server.trusted_proxies), root_path=settings.server.root_path),
        Middleware(GuardMiddleware, settings=settings.server),
        *(oidc.login.middleware if oidc else ()),
        Middleware(
            AuthMiddleware,
            authenticator=authenticator,
            gate=FailureGate(gate_hit, limiter.auth_blocked_for, limiter.may_be_blocked),
            anonymous_from=parse_networks(settings.auth.allow_anonymous_from),
            admin_paths=ADMIN_PATHS if settings.auth.metrics_role == "admin" else ADMIN_PATHS - {"/metrics"},
            anonymous_paths=observed.public_paths | ({"/metrics"} if settings.auth.metrics_role == "anonymous" else set()),
            unauthenticated_limit=limiter.check_ip,
            login_redirect=oidc.redirect_browser if oidc else None,
        ),
        Middleware(RateLimitMiddleware, limiter=limiter),
    ]

    parts.background += [keys.watch, poller.run, shared.watch, health.follow]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        keys.reload_if_changed()
        tasks = [asyncio.create_task(job(), name=job.__qualname__) for job in parts.background]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            keys.flush_usage(force=True)
            await cache.aclose()
            await upstream.aclose()
            await shared.aclose()
            if oidc is not None:
                await oidc.client.aclose()
            if access_lines is not None:
                access_lines.close()

    own_routes = Starlette(
        routes=route_list,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_problem, Exception: _internal_problem},
    )
    # Starlette answers "/vars/" with a 307 to a Location built from the client's Host header
    # (an open redirect, found by tests/test_fuzz.py); a read-only API has no use for it: 404.
    own_routes.router.redirect_slashes = False
    stack: ASGIApp = ProxyDispatch(proxy, own_routes)
    layers: dict[type, Any] = {}
    for layer in reversed(middleware):
        stack = layers[layer.cls] = layer.cls(stack, *layer.args, **layer.kwargs)
    if settings.server.hot_path:
        parts.hot = HotPath(
            access=layers[AccessLogMiddleware],
            forwarded=layers[ForwardedMiddleware],
            guard=layers[GuardMiddleware],
            auth=layers[AuthMiddleware],
            ratelimit=layers[RateLimitMiddleware],
            proxy=proxy,
            cookie_sessions=oidc is not None,
        )
    return GatewayApp(stack, own_routes, parts)


class ProxyDispatch:
    """Proxied PVS paths go straight to the proxy; everything else to the Starlette routes.

    A cache hit is the hot path: it skips Starlette's error, exception and routing
    layers (each wraps ``send`` again), a large share of a hit's cost in the profile.
    The access-log middleware catches what the proxy does not.
    """

    def __init__(self, proxy: Proxy, routes: ASGIApp) -> None:
        self.proxy = proxy
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if is_proxied(route_path(scope)):
                await self.proxy(scope, receive, send)
                return
        await self.routes(scope, receive, send)


class GatewayApp:
    """What uvicorn serves: the middleware stack over ProxyDispatch; ``state`` is the routes' state.

    ``hot`` (``gateway.hotpath``) answers fresh cache hits without the stack, for the
    connection protocol that offers them (``gateway.httpproto``); ASGI servers without
    it (tests' in-process transports) get the same answers from the stack.
    """

    def __init__(self, stack: ASGIApp, routes: Starlette, parts: Components) -> None:
        self._stack = stack
        # Offered every request first by the connection protocol (gateway.httpproto), when on.
        self.hot = parts.hot
        self.routes = routes
        self.state = routes.state
        self.state.gateway = parts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Middleware runs before Starlette sets scope["app"]; url_for (the OIDC login redirect) needs it.
        scope.setdefault("app", self.routes)
        await self._stack(scope, receive, send)


@dataclass
class _OIDC:
    client: httpx.AsyncClient
    verifier: Any
    login: Any

    def principal_from_scope(self, scope: Scope) -> Principal | None:
        from gateway.auth.oidc_login import principal_from_session

        return principal_from_session(scope.get("session"))

    def redirect_browser(self, scope: Scope) -> Response | None:
        """Browsers asking for a page go to the login; API clients get 401 JSON."""
        from gateway.auth.oidc_login import login_redirect, wants_html

        request = Request(scope)
        return login_redirect(request) if wants_html(request) else None


def _oidc(settings: Settings, *, signer_secret: str) -> _OIDC:
    from gateway.auth.oidc import OIDCVerifier
    from gateway.auth.oidc_login import oidc_routes

    client = httpx.AsyncClient(timeout=settings.auth.oidc.timeout, follow_redirects=False)
    verifier = OIDCVerifier(settings.auth.oidc, client=client)
    # Session cookies are Secure unless the gateway is plain HTTP with no TLS proxy in front.
    https_only = settings.server.tls != "off" or bool(settings.server.trusted_proxies)
    login = oidc_routes(
        settings.auth,
        verifier,
        secret_key=signer_secret,
        https_only=https_only,
        cookie_path=settings.server.root_path or "/",
    )
    return _OIDC(client, verifier, login)


async def _http_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
    return Response(problem_body(exc.status_code, detail), exc.status_code, media_type=PROBLEM_TYPE)


async def _internal_problem(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s", request.url.path, exc_info=exc)
    return Response(problem_body(500, "internal error; see the gateway's log"), 500, media_type=PROBLEM_TYPE)


def components(app: Any) -> Components:
    parts: Components = app.state.gateway
    return parts
