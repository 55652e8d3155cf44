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
  the client's next request). The same deadline, counted from the last
  answer, closes idle keep-alive connections in place of uvicorn's timer;
- a head larger than the URL and header limits together (plus framing slack)
  gets ``414`` (the URL alone is over ``max_url_length``) or ``431`` as soon
  as that many bytes have arrived, and the connection is closed. Heads under
  the cap are judged precisely by ``GuardMiddleware`` (414/431 problems);
- the parser's own 400 (malformed HTTP) is a problem document with the
  security headers, like every other answer;
- a refused connection lingers before it closes (see ``_linger``), so the
  client reads its problem instead of a reset.

And one speed-up (see ``CoalescingCycle``): a response whose length is known
leaves in one write, head and body together, instead of uvicorn's two.

The TLS handshake, before any of this, is bounded by asyncio's 60 s default.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any, Protocol

from gateway.errors import _TITLES, PROBLEM_TYPE, problem_body
from gateway.responses import Header
from gateway.settings import ServerSettings

log = logging.getLogger("gateway.access")

# A refused connection closes once the client has sent nothing for this long (see _linger);
# nginx's lingering_timeout, shorter: a client still writing its request sends without pause.
LINGER_QUIET = 1.0


class FastPath(Protocol):
    """What the protocol needs of ``gateway.hotpath.HotPath``."""

    repeats: int  # requests whose parse was skipped (see _repeat): the protocol counts them here

    def answer(
        self, scope: dict[str, Any], respond: Callable[[int, list[Header], list[Header], bytes, bytes], None]
    ) -> bool:
        """(scope, respond(status, fixed fields, own fields, made lines, body)) -> answered."""
        ...

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


