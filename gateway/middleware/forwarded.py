"""Forwarded headers, believed only from configured proxies (fail closed).

With ``server.trusted_proxies`` empty, ``X-Forwarded-*`` and ``Forwarded``
change nothing. When the direct peer is trusted, the client IP is found by
walking ``X-Forwarded-For`` (or ``Forwarded: for=``) from the right and
skipping trusted hops: the leftmost entries are whatever the client wrote.
The result lands in ``scope["client"]``, ``scope["scheme"]``, the Host header
and ``scope["root_path"]``, so everything downstream (limits, logs,
anonymous CIDRs, OIDC redirect URLs) reads one answer. When the direct peer
is trusted, ``RequestState.peer_trusted`` is True: the only
record of the real peer once ``scope["client"]`` is rewritten (the front
proxy's identity header is believed on that alone).

Mount prefix, Starlette's convention: ``scope["path"]`` (and ``raw_path``)
is the full path *including* ``scope["root_path"]``. The prefix is the
trusted proxy's ``X-Forwarded-Prefix`` (what it stripped), else the configured
``server.root_path``; a request that arrives without the prefix (the proxy
stripped it) gets it prepended, one that arrives with it (the proxy passed
the path through) is left as it is, so both proxy styles work.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.scopes import request_state

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# A path prefix as it may appear in links and Location headers: segments of unreserved/sub-delim characters.
_SAFE_PREFIX = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def in_networks(ip: str, networks: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def _forwarded_pairs(value: str) -> list[dict[str, str]]:
    """RFC 7239 ``Forwarded``: a list of ';'-separated key=value elements."""
    elements = []
    for element in value.split(","):
        pairs = {}
        for pair in element.split(";"):
            key, _, val = pair.strip().partition("=")
            val = val.strip().strip('"')
            if key:
                pairs[key.lower()] = val
        elements.append(pairs)
    return elements


def _clean_ip(value: str) -> str:
    value = value.strip()
    if value.startswith("["):  # "[2001:db8::1]:4711"
        return value[1:].split("]")[0]
    if value.count(":") == 1:  # "192.0.2.1:4711"
        return value.split(":")[0]
    return value


class ForwardedMiddleware:
    def __init__(self, app: ASGIApp, trusted: tuple[Network, ...], root_path: str = "") -> None:
        self.app = app
        self.trusted = trusted
        self.root_path = root_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            prefix = self.root_path
            if self.trusted and scope.get("client") and in_networks(scope["client"][0], self.trusted):
                request_state(scope).peer_trusted = True
                prefix = self._apply(scope) or prefix
            if prefix:
                _mount(scope, prefix)
        await self.app(scope, receive, send)

    def rewrites(self, scope: Scope) -> bool:
        """Whether ``__call__`` would change this request's scope (a mount prefix, a trusted peer)."""
        return bool(self.root_path) or bool(
            self.trusted and scope.get("client") and in_networks(scope["client"][0], self.trusted)
        )

    def _apply(self, scope: Scope) -> str | None:
        """Believe the trusted peer's forwarded headers; return its X-Forwarded-Prefix, if any."""
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in (b"x-forwarded-for", b"forwarded"):
                # Several fields of one name are one comma-joined list.
                prior = headers.get(name)
                headers[name] = f"{prior}, {value.decode('latin-1')}" if prior else value.decode("latin-1")
            elif name.startswith(b"x-forwarded-"):
                headers[name] = value.decode("latin-1")

        hops: list[str] = []
        proto = host = None
        if b"x-forwarded-for" in headers:
            hops = [_clean_ip(h) for h in headers[b"x-forwarded-for"].split(",") if h.strip()]
        elif b"forwarded" in headers:
            elements = _forwarded_pairs(headers[b"forwarded"])
            hops = [_clean_ip(e["for"]) for e in elements if "for" in e]
            last = elements[-1] if elements else {}
            proto, host = last.get("proto"), last.get("host")
        client = None
        for hop in reversed(hops):
            client = hop
            if not in_networks(hop, self.trusted):
                break
        if client:
            try:
                ipaddress.ip_address(client)
                scope["client"] = (client, 0)
            except ValueError:
                pass  # "unknown" or an obfuscated id: keep the proxy's address

        proto = headers.get(b"x-forwarded-proto", proto)
        if proto:
            proto = proto.split(",")[-1].strip().lower()
            if proto in ("http", "https"):
                scope["scheme"] = proto
        host = headers.get(b"x-forwarded-host", host)
        port = headers.get(b"x-forwarded-port")
        if host:
            host = host.split(",")[-1].strip()
            port = port.split(",")[-1].strip() if port else ""
            default = {"http": "80", "https": "443"}.get(scope.get("scheme", "http"))
            if port.isdigit() and port != default and ":" not in host.rsplit("]", 1)[-1]:
                host = f"{host}:{port}"
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", host.encode("latin-1"))]
        prefix = headers.get(b"x-forwarded-prefix")
        if prefix:
            prefix = "/" + prefix.split(",")[-1].strip().strip("/")
            if prefix != "/" and _SAFE_PREFIX.fullmatch(prefix):
                return prefix
        return None


def _mount(scope: Scope, prefix: str) -> None:
    """Set ``root_path`` and make ``path``/``raw_path`` the full path under it."""
    path: str = scope["path"]
    scope["root_path"] = prefix
    if path == prefix or path.startswith(prefix + "/"):
        return  # the proxy passed the full path through
    scope["path"] = prefix + path
    raw = scope.get("raw_path")
    if raw is not None:
        scope["raw_path"] = prefix.encode("latin-1") + raw
