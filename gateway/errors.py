"""Problem responses (RFC 9457) and the gateway's error tree.

Every error a client sees is ``application/problem+json`` with a ``detail``
that says what to do. Upstream failures are mapped to a status and a
``Proxy-Status`` error type (RFC 9209) once, where they are caught.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

PROBLEM_TYPE = "application/problem+json"

# RFC 9209 error types, by the status the gateway answers with.
PROXY_STATUS_NAME = "pvs-gateway"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class GatewayError(Exception):
    """An error that becomes a problem response."""

    status = 500

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        headers: Iterable[tuple[str, str]] = (),
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        self.headers = list(headers)
        self.extra = extra or {}


class RequestRejected(GatewayError):
    """The request itself is not acceptable (allowlist, form, size)."""

    status = 403


class UpstreamError(GatewayError):
    """The PVS did not give a usable answer."""

    status = 502
    proxy_error = "http_protocol_error"

    def __init__(self, detail: str, *, retry_after: float | None = None, received_status: int | None = None, **kw: object) -> None:
        super().__init__(detail, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after
        self.received_status = received_status

    def proxy_status(self) -> str:
        value = f'{PROXY_STATUS_NAME}; error={self.proxy_error}; next-hop="pvs"'
        if self.received_status is not None:
            value += f"; received-status={self.received_status}"
        return value


class UpstreamTimeout(UpstreamError):
    status = 504
    proxy_error = "http_response_timeout"


class UpstreamUnavailable(UpstreamError):
    """Down, refused, rebooting, backing off, or the budget queue is full."""

    status = 503
    proxy_error = "destination_unavailable"


class UpstreamConnectTimeout(UpstreamUnavailable):
    proxy_error = "connection_timeout"


class UpstreamRefused(UpstreamUnavailable):
    proxy_error = "connection_refused"


class UpstreamBadResponse(UpstreamError):
    status = 502
    proxy_error = "http_protocol_error"


class UpstreamTLSError(UpstreamError):
    """The PVS presented a certificate we do not trust (e.g. pin changed)."""

    status = 502
    proxy_error = "tls_certificate_error"


class Overloaded(UpstreamUnavailable):
    """The gateway's own upstream queue is full: shed load rather than pile up."""

    proxy_error = "proxy_internal_response"


def problem_body(status: int, detail: str, extra: dict[str, object] | None = None) -> bytes:
    body: dict[str, object] = {"type": "about:blank", "title": _TITLES.get(status, "Error"), "status": status, "detail": detail}
    if extra:
        body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()