def protocol_class(server: ServerSettings, fast: FastPath | None = None) -> type[asyncio.Protocol] | str:
    """The protocol class for ``uvicorn.Config(http=...)``; "h11" if httptools is missing.

    With ``fast`` (``GatewayApp.hot``, present unless ``server.hot_path`` is off) each
    request is offered to ``fast.answer`` before an ASGI task is made for it, and a request
    repeated byte for byte on its connection is not parsed again (``_repeat``).
    """
    try:
        from uvicorn.protocols.http import httptools_impl
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without [standard]: h11 caps the head (h11_max_incomplete_event_size)
        return "h11"
    encoder = head_encoder(httptools_impl)
    coalescing = coalescing_cycle(httptools_impl, encoder)
    if encoder is None:
        fast = None  # its answers are encoded by the same code
    hot = fast.answer if fast is not None else None

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        head_timeout = float(server.keepalive_timeout)
        max_head = head_cap(server)
        max_url = server.max_url_length

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # One deadline per connection, for the idle time before a request and for its head
            # (see _set_deadline); uvicorn's own keep-alive timer is never armed.
            self._deadline: float | None = None
            self._deadline_timer: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            self._reading_head = True  # the next bytes belong to a request head
            # The parse of the last request that came alone in one read: its bytes and scope
            # (see _repeat). _parsed collects the scopes parsed from the read being fed.
            self._repeat_bytes: bytes | None = None
            self._repeat_scope: dict[str, Any] | None = None
            self._parsed: list[dict[str, Any] | None] | None = None
            # Per-connection memos of the layers (scope["gateway.connection"]): dropped with the connection.
            self._memo: dict[str, Any] = {}
            # While a refused connection lingers: when it closes at the latest (see _linger).
            self._linger_end: float | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._set_deadline()  # a connection that never sends a request is closed after the deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline = None
            self._memo.clear()  # credentials kept for the connection go with it
            self._repeat_bytes = self._repeat_scope = None
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
                self._deadline_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._reading_head:
                if self._linger_end is not None:
                    self._deadline = self.loop.time() + LINGER_QUIET  # dropped: the request was refused
                    return
                super().data_received(data)
                return
            if data == self._repeat_bytes and self._may_repeat():
                self._repeat()
                return
            room = self.max_head - self._head_bytes
            if len(data) <= room:
                first_bytes = not self._head_bytes
                remember = first_bytes and fast is not None and self._may_repeat()
                self._head_bytes += len(data)
                if remember:
                    self._parse_and_remember(data)
                else:
                    super().data_received(data)
                # The idle deadline ends with the first byte; a head that arrived whole has none
                # (on_headers_complete), a partial one has its own from its first byte.
                if self._reading_head and first_bytes and not self.transport.is_closing():
                    self._set_deadline()
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

        def _head_complete(self) -> None:
            self._reading_head = False
            self._head_bytes = 0
            self._deadline = None  # none while the app works on the request, as in uvicorn

        def on_headers_complete(self) -> None:
            self._head_complete()
            if self._parsed is not None:
                self._parsed.append(None)  # uvicorn's scope, if it starts the request at once
            super().on_headers_complete()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            # uvicorn builds its RequestResponseCycle inline in on_headers_complete; every cycle,
            # pipelined ones included, starts here, so this is where it gets the coalescing send.
            cycle.__class__ = coalescing
            cycle.server_state = self.server_state  # for a Date of when the answer starts (CoalescingCycle.send)
            cycle.scope["gateway.connection"] = self._memo
            if self._parsed:
                # As parsed, before any layer adds to it; the headers list is copied on use.
                self._parsed[-1] = {**cycle.scope, "state": None}
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
            def respond(status: int, fixed: list[Header], own: list[Header], made: bytes, body: bytes) -> None:
                assert encoder is not None
                encoded = encoder.encode_split(status, self.server_state.default_headers, fixed, own, body, made)
                if encoded is None or (body and len(body) != encoded[1]):
                    raise RuntimeError("the hot path made an answer it cannot send in one write")
                cycle.response_started = True
                # Written on the loop's next pass, with the other connections' answers: reads
                # first, then writes. Writing from inside the read callback (TLS decryption in
                # progress) halved throughput in bench/, below the ASGI path's.
                self.loop.call_soon(self._send_hot, cycle, encoded[0])

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
            # uvicorn's, with our deadline for its keep-alive timer (a timer made and cancelled
            # per request cost more than a cache hit's rate-limit check).
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self._reading_head = True
            self._head_bytes = 0
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self._set_deadline()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "malformed HTTP request")

        # ------------------------------------------------------------------

        # -- requests repeated byte for byte ----------------------------------

        def _may_repeat(self) -> bool:
            """At a request boundary, with nothing in progress: where uvicorn would start a request at once."""
            return (
                not self._head_bytes
                and not self.pipeline
                and (self.cycle is None or self.cycle.response_complete)
                and self.limit_concurrency is None
                and not self.transport.is_closing()
            )

        def _parse_and_remember(self, data: bytes) -> None:
            """Feed ``data`` to the parser; if it held exactly one whole request without a body,
            remember its bytes and scope for ``_repeat``."""
            self._parsed = []
            try:
                super().data_received(data)
            finally:
                parsed, self._parsed = self._parsed, None
            cycle = self.cycle
            if (
                len(parsed) == 1
                and parsed[0] is not None
                and cycle is not None
                and cycle.scope["method"] in ("GET", "HEAD")  # what the hot path takes
                and not cycle.more_body  # the parser saw the request's end in this read
                and not cycle.body
                and cycle.keep_alive
                and not self.expect_100_continue
                and not self._reading_head  # no second request began
            ):
                self._repeat_bytes, self._repeat_scope = data, parsed[0]
            else:
                self._repeat_bytes = self._repeat_scope = None

        def _repeat(self) -> None:
            """The request parsed last, again: what the parser's callbacks would do, without them.

            A poller sends the same bytes on every request of a keep-alive connection.
            The parser is deterministic, so the same bytes at a request boundary give
            the same request; only the parse is skipped. The new cycle is started as
            uvicorn starts one, and every decision about it is taken anew (hot path or app).
            """
            memo = self._repeat_scope
            assert memo is not None and fast is not None
            fast.repeats += 1
            self._head_complete()
            scope = {**memo, "headers": memo["headers"].copy(), "state": self.app_state.copy()}
            self.scope = scope
            self.headers = scope["headers"]
            cycle = coalescing(
                scope=scope,
                transport=self.transport,
                flow=self.flow,
                logger=self.logger,
                access_logger=self.access_logger,
                access_log=self.access_log,
                default_headers=self.server_state.default_headers,
                message_event=asyncio.Event(),
                expect_100_continue=False,
                keep_alive=True,
                on_response=self.on_response_complete,
            )
            cycle.more_body = False  # on_message_complete: the request had no body
            cycle.message_event.set()
            self.cycle = cycle
            self._start_asgi_task(cycle, self.app)

        def _set_deadline(self) -> None:
            """The next request head must be complete ``head_timeout`` seconds from now.

            Deadlines only move later (always now plus the same timeout), so one timer per
            connection suffices: when it fires early it is set again for the current deadline,
            and a request costs a clock read instead of a timer made and cancelled.
            """
            self._deadline = self.loop.time() + self.head_timeout
            if self._deadline_timer is None:
                self._deadline_timer = self.loop.call_at(self._deadline, self._deadline_passed)

        def _deadline_passed(self) -> None:
            self._deadline_timer = None
            if self._deadline is None or self.transport.is_closing():
                return  # a request is being answered; its end sets the next deadline
            due = self._deadline if self._linger_end is None else min(self._deadline, self._linger_end)
            if self.loop.time() < due:
                self._deadline_timer = self.loop.call_at(due, self._deadline_passed)
                return
            self._deadline = None
            if self._linger_end is not None:
                self.transport.close()  # the client went quiet, or lingered too long
                return
            if self._head_bytes:
                self._refuse(408, f"request head not complete within {self.head_timeout:g} s")
            else:
                self.transport.close()  # idle: uvicorn's keep-alive close

        def _refuse(self, status: int, detail: str) -> None:
            """Answer a problem and close, without the app: the request never became one."""
            self._deadline = None
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
            self._linger()
            client = self.client[0] if self.client else "-"
            log.info("client=%s status=%d detail=%r (connection closed before the app)", client, status, detail)

        def _linger(self) -> None:
            """Close without losing the answer just written, as nginx's lingering close.

            A socket closed with unread bytes makes the kernel send a reset, and a reset can
            destroy the answer before the client reads it: a client still writing a megabyte
            header, or the rest of a malformed request, would see only the reset. So the
            connection stops sending (half-closes, where the transport can; TLS cannot),
            drops whatever still arrives (data_received), and closes when the client closes,
            has sent nothing for LINGER_QUIET s, or after head_timeout s at the most.
            """
            if self.transport.is_closing():
                return
            if self.transport.can_write_eof():
                self.transport.write_eof()  # after the answer: the client reads it, then end of stream
            self.flow.resume_reading()
            now = self.loop.time()
            self._linger_end = now + self.head_timeout
            self._deadline = now + LINGER_QUIET
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()  # it may be armed for a later head deadline
            self._deadline_timer = self.loop.call_at(self._deadline, self._deadline_passed)

    return GuardedHttpToolsProtocol


