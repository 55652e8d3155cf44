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

And one speed-up (see ``CoalescingCycle``): a response whose length is known
leaves in one write, head and body together, instead of uvicorn's two.

The TLS handshake, before any of this, is bounded by asyncio's 60 s default.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from gateway.errors import _TITLES, PROBLEM_TYPE, problem_body
from gateway.responses import Header
from gateway.settings import ServerSettings

log = logging.getLogger("gateway.access")

# gateway.hotpath.HotPath.answer: (scope, respond(status, fixed fields, own fields, body)) -> answered.
HotAnswer = Callable[[dict[str, Any], Callable[[int, list[Header], list[Header], bytes], None]], bool]

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


def protocol_class(server: ServerSettings, hot: HotAnswer | None = None) -> type[asyncio.Protocol] | str:
    """The protocol class for ``uvicorn.Config(http=...)``; "h11" if httptools is missing.

    ``hot`` (``GatewayApp.hot.answer``) is offered each request before an ASGI task is made for it.
    """
    try:
        from uvicorn.protocols.http import httptools_impl
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without [standard]: h11 caps the head (h11_max_incomplete_event_size)
        return "h11"
    encoder = head_encoder(httptools_impl)
    coalescing = coalescing_cycle(httptools_impl, encoder)
    if encoder is None:
        hot = None  # its answers are encoded by the same code

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

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            # uvicorn builds its RequestResponseCycle inline in on_headers_complete; every cycle,
            # pipelined ones included, starts here, so this is where it gets the coalescing send.
            cycle.__class__ = coalescing
            if (
                hot is not None
                and app is self.app  # not uvicorn's 503 for limit_concurrency
                and cycle.keep_alive
                and not self.flow.write_paused  # the ASGI path waits for the client to read
                and not self.transport.is_closing()
                and self._answer_hot(cycle)
            ):
                return
            super()._start_asgi_task(cycle, app)

        def _answer_hot(self, cycle: Any) -> bool:
            def respond(status: int, fixed: list[Header], own: list[Header], body: bytes) -> None:
                assert encoder is not None
                encoded = encoder.encode_split(status, self.server_state.default_headers, fixed, own)
                if encoded is None or (body and len(body) != encoded[1]):
                    raise RuntimeError("the hot path made an answer it cannot send in one write")
                cycle.response_started = True
                # Written on the loop's next pass, with the other connections' answers: reads
                # first, then writes. Writing from inside the read callback (TLS decryption in
                # progress) halved throughput in bench/, below the ASGI path's.
                self.loop.call_soon(self._send_hot, cycle, encoded[0] + body if body else encoded[0])

            try:
                return hot(cycle.scope, respond)
            except Exception:
                # Never reached by anything a client sends (the layers' checks decline first); if it
                # is, an answer not yet started goes the ASGI way, a broken one closes the connection.
                log.exception("hot path failed on %s", cycle.scope.get("path", "?"))
                if not cycle.response_started:
                    return False
                self.transport.close()
                return True

        def _send_hot(self, cycle: Any, data: bytes) -> None:
            if cycle.disconnected or self.transport.is_closing():
                return
            self.transport.write(data)
            cycle.complete()  # closes if shutdown() began while the answer waited for this pass

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



def head_encoder(impl: Any) -> HeadEncoder | None:
    """The encoder for this uvicorn; None if uvicorn's header checks changed (its own send is kept then)."""
    if impl.HEADER_VALUE_RE.pattern != b"[\x00-\x08\x0a-\x1f\x7f]":
        return None
    return HeadEncoder(impl.STATUS_LINE, impl.HEADER_RE.search)


