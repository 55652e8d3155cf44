"""The edge of every listener: what a client connection may cost before and between requests.

Each accepted connection gets an ``Edge``, an asyncio protocol that stands in
front of uvicorn's stock h11 protocol and forwards every callback to it.
HTTP parsing, framing, keep-alive and pipelining stay uvicorn's and h11's; the
edge only counts connections, bytes and time, and refuses:

- **caps**: over ``server.max_connections`` in total or
  ``server.max_connections_per_ip`` from one address, a new connection is
  closed at once, before any TLS handshake;
- **TLS handshake**: done here (``gateway.tlsconn``) so it has its own
  deadline, ``server.tls_handshake_timeout`` (asyncio's default is 60 s);
- **idle**: a connection with no request in flight that sends nothing for
  ``server.keepalive_timeout`` is closed;
- **slow or endless heads**: once the first byte of a request arrives, the
  request must reach the app within ``keepalive_timeout`` (else 408); once
  more than ``max_url_length + max_header_bytes`` (plus framing) has arrived
  without a request reaching the app, the next read is refused with 431
  (memory: that much plus one read). Heads under it are judged precisely by
  ``GuardMiddleware`` (414/431), after h11 has parsed them;
- **bytes while a request is in flight**: h11 stops reading while a request
  is answered (uvicorn pauses the transport on ``h11.PAUSED``); should more
  than a head's worth arrive anyway, the connection is aborted;
- **clients that do not read**: a response whose writing has been paused by
  the transport's flow control for ``keepalive_timeout`` aborts the connection.

A refused connection lingers (half-closed where the transport can, input
dropped) until the client has been quiet for ``LINGER_QUIET`` seconds, so the
client reads its 408/431 instead of a reset.

The app tells the edge when a request starts and ends (``EdgeMiddleware``,
the outermost layer): that is the only way to know where a head ends without
parsing it a second time.

What this relies on from uvicorn (checked by tests/test_edge.py, which fails
if any of it changes):

1. ``uvicorn.Config(http=<callable>)`` calls the callable once per connection
   with keyword arguments (``config``, ``server_state``, ``app_state``,
   ``_loop``); we pass them through unchanged to ``H11Protocol``.
2. ``H11Protocol`` is a plain ``asyncio.Protocol`` and pauses reading while a
   request is in flight.
3. ``H11Protocol.send_400_response(msg)``, overridden (``ProblemH11Protocol``)
   so that a request h11 refuses gets a problem document like every other
   error, not uvicorn's plain text.
4. ``H11Protocol.connection_lost(None)`` cancels its keep-alive timer (with an
   exception it does not): the edge reports every loss as ``None``, or each
   aborted connection would stay in memory until that timer fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import PROBLEM_TYPE, problem_body
from gateway.responses import DEFAULT_CSP, SECURITY_FIELDS, http_date
from gateway.settings import ServerSettings
from gateway.tlsconn import TLSTransport

log = logging.getLogger("gateway.edge")

# A refused connection closes once the client has sent nothing for this long (nginx's
# lingering close, shorter): a client still writing its request sends without pause.
LINGER_QUIET = 1.0


@dataclass(frozen=True)
class EdgeLimits:
    keepalive_timeout: float = 15.0
    head_bytes: int = 16384 + 2048 + 1024
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    tls_handshake_timeout: float = 10.0

    @classmethod
    def from_settings(cls, server: ServerSettings) -> EdgeLimits:
        return cls(
            keepalive_timeout=server.keepalive_timeout,
            # The URL and header limits together, plus the request line's and each field's framing.
            head_bytes=server.max_url_length + server.max_header_bytes + 4 * server.max_header_count + 64,
            max_connections=server.max_connections,
            max_connections_per_ip=server.max_connections_per_ip,
            tls_handshake_timeout=server.tls_handshake_timeout,
        )


def canned(status: int, detail: str) -> bytes:
    """A whole HTTP/1.1 problem answer that closes the connection."""
    body = problem_body(status, detail)
    fields = [
        (b"date", http_date()),
        (b"content-type", PROBLEM_TYPE.encode()),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
        DEFAULT_CSP,
        *SECURITY_FIELDS,  # the same fields GuardMiddleware adds to every answer of the app
    ]
    head = b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
    return head + b"".join(name + b": " + value + b"\r\n" for name, value in fields) + b"\r\n" + body


class ProblemH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; a request h11 refuses gets a problem document (RFC 9457)."""

    def send_400_response(self, msg: str) -> None:
        self.transport.write(canned(400, "malformed HTTP request: " + msg.rstrip(".").lower()))
        self.transport.close()


