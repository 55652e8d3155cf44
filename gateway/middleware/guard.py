"""The outer guard: method, size limits, bodies, and security headers on every answer.

Runs before authentication so that a POST gets 405 whatever the credentials,
and oversized or body-carrying requests are refused before any work is done.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import RequestRejected
from gateway.responses import DEFAULT_CSP, SECURITY_FIELDS, http_date, send_problem
from gateway.scopes import request_state
from gateway.settings import ServerSettings

ALLOWED_METHODS = frozenset({"GET", "HEAD"})

_SECURITY_NAMES = frozenset(name for name, _ in (*SECURITY_FIELDS, DEFAULT_CSP, (b"strict-transport-security", b"")))


class GuardMiddleware:
    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.max_url = settings.max_url_length
        self.max_header_count = settings.max_header_count
        self.max_header_bytes = settings.max_header_bytes
        hsts = [(b"strict-transport-security", b"max-age=%d" % settings.hsts_max_age)] if settings.hsts_max_age else []
        # Precomputed once: the headers every answer carries, by scheme, and the same with
        # the default CSP for answers that set none of them (all but the dashboard's pages).
        self.secure_http = list(SECURITY_FIELDS)
        self.secure_https = [*SECURITY_FIELDS, *hsts]
        self.all_http = [DEFAULT_CSP, *self.secure_http]
        self.all_https = [DEFAULT_CSP, *self.secure_https]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return

        state = request_state(scope)
        # Inner layers (rate limits) add answer fields to state.headers instead of wrapping send again.
        extra = state.headers
        https = scope.get("scheme") == "https"
        secure = self.secure_https if https else self.secure_http
        every = self.fields_for(scope)
        request_id = state.request_id.encode()

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                state.status = message["status"]
                # Dated when the answer starts, not when the request arrived (uvicorn's Date): a
                # slow miss would otherwise look older than its own Last-Modified.
                headers = [(b"date", http_date()), *message.get("headers", ())]
                for name, _ in headers:
                    if name in _SECURITY_NAMES:  # the answer set some itself: fill in only the others
                        names = {name for name, _ in headers}
                        if b"content-security-policy" not in names:
                            headers.append(DEFAULT_CSP)
                        headers += [h for h in secure if h[0] not in names]
                        break
                else:
                    headers += every
                headers += extra
                if request_id:
                    headers.append((b"x-request-id", request_id))
                message["headers"] = headers
            await send(message)

        problem = self.check(scope)
        if problem is not None:
            state.detail = problem.detail
            await send_problem(send_secured, problem, head=scope["method"] == "HEAD")
            return
        await self.app(scope, receive, send_secured)

    def fields_for(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The security fields of an answer that sets none itself (every proxied answer)."""
        return self.all_https if scope.get("scheme") == "https" else self.all_http

    def check(self, scope: Scope) -> RequestRejected | None:
        """The request's problem, if it has one; no side effect."""
        if scope["method"] not in ALLOWED_METHODS:
            detail = f"{scope['method'][:16]} is not allowed: this gateway is read-only (GET and HEAD)"
            if scope["path"].endswith("/vars"):
                # pypvs-based clients read with POST /vars; the same reads work as GET.
                detail += "; read variables with GET /vars?name=<var>[,<var>...] or GET /vars?match=<prefix>"
            return RequestRejected(detail, status=405, headers=[("Allow", "GET, HEAD")])
        raw_path = scope.get("raw_path") or scope["path"].encode()
        if len(raw_path) + len(scope.get("query_string", b"")) > self.max_url:
            return RequestRejected(f"URL longer than {self.max_url} bytes", status=414)
        headers = scope["headers"]
        if len(headers) > self.max_header_count:
            return RequestRejected(f"more than {self.max_header_count} header fields", status=431)
        size = 0
        body = False
        for name, value in headers:  # one pass: this runs for every request
            size += len(name) + len(value)
            if name == b"content-length" or name == b"transfer-encoding":
                body = body or name == b"transfer-encoding" or value.strip() not in (b"", b"0")
        if size > self.max_header_bytes:
            return RequestRejected(f"header fields larger than {self.max_header_bytes} bytes", status=431)
        if body:
            # And the connection ends with it: what follows a body nobody reads is not worth framing.
            return RequestRejected("GET and HEAD requests must not carry a body", status=400, headers=[("Connection", "close")])
        return None
