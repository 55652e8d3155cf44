"""The gateway's own endpoints: health, readiness, stats, ForwardAuth."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import __version__, edge
from gateway.cache import ResponseCache
from gateway.errors import PROBLEM_TYPE, problem_body
from gateway.health import UpstreamHealth
from gateway.scopes import request_state
from gateway.upstream import UpstreamClient

NO_STORE = {"Cache-Control": "no-store"}


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"}, headers=NO_STORE)


def readyz(
    health: UpstreamHealth,
    max_stale: float,
    probe: Callable[[], Awaitable[None]],
    cluster: Callable[[], dict[str, Any]] | None = None,
) -> Callable[[Request], Any]:
    """Ready while the PVS answered within ``max_stale`` (so cached data is still servable).

    When nothing that recent is known and the gateway is not backing off, one
    cheap probe is made first, so an idle gateway without polling still
    becomes ready.
    """

    async def endpoint(request: Request) -> Response:
        since = health.since_success()
        if (since is None or since > max_stale) and health.backoff_remaining() == 0:
            await probe()
            since = health.since_success()
        upstream_ok = since is not None and since <= max_stale
        body = {
            "ready": upstream_ok,
            "upstream": {
                "consecutive_failures": health.consecutive_failures,
                "last_success": _iso(health.last_success),
                "seconds_since_success": None if since is None else round(since, 1),
                "backoff_remaining": round(health.backoff_remaining(), 1),
                "last_error": health.last_error,
            },
        }
        if cluster is not None:
            body["cluster"] = cluster()  # gateway.shared.status: "shared", or local while Redis is unreachable
        return JSONResponse(body, status_code=200 if upstream_ok else 503, headers=NO_STORE)

    return endpoint


def stats(
    cache: ResponseCache,
    upstream: UpstreamClient,
    per_identity: dict[str, dict[str, int]],
    started: float,
    timings: Callable[[], dict[str, dict[str, float]]] | None = None,
    connections: edge.Connections | None = None,
) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        s = cache.stats
        served = s.hits + s.stale_revalidating + s.stale_on_error + s.misses + s.collapsed
        health = upstream.health
        body = {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - started, 1),
            "firmware": upstream.firmware,
            "cache": {
                **s.as_dict(),
                "entries": len(cache),
                "bytes": cache.size_bytes,
                "hit_ratio": round((s.hits + s.stale_revalidating + s.stale_on_error) / served, 4) if served else None,
            },
            "upstream": {
                "requests": upstream.requests,
                "in_flight": upstream.budget.in_flight,
                "max_in_flight": upstream.budget.max_in_flight,
                "queued": upstream.budget.queued,
                "shed": upstream.budget.shed,
                "consecutive_failures": health.consecutive_failures,
                "errors": health.errors_by_kind,
                "last_success": _iso(health.last_success),
                "reboots_noticed": health.reboots_noticed,
                "timings": timings() if timings is not None else None,
            },
            "identities": per_identity,
            "connections": edge.stats(connections) if connections is not None else None,
        }
        return JSONResponse(body, headers=NO_STORE)

    return endpoint


def verify(methods: tuple[str, ...] = ()) -> Callable[[Request], Awaitable[Response]]:
    """Traefik ForwardAuth: 200 with identity headers, else 401 (403/429 come from the middleware).

    ForwardAuth checks who calls, not what they do to the service behind it: with
    ``methods`` (``auth.forward_auth_methods``) a request whose ``X-Forwarded-Method``
    is not among them gets 403, for services that must stay read-only.
    """
    allowed = frozenset(m.upper() for m in methods)

    async def endpoint(request: Request) -> Response:
        forwarded = request.headers.get("x-forwarded-method", "GET").upper()
        if allowed and forwarded not in allowed:
            detail = f"{forwarded[:16]} is not allowed through this gateway ({', '.join(sorted(allowed))} only)"
            return _problem(403, detail, NO_STORE)
        state = request_state(request.scope)
        principal = state.principal
        if principal is None:
            detail = state.auth_error.detail if state.auth_error is not None else "credentials required: an API key or a login"
            return _problem(401, detail, {"WWW-Authenticate": 'Bearer realm="pvs-gateway"', **NO_STORE})
        headers = {
            "X-Auth-Request-User": principal.name,
            "Remote-User": principal.name,
            "X-Pvs-Gateway-Identity": principal.id,
            "X-Pvs-Gateway-Role": principal.role,
            **NO_STORE,
        }
        return Response(status_code=200, headers=headers)

    return endpoint


def _problem(status: int, detail: str, headers: dict[str, str]) -> Response:
    return Response(problem_body(status, detail), status, headers=headers, media_type=PROBLEM_TYPE)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