class HeadEncoder:
    """uvicorn's response-head encoding and checks, made cheaper.

    A field name is checked once per process (answers repeat the same few),
    and values by one scan of the finished head for control characters plus a
    count of its CRs and LFs (exactly one CRLF per line, so none inside a
    field), instead of uvicorn's two patterns per field. Invalid names or
    values raise RuntimeError, as in uvicorn.

    Only the common case is taken: an answer with a ``Content-Length`` and
    no ``Connection`` or ``Transfer-Encoding`` field; for others the
    methods return None.
    """

    # uvicorn's value pattern is every control character but TAB; CR and LF are counted
    # instead (see above), since a joined head has one CRLF per line and must have no other.
    _bad_control = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]").search

    def __init__(self, status_line: dict[int, bytes], bad_name: Callable[[bytes], Any]) -> None:
        self._status_line = status_line
        self._bad_name = bad_name
        # Field names already checked, lower-cased; and those fit to be per-request fields as they are.
        self._names: dict[bytes, bytes] = {}
        self._own_names: set[bytes] = set()
        # id(fixed) -> (fixed, default, status, encoded lines, content length): see encode_split.
        self._blocks: dict[int, tuple[list[Header], list[Header], int, bytes, int]] = {}

    def encode(self, status: int, headers: list[Header]) -> tuple[bytes, int] | None:
        """The whole head (status line to empty line) and the Content-Length."""
        lines = self._lines(status, headers)
        return None if lines is None else (lines[0] + b"\r\n", lines[1])

    def encode_split(self, status: int, default: list[Header], fixed: list[Header], own: list[Header]) -> tuple[bytes, int] | None:
        """``encode(status, [*default, *fixed, *own])``, with the part up to ``own`` made once.

        ``default`` and ``fixed`` must be lists that are not changed once made
        (uvicorn's Date fields, replaced each second; a cache entry's fields,
        replaced when its age changes): they are recognised by identity.
        ``own`` (per-request fields) must have lower-case names and not carry the
        framing fields; else None.
        """
        memo = self._blocks.get(id(fixed))
        if memo is None or memo[0] is not fixed or memo[1] is not default or memo[2] != status:
            lines = self._lines(status, [*default, *fixed])
            if lines is None:
                return None
            if len(self._blocks) >= 64:  # one per cached resource and second: few at a time
                self._blocks.clear()
            memo = self._blocks[id(fixed)] = (fixed, default, status, lines[0], lines[1])
        parts: list[bytes] = []
        for name, value in own:
            if name not in self._own_names and not self._own_name(name):
                return None
            parts += (name, b": ", value, b"\r\n")
        tail = b"".join(parts)
        if self._bad_control(tail) or tail.count(b"\n") != len(own) or tail.count(b"\r") != len(own):
            raise RuntimeError("Invalid HTTP header value.")
        return memo[3] + tail + b"\r\n", memo[4]

    def _own_name(self, name: bytes) -> bool:
        """Whether ``name`` may be a per-request field as it is (checked, lower case, not framing)."""
        lower = self._names.get(name) or self._checked_name(name)
        if lower != name or name in (b"content-length", b"connection", b"transfer-encoding"):
            return False
        if len(self._own_names) < 64:
            self._own_names.add(name)
        return True

    def _lines(self, status: int, headers: list[Header]) -> tuple[bytes, int] | None:
        """Status line and fields, checked (no final empty line), and the Content-Length."""
        length = None
        parts = [self._status_line[status]]
        names = self._names
        for name, value in headers:
            name = names.get(name) or self._checked_name(name)
            if name == b"content-length":
                length = value
            elif name == b"connection" or name == b"transfer-encoding":
                return None
            parts += (name, b": ", value, b"\r\n")
        if length is None:
            return None
        head = b"".join(parts)
        lines = len(headers) + 1  # the status line and the fields
        if self._bad_control(head) or head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise RuntimeError("Invalid HTTP header value.")
        return head, int(length)

    def _checked_name(self, name: bytes) -> bytes:
        if self._bad_name(name):
            raise RuntimeError("Invalid HTTP header name.")
        lower = name.lower()
        if len(self._names) < 512:  # names are the app's, not the client's; bounded all the same
            self._names[name] = lower
        return lower


def coalescing_cycle(impl: Any, encoder: HeadEncoder | None) -> type:
    """uvicorn's ``RequestResponseCycle`` with the response head held back until the body.

    uvicorn writes the head on ``http.response.start`` and the body on
    ``http.response.body``: two writes, so under TLS two records and two
    ``send`` syscalls for every answer. Holding the head until the first body
    message and writing both at once saves one of each, about a sixth of a
    cache hit's cost in ``bench/``. The head is made by ``head_encoder``.

    Only the common case is taken over: a keep-alive response that the encoder
    takes. Anything else (chunked answers, ``Connection: close``, uvicorn's
    own 500) is left to uvicorn's code unchanged.
    """
    base = impl.RequestResponseCycle
    if encoder is None:
        return base

    class CoalescingCycle(base):  # type: ignore[misc, valid-type]
        _held: bytes | None = None

        async def send(self, message: Any) -> None:
            kind = message["type"]
            if kind == "http.response.body" and self._held is not None:
                await self._send_with_head(message)
                return
            if kind == "http.response.start" and not self.response_started and self._hold_head(message):
                return
            await super().send(message)

        def _hold_head(self, message: Any) -> bool:
            if self.access_log or not self.keep_alive or self.disconnected or self.flow.write_paused:
                return False
            encoded = encoder.encode(message["status"], [*self.default_headers, *message.get("headers", ())])
            if encoded is None:
                return False
            self._held, self.expected_content_length = encoded
            self.chunked_encoding = False
            self.response_started = True
            self.waiting_for_100_continue = False
            return True

        async def _send_with_head(self, message: Any) -> None:
            head, self._held = self._held, None
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()
            if self.disconnected:
                return
            body = message.get("body", b"")
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
                body = b""
            elif len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            self.transport.write(head + body if body else head)
            if not message.get("more_body", False):
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.complete()

        def complete(self) -> None:
            """The answer's last bytes are written: uvicorn's end of a response (this and the hot path's)."""
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    return CoalescingCycle
