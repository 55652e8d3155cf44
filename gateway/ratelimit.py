"""Per-caller and per-IP rate limits, with the IETF RateLimit fields, counted by ``limits``.

Requests are counted in fixed windows by ``limits``' storage: one increment
per request gives the count, hence both the verdict and the remaining quota,
and the key's expiry is the window's reset, so the RateLimit fields are
exact. (``limits``' strategies read the counter a second time for the
remaining quota, which doubled the cost of a check.) A window starts with
its key's first request, so a caller may spend up to twice its quota across
one reset; the PVS is protected by the upstream budget, not by these.
Failed credentials are counted with ``limits``' moving window (exact, for
the rare failed logins). With
``cluster.redis_url`` the counters live in Redis, shared by every gateway;
while Redis is unreachable each gateway counts in its own memory
(``gateway.shared``) and goes back to Redis when it returns.

Each policy is announced with ``RateLimit-Policy: "caller";q=60;w=60`` and the
remaining quota with ``RateLimit: "caller";r=59;t=30``
(draft-ietf-httpapi-ratelimit-headers); a 429 adds ``Retry-After`` and a
problem body naming the violated policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import limits
import limits.aio.strategies
import limits.strategies
from limits.storage import MemoryStorage, storage_from_string
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.responses import Header, send_problem
from gateway.routetable import RouteTable
from gateway.scopes import client_ip, request_state, route_path
from gateway.settings import RateLimitSettings
from gateway.shared import Shared

T = TypeVar("T")

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"


def _item(value: str | None) -> limits.RateLimitItem | None:
    if not value or value in ("0", "off"):
        return None
    return limits.parse(value)


def _policy(name: str, value: str | None) -> Policy | None:
    item = _item(value)
    return Policy(name, item) if item is not None else None


@dataclass(frozen=True)
class Policy:
    """One configured limit: "caller" (a role's or a key's own) or "ip"."""

    name: str
    item: limits.RateLimitItem

    @property
    def quota(self) -> int:
        return self.item.amount

    @property
    def window(self) -> int:
        return self.item.get_expiry()

    def fields(self, remaining: int, reset_in: int) -> list[Header]:
        return [
            (b"ratelimit-policy", b'"%s";q=%d;w=%d' % (self.name.encode(), self.quota, self.window)),
            (b"ratelimit", b'"%s";r=%d;t=%d' % (self.name.encode(), remaining, reset_in)),
        ]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    policy: Policy
    remaining: int
    reset_in: int

    def headers(self) -> list[Header]:
        return self.policy.fields(self.remaining, self.reset_in)

    def problem(self) -> GatewayError:
        p = self.policy
        return GatewayError(
            f"rate limit {p.name!r} exceeded ({p.quota} requests per {p.window} s); retry in {self.reset_in} s",
            status=429,
            headers=[("Retry-After", str(self.reset_in))] + [(k.decode(), v.decode()) for k, v in self.headers()],
            extra={"type": QUOTA_EXCEEDED, "violated-policies": [p.name]},
        )


class _Counters:
    """The counters over Redis (``limits``' asyncio API), reached through ``Shared``, which
    answers None while Redis is unreachable."""

    def __init__(self, shared: Shared) -> None:
        url = shared.url
        uri = f"async+{url}" if not url.startswith("async+") else url
        # limits defaults to coredis for async Redis; redis-py (the [redis] extra) is the better-kept client.
        storage = storage_from_string(uri, implementation="redispy", socket_timeout=0.5, socket_connect_timeout=0.5)
        assert isinstance(storage, limits.aio.storage.Storage)
        self.shared = shared
        self.storage = storage
        self.moving = limits.aio.strategies.MovingWindowRateLimiter(storage)

    async def run(self, op: Callable[[], Awaitable[T]]) -> T | None:
        return await self.shared.run(lambda _redis: op())


class _LocalCounters:
    """The same counters in this process's memory, through ``limits``' synchronous API: the
    same counting, without awaits per request."""

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        self.moving = limits.strategies.MovingWindowRateLimiter(self.storage)


class RateLimiter:
    def __init__(
        self,
        settings: RateLimitSettings,
        shared: Shared | None = None,
    ) -> None:
        self._local = _LocalCounters()
        self._remote = _Counters(shared) if shared is not None and shared.configured else None
        self.per_caller = _policy("caller", settings.per_caller)
        self.per_ip = _policy("ip", settings.per_ip)
        self.auth_failures = _item(settings.auth_failures)
        self.roles = {role: _policy("caller", rate) for role, rate in settings.roles.items()}
        self._overrides: dict[str, Policy | None] = {}
        self.rejections: dict[str, int] = {}

    def policy_for(self, principal: Principal) -> Policy | None:
        if principal.rate_limit:
            if principal.rate_limit not in self._overrides:
                self._overrides[principal.rate_limit] = _policy("caller", principal.rate_limit)
            return self._overrides[principal.rate_limit]
        if principal.role in self.roles:
            return self.roles[principal.role]
        return self.per_caller

    async def check(self, policy: Policy, key: str) -> Verdict:
        """Count one request of ``key`` under ``policy``."""
        counter = policy.item.key_for(policy.name, key)
        if self._remote is not None:
            storage = self._remote.storage
            verdict = await self._remote.run(lambda: self._remote_hit(storage, policy, counter))
            if verdict is not None:
                return verdict
        local = self._local.storage
        return self._verdict(policy, local.incr(counter, policy.window), local.get_expiry(counter))

    async def _remote_hit(self, storage: limits.aio.storage.Storage, policy: Policy, counter: str) -> Verdict:
        count = await storage.incr(counter, policy.window)
        return self._verdict(policy, count, await storage.get_expiry(counter))

    def _verdict(self, policy: Policy, count: int, reset_at: float) -> Verdict:
        """``count``: requests in the window, this one included; ``reset_at``: when it ends (epoch s)."""
        reset_in = max(1, min(policy.window, math.ceil(reset_at - time.time())))
        remaining = max(0, policy.quota - count)
        if count <= policy.quota:
            return Verdict(True, policy, remaining, reset_in)
        self.rejections[policy.name] = self.rejections.get(policy.name, 0) + 1
        return Verdict(False, policy, remaining, reset_in)

    # ------------------------------------------------ failed credentials (brute force)

    async def auth_failure(self, ip: str) -> bool:
        """Count a failed credential; False once the IP is over the limit."""
        item = self.auth_failures
        if item is None:
            return True
        if self._remote is not None:
            remote = self._remote
            allowed = await remote.run(lambda: remote.moving.hit(item, "auth_failures", ip))
            if allowed is not None:
                return allowed
        return self._local.moving.hit(item, "auth_failures", ip)

    async def auth_blocked_for(self, ip: str) -> float:
        """Seconds until ``ip`` may fail again without a 429; 0 when it is not blocked."""
        item = self.auth_failures
        if item is None:
            return 0.0
        if self._remote is not None:
            remote = self._remote
            wait = await remote.run(lambda: self._remote_blocked_for(remote, item, ip))
            if wait is not None:
                return wait
        local = self._local.moving
        if local.test(item, "auth_failures", ip):
            return 0.0
        return self._blocked(local.get_window_stats(item, "auth_failures", ip))

    async def _remote_blocked_for(self, counters: _Counters, item: limits.RateLimitItem, ip: str) -> float:
        if await counters.moving.test(item, "auth_failures", ip):
            return 0.0
        return self._blocked(await counters.moving.get_window_stats(item, "auth_failures", ip))

    def _blocked(self, stats: limits.WindowStats) -> float:
        self.rejections["auth_failures"] = self.rejections.get("auth_failures", 0) + 1
        return max(1.0, stats.reset_time - time.time())

    async def check_ip(self, scope: Scope) -> Verdict | None:
        """The per-IP policy for requests without an identity."""
        if self.per_ip is None:
            return None
        return await self.check(self.per_ip, client_ip(scope))


class RateLimitMiddleware:
    """Limits identified callers by identity, the rest by client IP."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, routes: RouteTable) -> None:
        self.app = app
        self.limiter = limiter
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.routes.policy(route_path(scope)).limited:
            await self.app(scope, receive, send)
            return
        state = request_state(scope)
        principal = state.principal
        if principal is None or principal.method == "anonymous":
            policy, key = self.limiter.per_ip, client_ip(scope)
        else:
            policy, key = self.limiter.policy_for(principal), principal.id
        if policy is None:
            await self.app(scope, receive, send)
            return
        verdict = await self.limiter.check(policy, key)
        if verdict.allowed:
            state.headers.extend(verdict.headers())
            await self.app(scope, receive, send)
            return
        problem = verdict.problem()
        state.detail = problem.detail
        await send_problem(send, problem, head=scope["method"] == "HEAD")
