"""The route table: every path the gateway answers, and what each layer does with it.

One row per path (or path prefix): who may call it (``access``), whether rate
limits count it, who answers it (the PVS proxy with its response cache, or the
gateway's own routes) and the label it is counted under in ``/metrics``. The
auth and rate-limit layers, the dispatch to the proxy, the LAN listener and
the metrics read this table and nothing else; the handlers themselves are
mounted in ``gateway.app``.

Access: ``open`` needs no credentials; ``self`` checks credentials itself
(ForwardAuth's ``/auth/verify``, the PVS-compatible ``/auth?login``), though
failed ones still count against the address; ``viewer`` and ``admin`` need an
identity with that role. A path not in the table needs a viewer, then gets 404.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.settings import Settings

PVS = "pvs"  # answered by the proxy: allowlist, response cache, then (maybe) the PVS
GATEWAY = "gateway"  # answered by the gateway's own routes


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    access: str  # "open" | "self" | "viewer" | "admin"
    limited: bool  # counted by the per-caller / per-IP rate limits
    handler: str  # PVS or GATEWAY
    label: str  # the route in /metrics (bounded: never the raw path)


UNKNOWN = RoutePolicy("viewer", True, GATEWAY, "other")


class RouteTable:
    def __init__(self, exact: dict[str, RoutePolicy], prefixes: dict[str, RoutePolicy]) -> None:
        self.exact = exact
        self.prefixes = prefixes

    def policy(self, path: str) -> RoutePolicy:
        """The row of a route path (``gateway.scopes.route_path``: without ``root_path``)."""
        found = self.exact.get(path)
        if found is not None:
            return found
        for prefix, policy in self.prefixes.items():
            if path.startswith(prefix):
                return policy
        return UNKNOWN

    def paths(self, access: str) -> frozenset[str]:
        return frozenset(path for path, policy in self.exact.items() if policy.access == access)


def route_table(settings: Settings, assets: Iterable[str] = ()) -> RouteTable:
    """The table for these settings (who may read /metrics, whether the dashboard page is public);
    ``assets``: the dashboard's files under /static/, served to anyone (any other name needs a viewer)."""

    def row(access: str, label: str, *, limited: bool = True, handler: str = GATEWAY) -> RoutePolicy:
        return RoutePolicy(access, limited, handler, label)

    oidc = "oidc" in settings.auth.methods
    metrics_access = {"admin": "admin", "viewer": "viewer", "anonymous": "open"}[settings.auth.metrics_role]
    exact = {
        # The PVS's own paths (SPEC §3), answered by the proxy.
        "/cgi-bin/dl_cgi": row("viewer", "/cgi-bin/dl_cgi", handler=PVS),
        "/vars": row("viewer", "/vars", handler=PVS),
        "/auth": row("self", "/auth", handler=PVS),
        # The gateway's own.
        "/healthz": row("open", "/healthz", limited=False),
        "/readyz": row("open", "/readyz", limited=False),
        "/metrics": row(metrics_access, "/metrics"),
        "/stats": row("admin", "/stats"),
        "/auth/verify": row("self", "/auth/verify"),
        "/auth/login": row("open", "/auth/{oidc}"),
        "/auth/callback": row("open", "/auth/{oidc}"),
        "/auth/logout": row("open", "/auth/{oidc}"),
        "/favicon.ico": row("open", "/favicon.ico"),
        "/api/v1/summary": row("viewer", "/api/v1/summary"),
        "/api/v1/devices": row("viewer", "/api/v1/devices"),
        "/api/v1/live": row("viewer", "/api/v1/live"),
        "/api/v1/history": row("viewer", "/api/v1/history"),
        # With OIDC, a browser without a session is sent to the login instead (its flow's contract);
        # without it, the page is public so that API-key users can type their key into it.
        "/": row("viewer" if oidc else "open", "/"),
        **{f"/static/{name}": row("open", "/static/{file}") for name in assets},
    }
    prefixes = {
        "/cgi-bin/dl_cgi/": row("viewer", "/cgi-bin/dl_cgi/{path}", handler=PVS),
        "/static/": row("viewer", "/static/{file}"),
    }
    return RouteTable(exact, prefixes)
