"""One access line per request, and per-identity counts for /stats.

The line carries a request id, the identity (key id and name, never a
secret), the real client IP (after trusted-proxy resolution), status,
duration and cache status. Query strings are logged; credentials never
travel in them (the gateway accepts none there). A field with anything but
printable ASCII (a percent-decoded ``%0a`` in a path, say) is written as a
JSON string, so a client cannot forge or split log lines.

Lines go to ``write`` (the CLI passes a ``gateway.logbuffer.LineBuffer``),
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

from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.responses import send_problem

log = logging.getLogger("gateway.access")


class AccessLogMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        style: str,
        per_identity: dict[str, dict[str, int]],
        observe: Callable[[Scope, dict, int, float], None] | None = None,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        # Decided once: the level cannot change while serving.
        self.style = style if log.isEnabledFor(logging.INFO) else "off"
        self.write = write or log.info
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
        request_id = f"{self._id_prefix}{next(self._id_counter):06x}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # The guard's send wrapper (the only one on the hot path) stamps the request id
        # on the answer and records its status here; no second wrapper is needed.
        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("internal error on %s", scope.get("path", "?"))
            if "gateway.status" not in state:
                state["gateway.status"] = 500
                await send_problem(send, GatewayError("internal error; see the gateway's log", status=500))
        finally:
            self._record(scope, state, state.get("gateway.status", 500), time.perf_counter() - start, request_id)

    def _record(self, scope: Scope, state: dict, status: int, duration: float, request_id: str) -> None:
        if self.observe is not None:
            self.observe(scope, state, status, duration)
        principal: Principal | None = state.get("principal")
        identity = principal.id if principal is not None else "-"
        counts = self.per_identity.get(identity)
        if counts is None:
            if len(self.per_identity) >= 1000:
                identity = "other"  # unbounded identities (anonymous IPs) must not grow memory
            counts = self.per_identity.setdefault(identity, {"requests": 0, "errors": 0})
        counts["requests"] += 1
        if status >= 400:
            counts["errors"] += 1
        if self.style == "off":
            return
        client = scope["client"][0] if scope.get("client") else "-"  # an IP address: needs no quoting
        path = scope["path"]  # the full path: it includes root_path (Starlette's convention)
        query = scope.get("query_string", b"")
        target = f"{path}?{query.decode('latin-1')}" if query else path
        name = principal.name if principal is not None else "-"
        cache = state.get("gateway.cache", "-")
        detail = state.get("gateway.detail")
        if self.style == "json":
            fields = {
                "request_id": request_id,
                "client": client,
                "identity": identity,
                "name": name,
                "method": scope["method"],
                "target": target[:512],
                "status": status,
                "duration_ms": round(duration * 1000, 2),
                "cache": cache,
            }
            if detail is not None:
                fields["detail"] = detail
            self.write(json.dumps(fields, separators=(",", ":")))
            return
        line = (
            f"request_id={request_id} client={client} identity={_quote(identity)} name={_quote(name)} "
            f"method={scope['method']} target={_quote(target[:512])} status={status} "
            f"duration_ms={duration * 1000:.2f} cache={_quote(cache)}"
        )
        if detail is not None:
            line += f" detail={_quote(detail)}"
        self.write(line)


def _quote(text: str) -> str:
    """The field as is if it is a plain token, else a JSON string (what a log parser can undo)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        if text and " " not in text:
            return text
        return f'"{text}"'  # what json.dumps gives for printable ASCII without quotes or backslashes
    return json.dumps(text)
