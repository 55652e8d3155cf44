"""Wiring: the only module that builds and connects the gateway's parts.

``create_app(settings)`` is pure construction (no I/O until the lifespan
starts), so tests and the CLI build the same app. Request flow, outermost
first: edge (connection deadlines, gateway.edge) -> access log -> drain (503
at shutdown) -> forwarded headers (trusted proxies only) -> guard (method,
sizes, security headers) -> plain-HTTP LAN listener -> authentication -> rate
limits -> routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
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

from gateway import dashboard, local, routes
from gateway.auth import Principal
from gateway.auth.frontproxy import front_proxy_verifier
from gateway.auth.keys import KeyStore
from gateway.auth.middleware import Authenticator, AuthMiddleware, FailureGate
from gateway.auth.sessions import SessionSigner, SessionStore, load_or_create_secret
from gateway.edge import Connections, EdgeLimits, EdgeMiddleware
from gateway.errors import PROBLEM_TYPE, GatewayError, problem_body
from gateway.logbuffer import LineBuffer
from gateway.middleware.accesslog import AccessLogMiddleware
from gateway.middleware.forwarded import ForwardedMiddleware, parse_networks
from gateway.middleware.guard import GuardMiddleware
from gateway.middleware.lan import LanListenerMiddleware
from gateway.proxy import Proxy
from gateway.ratelimit import RateLimiter, RateLimitMiddleware
from gateway.responses import send_problem
from gateway.routetable import PVS, RouteTable, route_table
from gateway.scopes import RequestState, request_state, route_path
from gateway.settings import Settings
from gateway.shared import Shared, SharedCollector
from gateway.shared import status as shared_status
from gateway.site import Site

log = logging.getLogger("gateway")


@dataclass
class Components:
    """The running parts, exposed on ``app.state.gateway`` for tests and tools."""

    settings: Settings
    keys: KeyStore
    site: Site  # the PVS and everything that belongs to it
    limiter: RateLimiter
    connections: Connections
    drain: Drain
    shared: Shared
    per_identity: dict[str, dict[str, int]] = field(default_factory=dict)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # Run on SIGHUP (in a thread): each reads its files again and keeps the old state on a problem.
    reloaders: list[Callable[[], object]] = field(default_factory=list)


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    access_stream: TextIO | None = None,
    listener_ports: tuple[int, int] = (0, 0),
) -> GatewayApp:
    """``access_stream``: where access lines go, batched (the CLI's log stream); else the ``gateway.access`` logger.
    ``listener_ports``: the HTTPS (or main) port and the plain-HTTP LAN listener's port (0: none)."""
    shared = Shared(settings.cluster.redis_url.get())  # cluster state; local while unset or unreachable
    keys = KeyStore(settings.path(settings.auth.keys_file))
    secret = settings.auth.session_secret.get().encode()
    signer = SessionSigner(secret or load_or_create_secret(settings.path(settings.server.cert_dir) / "session.key"))
    sessions = SessionStore(signer, shared=shared)
    pvs_login = local.PVSLogin(settings.upstream, settings.auth.allow_anonymous_from, serial=lambda: site.upstream.serial)

    def api_key(presented: str) -> Principal | None:
        record = keys.verify(presented)  # records the use itself
        return keys.principal(record) if record is not None else None

    session = local.session_principal(sessions, keys, pvs_login)

    site = Site.build(
        settings,
        shared,
        transport=transport,
        login={
            "auth.login": local.login(sessions, settings.auth.session_lifetime, pvs_login),
            "auth.logout": local.login(sessions, settings.auth.session_lifetime, pvs_login),
        },
    )
    limiter = RateLimiter(settings.ratelimit, shared)
    connections = Connections(EdgeLimits.from_settings(settings.server))
    parts = Components(settings, keys, site, limiter, connections, Drain(), shared)
    table = route_table(settings, assets=dashboard.ASSETS)
    observed = dashboard.build(
        settings, cache=site.cache, upstream=site.upstream, proxy=site.proxy, limiter=limiter, transport=site.timed, table=table,
        collectors=[SharedCollector(shared)], shared=shared,
    )
    parts.background += observed.background  # live data and history (gateway.live)

    # The proxied PVS paths are dispatched before the router (see ProxyDispatch).
    route_list = [
        Route("/healthz", routes.healthz),
        Route("/readyz", routes.readyz(site.health, settings.cache.max_stale, site.poller.probe, cluster=lambda: shared_status(shared))),
        Route(
            "/stats",
            routes.stats(site.cache, site.upstream, parts.per_identity, time.monotonic(), observed.timings, connections),
        ),
        Route("/auth/verify", routes.verify(settings.auth.forward_auth_methods)),
        *observed.routes,
    ]

    async def gate_hit(ip: str) -> bool:
        return await limiter.auth_failure(ip)

    oidc = _oidc(settings, signer_secret=signer.secret_for("oidc-session"), sessions=sessions) if "oidc" in settings.auth.methods else None
    authenticator = Authenticator(
        api_key=api_key if "api_key" in settings.auth.methods else None,
        session=session,
        bearer_jwt=oidc.verifier.verify_bearer if oidc else None,
        browser_session=oidc.principal_from_scope if oidc else None,
        front_proxy=front_proxy_verifier(settings),
        pvs_login=pvs_login,
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
        Middleware(DrainMiddleware, drain=parts.drain),
        Middleware(ForwardedMiddleware, trusted=parse_networks(settings.server.trusted_proxies), root_path=settings.server.root_path),
        Middleware(GuardMiddleware, settings=settings.server),
        Middleware(
            LanListenerMiddleware,
            port=listener_ports[1],
            https_port=listener_ports[0],
            hostnames=settings.server.hostnames,
            anonymous_from=parse_networks(settings.auth.allow_anonymous_from),
            routes=table,
        ),
        *(oidc.login.middleware if oidc else ()),
        Middleware(
            AuthMiddleware,
            authenticator=authenticator,
            gate=FailureGate(gate_hit, limiter.auth_blocked_for),
            anonymous_from=parse_networks(settings.auth.allow_anonymous_from),
            routes=table,
            unauthenticated_limit=limiter.check_ip,
            login_redirect=oidc.redirect_browser if oidc else None,
        ),
        Middleware(RateLimitMiddleware, limiter=limiter, routes=table),
    ]

    parts.background += [keys.watch, sessions.watch, shared.watch, *site.background]
    parts.reloaders += [keys.reload_if_changed, *site.reloaders]

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
            await site.aclose()
            await shared.aclose()  # last: the budget releases its leases through it
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
    stack: ASGIApp = ProxyDispatch(site.proxy, own_routes, table)
    for layer in reversed(middleware):
        stack = layer.cls(stack, *layer.args, **layer.kwargs)
    stack = EdgeMiddleware(stack, connections)
    return GatewayApp(stack, own_routes, parts)


class Drain:
    """Shutdown: requests still waiting (no answer started) are answered 503, not cancelled into 500s."""

    def __init__(self) -> None:
        self.draining = False
        self.waiting: dict[asyncio.Task[Any], RequestState] = {}

    def start(self) -> None:
        self.draining = True
        for task, state in list(self.waiting.items()):
            if state.status is None:  # no answer started yet
                task.cancel()


class DrainMiddleware:
    """Inside the access log (which then logs the 503) and outside the guard (which records
    when an answer starts, in ``RequestState.status``)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        state = self.drain.waiting[task] = request_state(scope)
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.drain.draining or state.status is not None:
                raise
            task.uncancel()
            problem = GatewayError("the gateway is shutting down; retry shortly", status=503, headers=[("Retry-After", "5")])
            state.status, state.detail = problem.status, problem.detail
            await send_problem(send, problem, head=scope["method"] == "HEAD")
        finally:
            del self.drain.waiting[task]


class ProxyDispatch:
    """The PVS's paths (the route table's ``handler``) go to the proxy; the rest to the Starlette routes."""

    def __init__(self, proxy: Proxy, routes: ASGIApp, table: RouteTable) -> None:
        self.proxy = proxy
        self.routes = routes
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.table.policy(route_path(scope)).handler == PVS:
            await self.proxy(scope, receive, send)
            return
        await self.routes(scope, receive, send)


class GatewayApp:
    """What uvicorn serves: the middleware stack over ProxyDispatch; ``state`` is the routes' state."""

    def __init__(self, stack: ASGIApp, routes: Starlette, parts: Components) -> None:
        self._stack = stack
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


def _oidc(settings: Settings, *, signer_secret: str, sessions: SessionStore) -> _OIDC:
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
        sessions=sessions,
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