class Connections:
    """The open connections of every listener: counts for the caps, and the edge of each
    connection by its addresses, for ``EdgeMiddleware``."""

    def __init__(self, limits: EdgeLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self.by_addresses: dict[tuple[Any, Any], Edge] = {}
        self.refused: dict[str, int] = {}
        self._warned_at: dict[str, float] = {}

    def admit(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; the reason it is refused, or None."""
        if self.total >= self.limits.max_connections:
            return "max_connections"
        if self.per_ip.get(ip, 0) >= self.limits.max_connections_per_ip:
            return "max_connections_per_ip"
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]

    def note_refused(self, reason: str, ip: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        now = self.clock()
        if now >= self._warned_at.get(reason, 0.0):  # at most one line a minute per reason
            self._warned_at[reason] = now + 60.0
            log.warning("refusing connections over %s (latest from %s)", reason, ip)

    def edge_for(self, scope: Scope) -> Edge | None:
        return self.by_addresses.get((scope.get("server"), scope.get("client")))


class Edge(asyncio.Protocol):
    """One client connection in front of uvicorn's protocol (see the module docstring)."""

    def __init__(self, inner: asyncio.Protocol, connections: Connections, tls_ports: dict[int, ssl.SSLContext]) -> None:
        self.inner = inner
        self.connections = connections
        self.tls_ports = tls_ports  # listeners that speak TLS, by port
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.BaseTransport | None = None
        self.ip = ""
        self.addresses: tuple[Any, Any] | None = None
        self.counted = False
        self.opened = False  # inner.connection_made was called
        self.active = False  # a request is with the app
        self.head_bytes = 0  # bytes since the last request reached the app (or the start)
        self.line_ended = False  # whether those bytes end a request line: 431 past the cap, else 414
        self.lingering = False
        self.tls: TLSTransport | None = None  # the decrypted side, on a TLS listener
        self.timer: asyncio.TimerHandle | None = None
        self.stall: asyncio.TimerHandle | None = None
        self.last_call: asyncio.TimerHandle | None = None  # a refused connection's latest close

    # -- asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else ""
        refused = self.connections.admit(self.ip)
        if refused is not None:
            self.connections.note_refused(refused, self.ip)
            cast(asyncio.WriteTransport, transport).abort()
            return
        self.counted = True
        local = transport.get_extra_info("sockname")
        context = self.tls_ports.get(local[1]) if isinstance(local, tuple) else None
        if context is None:
            self._open(transport)
            return
        self.tls = TLSTransport(cast(asyncio.Transport, transport), context)
        self._arm(self.connections.limits.tls_handshake_timeout, self._handshake_too_slow)

    def _open(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.addresses = (_address(transport.get_extra_info("sockname")), _address(transport.get_extra_info("peername")))
        self.connections.by_addresses[self.addresses] = self
        self.opened = True
        self.inner.connection_made(transport)
        self._arm(self.connections.limits.keepalive_timeout, self._idle_passed)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._arm(LINGER_QUIET, self._close)  # dropped: the connection was refused
            return
        if self.tls is not None:
            try:
                data = self.tls.feed(data)
            except (ssl.SSLError, ValueError) as exc:
                log.debug("TLS with %s failed: %s", self.ip, exc)
                self._abort()
                return
            if not self.opened:
                if not self.tls.handshaken:
                    return
                self._open(self.tls)
            if not data:
                return
        if not self.opened:
            return
        self._plain_received(data)

    def _plain_received(self, data: bytes) -> None:
        limits = self.connections.limits
        if self.head_bytes > limits.head_bytes:
            # What arrived so far held no complete head (a request reaching the app resets the
            # count), or arrived while a request was answered, when h11 reads nothing.
            if self.active:
                log.warning("aborting a connection from %s: %d bytes sent ahead of an unanswered request", self.ip, self.head_bytes)
                self._abort()
            elif self.line_ended:
                self._refuse(431, f"request head larger than {limits.head_bytes} bytes")
            else:
                self._refuse(414, f"request line longer than {limits.head_bytes} bytes")
            return
        if not self.active and self.head_bytes == 0:
            self._arm(limits.keepalive_timeout, self._head_too_slow)  # a new head begins
        self.head_bytes += len(data)
        self.line_ended = self.line_ended or b"\n" in data
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.lingering or not self.opened:
            self._close()
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.opened:
            self.opened = False
            # Reported as a clean close whatever ended it: uvicorn cancels its keep-alive timer
            # only then, and that timer would otherwise keep an aborted connection (under TLS
            # with ~300 KB of buffers) alive for keepalive_timeout.
            self.inner.connection_lost(None)
        self._release()

    def pause_writing(self) -> None:
        # The client is not reading what we send: give it keepalive_timeout to start again.
        if self.stall is None:
            self.stall = self.loop.call_later(self.connections.limits.keepalive_timeout, self._stalled)
        if self.opened:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        if self.opened:
            self.inner.resume_writing()

    # -- told by EdgeMiddleware

    def request_started(self) -> None:
        self.active = True
        self.head_bytes = 0
        self.line_ended = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def request_done(self) -> None:
        self.active = False
        if self.transport is None or self.transport.is_closing() or self.lingering:
            return
        if self.head_bytes:  # the next head began while this request was answered
            self._arm(self.connections.limits.keepalive_timeout, self._head_too_slow)
        else:
            self._arm(self.connections.limits.keepalive_timeout, self._idle_passed)

    # -- deadlines and refusals

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, callback)

    def _handshake_too_slow(self) -> None:
        self.timer = None
        if not self.opened:
            log.debug("TLS handshake with %s not done within %g s", self.ip, self.connections.limits.tls_handshake_timeout)
            self._abort()

    def _idle_passed(self) -> None:
        self.timer = None
        if not self.active:
            self._close()

    def _head_too_slow(self) -> None:
        self.timer = None
        if not self.active:
            self._refuse(408, f"request head not complete within {self.connections.limits.keepalive_timeout:g} s")

    def _stalled(self) -> None:
        self.stall = None
        log.info("aborting a connection from %s: it has not read its answer for %g s", self.ip, self.connections.limits.keepalive_timeout)
        self._abort()

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` without the app, then linger and close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.info("refused a connection from %s: %d %s", self.ip, status, detail)
        transport = cast(asyncio.WriteTransport, transport)
        transport.write(canned(status, detail))
        self.lingering = True
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            if transport.can_write_eof():
                transport.write_eof()
        self._arm(LINGER_QUIET, self._close)
        # Whatever the client keeps sending, the connection ends within keepalive_timeout.
        self.last_call = self.loop.call_later(self.connections.limits.keepalive_timeout, self._close)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            cast(asyncio.WriteTransport, self.transport).abort()

    def _cancel_timers(self) -> None:
        for handle in (self.timer, self.stall, self.last_call):
            if handle is not None:
                handle.cancel()
        self.timer = self.stall = self.last_call = None

    def _release(self) -> None:
        if self.addresses is not None:
            self.connections.by_addresses.pop(self.addresses, None)
            self.addresses = None
        if self.counted:
            self.counted = False
            self.connections.release(self.ip)


def _address(value: Any) -> Any:
    """An address as uvicorn puts it in the scope (host, port)."""
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return value


def protocol_factory(connections: Connections, tls_ports: dict[int, ssl.SSLContext]) -> Callable[..., asyncio.Protocol]:
    """What ``uvicorn.Config(http=...)`` gets: an ``Edge`` around uvicorn's h11 protocol per
    connection; TLS on the listeners whose port is in ``tls_ports``."""

    def make(**uvicorn_kwargs: Any) -> asyncio.Protocol:
        return Edge(ProblemH11Protocol(**uvicorn_kwargs), connections, tls_ports)

    return make


class EdgeMiddleware:
    """The outermost layer: tells the connection's edge when its request reaches the app and when it is done."""

    def __init__(self, app: ASGIApp, connections: Connections) -> None:
        self.app = app
        self.connections = connections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        edge = self.connections.edge_for(scope) if scope["type"] == "http" else None
        if edge is None:
            await self.app(scope, receive, send)
            return
        edge.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            edge.request_done()


def stats(connections: Connections) -> dict[str, Any]:
    return {"open": connections.total, "addresses": len(connections.per_ip), "refused": dict(connections.refused)}


