"""Sending answers from pure ASGI code with as little per-request work as possible."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from email.utils import formatdate

from starlette.types import Send

from gateway.errors import PROBLEM_TYPE, GatewayError, UpstreamError, problem_body

JSON = b"application/json"
Header = tuple[bytes, bytes]

# The security fields of every answer. Gateway answers are JSON for programs; the dashboard
# sets its own, looser CSP.
SECURITY_FIELDS: tuple[Header, ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
DEFAULT_CSP: Header = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")


def http_date() -> bytes:
    """Now as an HTTP date (IMF-fixdate), for the Date field of every answer."""
    return _http_date(int(time.time()))


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> bytes:
    # One formatting a second, as uvicorn does for its own Date: answers in the same second share it.
    return formatdate(second, usegmt=True).encode()


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[Header] = (),
    *,
    content_type: bytes = JSON,
    head: bool = False,
) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]
    await send_prepared(send, status, raw, b"" if head else body)


async def send_prepared(send: Send, status: int, headers: list[Header], body: bytes) -> None:
    """An answer whose fields (Content-Type and Content-Length included) are already made."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def problem_headers(exc: GatewayError) -> list[Header]:
    headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers]
    if isinstance(exc, UpstreamError):
        headers.append((b"proxy-status", exc.proxy_status().encode()))
        if exc.retry_after is not None and exc.status in (503, 504, 429):
            headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    return headers


async def send_problem(send: Send, exc: GatewayError, *, head: bool = False) -> None:
    body = problem_body(exc.status, exc.detail, exc.extra)
    await send_bytes(send, exc.status, body, problem_headers(exc), content_type=PROBLEM_TYPE.encode(), head=head)
