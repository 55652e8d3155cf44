"""The plain-HTTP LAN listener (``server.http_port``, SPEC §2).

LAN clients that only speak ``http://host`` (hass-sunpower, esphome-sunpower)
work unchanged when their address is in ``auth.allow_anonymous_from``: they
get the proxied read-only PVS paths, exactly as on the PVS. Everyone else is
sent to HTTPS with a 308 whose host is the first of ``server.hostnames``, else
the address the client connected to: never the request's ``Host`` (an open
redirect). A request that carries credentials here is refused (403) without
being checked: the credential has crossed the network in clear text, and the
log says which address sent it so its key can be rotated.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import LOGIN_COOKIE, OIDC_COOKIE
from gateway.errors import GatewayError
from gateway.middleware.forwarded import Network, in_networks
from gateway.responses import send_bytes, send_problem
from gateway.routetable import PVS, RouteTable
from gateway.scopes import client_ip, route_path

log = logging.getLogger("gateway.auth")

# Our own cookies; other applications on the same host may set cookies a browser sends here too.
CREDENTIAL_COOKIES = (LOGIN_COOKIE, OIDC_COOKIE)


class LanListenerMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        port: int,
        https_port: int,
        hostnames: tuple[str, ...],
        anonymous_from: tuple[Network, ...],
        routes: RouteTable,
    ) -> None:
        self.routes = routes
        self.app = app
        self.port = port
        self.https_port = https_port
        self.hostname = hostnames[0] if hostnames else ""
        self.anonymous_from = anonymous_from

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if not self.port or scope["type"] != "http" or server is None or server[1] != self.port:
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        ip = client_ip(scope)
        credential = _credential(scope["headers"])
        if credential is not None:
            log.warning(
                "%s from %s sent over plain HTTP (port %d) and refused unchecked: rotate that key or log out that session",
                credential, ip, self.port,
            )
            problem = GatewayError(
                f"credentials are never accepted over plain HTTP: use https on port {self.https_port}, "
                "and replace the credential you sent, which crossed the network in clear text",
                status=403,
            )
            await send_problem(send, problem, head=head)
            return
        if self.routes.policy(route_path(scope)).handler == PVS and self.anonymous_from and in_networks(ip, self.anonymous_from):
            await self.app(scope, receive, send)
            return
        await send_bytes(send, 308, b"", [(b"location", self.location(scope))], content_type=b"text/plain", head=head)

    def location(self, scope: Scope) -> bytes:
        host = self.hostname or str(scope["server"][0])
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        port = "" if self.https_port == 443 else f":{self.https_port}"
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        return f"https://{host}{port}".encode() + path + (b"?" + query if query else b"")


def _credential(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What credential the request carries, named for the log (never its value)."""
    for name, value in headers:
        if name == b"authorization":
            return "an Authorization credential"
        if name == b"x-api-key":
            return "an API key"
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                if part.strip().partition("=")[0] in CREDENTIAL_COOKIES:
                    return "a session cookie"
    return None