# Every control character but TAB: what uvicorn's HEADER_VALUE_RE refuses in a field value.
_CONTROL = bytes(c for c in range(32) if c != 9) + b"\x7f"


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
    field), instead of uvicorn's two patterns per field; ``encode_split``'s
    per-request values, joined to a head already checked, by one ``translate``
    each. Invalid names or values raise RuntimeError, as in uvicorn.

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

    def encode_split(
        self, status: int, default: list[Header], fixed: list[Header], own: list[Header], body: bytes = b"", made: bytes = b""
    ) -> tuple[bytes, int] | None:
        """``encode(status, [*default, *fixed, *own])`` followed by ``made`` and ``body``, with the
        part up to ``own`` made once.

        ``default`` and ``fixed`` must be lists that are not changed once made
        (uvicorn's Date fields, replaced each second; a cache entry's fields,
        replaced when its age changes): they are recognised by identity.
        ``own`` (per-request fields) must have lower-case names and not carry the
        framing fields; else None. ``made`` is field lines the gateway formats
        itself from integers under a fixed lower-case name (``RateLimit``, see
        ``Policy.line``), so not checked again. The body is joined
        here so that the answer is copied once, not once for the head and again
        with the body.
        """
        memo = self._blocks.get(id(fixed))
        if memo is None or memo[0] is not fixed or memo[1] is not default or memo[2] != status:
            lines = self._lines(status, [*default, *fixed])
            if lines is None:
                return None
            if len(self._blocks) >= 64:  # one per cached resource and second: few at a time
                self._blocks.clear()
            memo = self._blocks[id(fixed)] = (fixed, default, status, lines[0], lines[1])
        parts = [memo[3]]
        own_names = self._own_names
        for name, value in own:
            if name not in own_names and not self._own_name(name):
                return None
            # uvicorn's value check (no control character but TAB), as one C call per value.
            if len(value.translate(None, _CONTROL)) != len(value):
                raise RuntimeError("Invalid HTTP header value.")
            parts += (name, b": ", value, b"\r\n")
        parts += (made, b"\r\n", body)
        return b"".join(parts), memo[4]

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
        server_state: Any = None

        async def send(self, message: Any) -> None:
            kind = message["type"]
            if kind == "http.response.body" and self._held is not None:
                await self._send_with_head(message)
                return
            if kind == "http.response.start" and not self.response_started:
                # uvicorn's Date is the one current when the request arrived; a miss that waited
                # seconds for the PVS would then be dated before its own Last-Modified.
                if self.server_state is not None:
                    self.default_headers = self.server_state.default_headers
                if self._hold_head(message):
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
