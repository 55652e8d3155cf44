"""Per-caller and per-IP rate limits, with the IETF RateLimit fields.

Counting is done by the ``limits`` library (memory, or Redis so several
gateway replicas share one budget). Each policy is announced with
``RateLimit-Policy: "caller";q=60;w=60`` and the remaining quota with
``RateLimit: "caller";r=59;t=30`` (draft-ietf-httpapi-ratelimit-headers-11);
a 429 adds ``Retry-After`` and a problem body naming the violated policy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import limits
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.responses import send_problem
from gateway.scopes import route_path
from gateway.settings import RateLimitSettings

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
NEVER_LIMITED = frozenset({"/healthz", "/readyz"})


def _item(value: str | None) -> limits.RateLimitItem | None:
    if not value or value in ("0", "off"):
        return None
    return limits.parse(value)


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    policy: str
    quota: int
    window: int
    remaining: int
    reset_in: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"ratelimit-policy", b'"%s";q=%d;w=%d' % (self.policy.encode(), self.quota, self.window)),
            (b"ratelimit", b'"%s";r=%d;t=%d' % (self.policy.encode(), self.remaining, self.reset_in)),
        ]

    def problem(self) -> GatewayError:
        return GatewayError(
            f"rate limit {self.policy!r} exceeded ({self.quota} requests per {self.window} s); "
            f"retry in {self.reset_in} s",
            status=429,
            headers=[("Retry-After", str(self.reset_in))],
            extra={"type": QUOTA_EXCEEDED, "violated-policies": [self.policy]},
        )


class RateLimiter:
    def __init__(self, settings: RateLimitSettings) -> None:
        uri = _async_uri(settings.storage)
        # limits defaults to coredis for async Redis; redis-py (the [redis] extra) is the better-kept client.
        options = {"implementation": "redispy"} if "redis" in uri else {}
        storage = storage_from_string(uri, **options)
        self._window = SlidingWindowCounterRateLimiter(storage)  # cheap: two counters per key
        self._moving = MovingWindowRateLimiter(storage)  # exact, for the rare failed logins
        self.per_caller = _item(settings.per_caller)
        self.per_ip = _item(settings.per_ip)
        self.auth_failures = _item(settings.auth_failures)
        self.roles = {role: _item(rate) for role, rate in settings.roles.items()}
        self._overrides: dict[str, limits.RateLimitItem | None] = {}
        self.rejections: dict[str, int] = {}

    def item_for(self, principal: Principal) -> limits.RateLimitItem | None:
        if principal.rate_limit:
            item = self._overrides.get(principal.rate_limit)
            if item is None and principal.rate_limit not in self._overrides:
                item = self._overrides[principal.rate_limit] = _item(principal.rate_limit)
            return item
        if principal.role in self.roles:
            return self.roles[principal.role]
        return self.per_caller

    async def check(self, policy: str, item: limits.RateLimitItem, key: str) -> Verdict:
        allowed = await self._window.hit(item, policy, key)
        stats = await self._window.get_window_stats(item, policy, key)
        window = item.get_expiry()
        reset_in = max(1, min(window, math.ceil(stats.reset_time - time.time())))
        if not allowed:
            self.rejections[policy] = self.rejections.get(policy, 0) + 1
        return Verdict(allowed, policy, item.amount, window, max(0, stats.remaining), reset_in)

    # ------------------------------------------------ failed credentials (brute force)

    async def auth_failure(self, ip: str) -> bool:
        """Count a failed credential; False once the IP is over the limit."""
        if self.auth_failures is None:
            return True
        return await self._moving.hit(self.auth_failures, "auth_failures", ip)

    async def auth_blocked_for(self, ip: str) -> float:
        if self.auth_failures is None:
            return 0.0
        if await self._moving.test(self.auth_failures, "auth_failures", ip):
            return 0.0
        stats = await self._moving.get_window_stats(self.auth_failures, "auth_failures", ip)
        self.rejections["auth_failures"] = self.rejections.get("auth_failures", 0) + 1
        return max(1.0, stats.reset_time - time.time())

    async def check_ip(self, scope: Scope) -> Verdict | None:
        """The per-IP policy for requests without an identity."""
        if self.per_ip is None:
            return None
        ip = scope["client"][0] if scope.get("client") else "unknown"
        return await self.check("ip", self.per_ip, ip)


class RateLimitMiddleware:
    """Limits identified callers by identity, the rest by client IP."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in NEVER_LIMITED:
            await self.app(scope, receive, send)
            return
        principal: Principal | None = scope.get("state", {}).get("principal")
        if principal is None or principal.method == "anonymous":
            verdict = await self.limiter.check_ip(scope)
        else:
            item = self.limiter.item_for(principal)
            verdict = await self.limiter.check("caller", item, principal.id) if item is not None else None
        if verdict is None:
            await self.app(scope, receive, send)
            return
        if not verdict.allowed:
            problem = verdict.problem()
            problem.headers += [(k.decode(), v.decode()) for k, v in verdict.headers()]
            scope.setdefault("state", {})["gateway.detail"] = problem.detail
            await send_problem(send, problem, head=scope["method"] == "HEAD")
            return
        scope.setdefault("state", {}).setdefault("gateway.headers", []).extend(verdict.headers())
        await self.app(scope, receive, send)
