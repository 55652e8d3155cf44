"""Forwarded headers, believed only from configured proxies (fail closed).

With ``server.trusted_proxies`` empty, ``X-Forwarded-*`` and ``Forwarded``
change nothing. When the direct peer is trusted, the client IP is found by
walking ``X-Forwarded-For`` (or ``Forwarded: for=``) from the right and
skipping trusted hops: the leftmost entries are whatever the client wrote.
The result lands in ``scope["client"]``, ``scope["scheme"]``, the Host header
and ``scope["root_path"]``, so everything downstream (limits, logs,
anonymous CIDRs, OIDC redirect URLs) reads one answer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    def __init__(self, app: ASGIApp, trusted: tuple[Network, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.trusted and scope["type"] == "http" and scope.get("client"):
            peer = scope["client"][0]
            if in_networks(peer, self.trusted):
                self._apply(scope)
        await self.app(scope, receive, send)

    def _apply(self, scope: Scope) -> None:
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
            if port and ":" not in host.rsplit("]", 1)[-1]:
                host = f"{host}:{port.strip()}"
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", host.encode("latin-1"))]
        prefix = headers.get(b"x-forwarded-prefix")
        if prefix:
            prefix = "/" + prefix.split(",")[-1].strip().strip("/")
            if prefix != "/":
                scope["root_path"] = prefix + scope.get("root_path", "")
