"""One access line per request, and per-identity counts for /stats.

The line carries a request id, the identity (key id and name, never a
secret), the real client IP (after trusted-proxy resolution), status,
duration and cache status. Query strings are logged; credentials never
travel in them (the gateway accepts none there). A field with anything but
printable ASCII (a percent-decoded ``%0a`` in a path, say) is written as a
JSON string, so a client cannot forge or split log lines.

Lines go to ``write_later(format, *fields)`` (the CLI passes
``gateway.logbuffer.LineBuffer.add_later``, which formats them in batches),
else to the ``gateway.access`` logger.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.responses import send_problem
from gateway.scopes import RequestState, request_state

log = logging.getLogger("gateway.access")


class AccessLogMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        style: str,
        per_identity: dict[str, dict[str, int]],
        observe: Callable[[Scope, RequestState, int, float], None] | None = None,
        write_later: Callable[..., None] | None = None,
    ) -> None:
        self.app = app
        # Decided once: the level cannot change while serving.
        self.style = style if log.isEnabledFor(logging.INFO) else "off"
        self.write_later = write_later or _log_now
        self.format = _json_line if style == "json" else _text_line
        self.per_identity = per_identity
        # Request metrics ride on this middleware's timing instead of wrapping every request again.
        self.observe = observe
        # Request ids: a random per-process prefix and a counter, unique without a syscall per request.
        self._id_prefix = secrets.token_hex(3)
        self._id_counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = self.next_request_id()
        state = request_state(scope)
        state.request_id = request_id
        # The guard's send wrapper stamps the request id on the answer and records its status.
        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("internal error on %s", scope.get("path", "?"))
            if state.status is None:
                state.status = 500
                await send_problem(send, GatewayError("internal error; see the gateway's log", status=500))
        finally:
            self.record(scope, state, state.status or 500, time.perf_counter() - start, request_id)

    def next_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):06x}"

    def record(self, scope: Scope, state: RequestState, status: int, duration: float, request_id: str) -> None:
        if self.observe is not None:
            self.observe(scope, state, status, duration)
        principal = state.principal
        identity = principal.id if principal is not None else "-"
        counts = self.per_identity.get(identity)
        if counts is None:
            # Unbounded identities (anonymous IPs) must not grow memory: past 1000, one bucket.
            bucket = identity if len(self.per_identity) < 1000 else "other"
            counts = self.per_identity.setdefault(bucket, {"requests": 0, "errors": 0})
        counts["requests"] += 1
        if status >= 400:
            counts["errors"] += 1
        if self.style == "off":
            return
        # Only the fields are taken now; the line is made later, with the rest of its batch.
        self.write_later(
            self.format,
            request_id,
            scope["client"][0] if scope.get("client") else "-",
            identity,
            principal.name if principal is not None else "-",
            scope["method"],
            scope["path"],  # the full path: it includes root_path (Starlette's convention)
            scope.get("query_string", b""),
            status,
            duration,
            state.cache_status,
            state.detail,
        )


def _log_now(format: Callable[..., str], *fields: object) -> None:
    log.info(format(*fields))


def _target(path: str, query: bytes) -> str:
    return (f"{path}?{query.decode('latin-1')}" if query else path)[:512]


def _text_line(
    request_id: str, client: str, identity: str, name: str, method: str, path: str, query: bytes,
    status: int, duration: float, cache: str, detail: str | None,
) -> str:
    # client is an IP address and method an HTTP token: neither needs quoting.
    line = (
        f"request_id={request_id} client={client} identity={_quote(identity)} name={_quote(name)} "
        f"method={method} target={_quote(_target(path, query))} status={status} "
        f"duration_ms={duration * 1000:.2f} cache={_quote(cache)}"
    )
    return line if detail is None else f"{line} detail={_quote(detail)}"


def _json_line(
    request_id: str, client: str, identity: str, name: str, method: str, path: str, query: bytes,
    status: int, duration: float, cache: str, detail: str | None,
) -> str:
    fields: dict[str, object] = {
        "request_id": request_id,
        "client": client,
        "identity": identity,
        "name": name,
        "method": method,
        "target": _target(path, query),
        "status": status,
        "duration_ms": round(duration * 1000, 2),
        "cache": cache,
    }
    if detail is not None:
        fields["detail"] = detail
    return json.dumps(fields, separators=(",", ":"))


# Quoted forms of the texts seen most (identities, names, targets, cache statuses): a poller
# repeats them on every line. Bounded, since targets come from clients.
_QUOTED: dict[str, str] = {}


def _quote(text: str) -> str:
    """The field as is if it is a plain token, else a JSON string (what a log parser can undo)."""
    quoted = _QUOTED.get(text)
    if quoted is None:
        quoted = _quote_new(text)
        if len(_QUOTED) < 4096:
            _QUOTED[text] = quoted
    return quoted


def _quote_new(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        if text and " " not in text:
            return text
        return f'"{text}"'  # what json.dumps gives for printable ASCII without quotes or backslashes
    return json.dumps(text)
