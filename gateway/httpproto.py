"""The HTTP/1.1 connection protocol: uvicorn's httptools protocol with a deadline and a size cap on request heads.

uvicorn with httptools (what ``uvicorn[standard]`` picks) arms no timer
until a first response has been sent, cancels its keep-alive timer on every
byte received, and buffers a request line and header block of any size: a
client sending its headers one byte at a time (slowloris), or never
finishing them, holds a connection forever, and one sending megabytes of
header keeps them all in memory. Size checks in ``GuardMiddleware`` only run
once the head is complete. So, per connection:

- the head of each request must be complete within ``server.keepalive_timeout``
  seconds of its first byte (of the connection opening, for the first
  request). A partial head past the deadline gets ``408`` and the connection is
  closed; a connection that sent nothing at all is closed without an answer
  (there is no request to answer, and a 408 on an idle connection would race
  the client's next request);
- a head larger than the URL and header limits together (plus framing slack)
  gets ``414`` (the URL alone is over ``max_url_length``) or ``431`` as soon
  as that many bytes have arrived, and the connection is closed. Heads under
  the cap are judged precisely by ``GuardMiddleware`` (414/431 problems);
- the parser's own 400 (malformed HTTP) is a problem document with the
  security headers, like every other answer.

The TLS handshake, before any of this, is bounded by asyncio's 60 s default.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.errors import PROBLEM_TYPE, _TITLES, problem_body
from gateway.settings import ServerSettings

log = logging.getLogger("gateway.access")

# Same fields GuardMiddleware adds to every answer.
_SECURITY = (
    b"x-content-type-options: nosniff\r\n"
    b"referrer-policy: no-referrer\r\n"
    b"x-frame-options: DENY\r\n"
    b"cross-origin-resource-policy: same-origin\r\n"
    b"content-security-policy: default-src 'none'; frame-ancestors 'none'\r\n"
    b"cache-control: no-store\r\n"
)


def head_cap(server: ServerSettings) -> int:
    """Bytes a request head may take before it is refused unparsed: the URL and header
    limits plus request line and per-field framing (``: `` and CRLF)."""
    return server.max_url_length + server.max_header_bytes + 8 * server.max_header_count + 1024


def protocol_class(server: ServerSettings) -> type[asyncio.Protocol] | str:
    """The protocol class for ``uvicorn.Config(http=...)``; "h11" if httptools is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without [standard]: h11 caps the head (h11_max_incomplete_event_size)
        return "h11"

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        head_timeout = float(server.keepalive_timeout)
        max_head = head_cap(server)
        max_url = server.max_url_length

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            self._reading_head = True  # the next bytes belong to a request head

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a connection that never sends a request is closed after the deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._reading_head:
                super().data_received(data)
                return
            room = self.max_head - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                super().data_received(data)
                # A head that arrived whole costs no timer; a partial one starts the deadline.
                if self._reading_head and self._head_timer is None and not self.transport.is_closing():
                    self._arm()
                return
            # Parse only up to one byte past the cap: either the head completes within it
            # (the rest is the next request), or it is refused with what was parsed so far.
            first, rest = data[: room + 1], data[room + 1 :]
            self._head_bytes += len(first)
            super().data_received(first)
            if self.transport.is_closing():
                return
            if self._reading_head:
                if len(getattr(self, "url", b"")) > self.max_url:
                    self._refuse(414, f"URL longer than {self.max_url} bytes")
                else:
                    self._refuse(431, f"request head larger than {self.max_head} bytes")
                return
            if rest:
                self.data_received(rest)

        def on_headers_complete(self) -> None:
            self._reading_head = False
            self._head_bytes = 0
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle time until the next request is uvicorn's keep-alive timer; its first byte starts our deadline.
            self._reading_head = True
            self._head_bytes = 0

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "malformed HTTP request")

        # ------------------------------------------------------------------

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_deadline)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._reading_head:
                return
            if self._head_bytes:
                self._refuse(408, f"request head not complete within {self.head_timeout:g} s")
            else:
                self.transport.close()

        def _refuse(self, status: int, detail: str) -> None:
            """Answer a problem and close, without the app: the request never became one."""
            self._disarm()
            self._reading_head = False
            body = problem_body(status, detail)
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _TITLES.get(status, "Error").encode())]
            for name, value in self.server_state.default_headers:
                head.append(name + b": " + value + b"\r\n")
            head.append(b"content-type: " + PROBLEM_TYPE.encode() + b"\r\n")
            head.append(b"content-length: %d\r\n" % len(body))
            head.append(b"connection: close\r\n")
            head.append(_SECURITY)
            self.transport.write(b"".join(head) + b"\r\n" + body)
            self.transport.close()
            client = self.client[0] if self.client else "-"
            log.info("client=%s status=%d detail=%r (connection closed before the app)", client, status, detail)

    return GuardedHttpToolsProtocol
