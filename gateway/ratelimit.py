"""Per-caller and per-IP rate limits, with the IETF RateLimit fields.

Counting uses the sliding-window-counter algorithm of the ``limits`` library:
in this process by default (``LocalWindows``, the same algorithm without an
await), or through ``limits`` with Redis so several gateway replicas share
one budget; failed credentials always go through ``limits``' moving window.
Each policy is announced with
``RateLimit-Policy: "caller";q=60;w=60`` and the remaining quota with
``RateLimit: "caller";r=59;t=30`` (draft-ietf-httpapi-ratelimit-headers-11);
a 429 adds ``Retry-After`` and a problem body naming the violated policy.
"""

from __future__ import annotations

import collections
import itertools
import math
import time
from collections.abc import Callable, Hashable, Iterator
from operator import length_hint
from typing import Any

import limits
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.responses import Header, send_problem
from gateway.scopes import client_ip, route_path
from gateway.settings import RateLimitSettings

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
NEVER_LIMITED = frozenset({"/healthz", "/readyz"})
EXACT_BELOW = 1000  # RateLimit's r is exact below this; above, three significant digits
_NO_TOKENS: Iterator[Any] = iter(())


def shown_remaining(remaining: int) -> int:
    """``r`` as the RateLimit field states it: exact below 1000, else rounded down to three
    significant digits (99,940,521 -> 99,900,000).

    The draft lets a server state less quota than there is (sections 4.1.2, 8.3). Near
    exhaustion, where a client acts on ``r``, it is exact; far from it, the last digits tell
    a client nothing, and stating them changed the field on every answer, so the hot path
    formatted a line per request: most of what checking a limit cost a cache hit
    (bench/limitcost.py). Rounded, a busy caller's line changes every 0.1-1% of its quota
    or when ``t`` ticks, and is sent from tokens in between (``HeldCounter.remake``).
    """
    if remaining < EXACT_BELOW:
        return remaining
    step = 10 ** (len(str(remaining)) - 3)
    return remaining - remaining % step


def _item(value: str | None) -> limits.RateLimitItem | None:
    if not value or value in ("0", "off"):
        return None
    return limits.parse(value)


def _policy(name: str, value: str | None) -> Policy | None:
    item = _item(value)
    return Policy(name, item) if item is not None else None


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


class Policy:
    """One configured limit ("caller", "ip", a role's or a key's own), its header fields made once."""

    __slots__ = ("_line", "_value", "item", "name", "policy_field", "quota", "window")

    def __init__(self, name: str, item: limits.RateLimitItem) -> None:
        self.item = item
        self.name = name
        self.quota = item.amount
        self.window = item.get_expiry()
        tag = name.encode()
        self.policy_field = (b"ratelimit-policy", b'"%s";q=%d;w=%d' % (tag, self.quota, self.window))
        # The RateLimit value, to be formatted with (r, t); and the same as a line of a head:
        # the name is one of ours, the rest two integers, so the line needs no check.
        self._value = b'"%s";r=%%d;t=%%d' % tag
        self._line = b"ratelimit: " + self._value + b"\r\n"

    def fields(self, remaining: int, reset_in: int) -> list[tuple[bytes, bytes]]:
        return [self.policy_field, (b"ratelimit", self._value % (shown_remaining(remaining), reset_in))]

    def line(self, remaining: int, reset_in: int) -> bytes:
        """The RateLimit field of ``fields`` as a line of a response head."""
        return self._line % (shown_remaining(remaining), reset_in)


class Verdict:
    __slots__ = ("allowed", "policy", "remaining", "reset_in")

    def __init__(self, allowed: bool, policy: Policy, remaining: int, reset_in: int) -> None:
        self.allowed = allowed
        self.policy = policy
        self.remaining = remaining
        self.reset_in = reset_in

    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.policy.fields(self.remaining, self.reset_in)

    def problem(self) -> GatewayError:
        p = self.policy
        return GatewayError(
            f"rate limit {p.name!r} exceeded ({p.quota} requests per {p.window} s); retry in {self.reset_in} s",
            status=429,
            headers=[("Retry-After", str(self.reset_in))] + [(k.decode(), v.decode()) for k, v in self.headers()],
            extra={"type": QUOTA_EXCEEDED, "violated-policies": [p.name]},
        )


class LocalWindows:
    """The sliding-window-counter algorithm of ``limits``, kept in this process.

    With the default in-memory storage this is the whole cost of a check: a
    dict lookup and some arithmetic, no await. Through ``limits``' async memory
    storage a check took two awaited calls and a lock, ~13% of a cache hit's
    time in the bench profile. Redis storage (shared by replicas) still goes
    through ``limits``, whose algorithm this mirrors: the previous fixed
    window's count, weighted by how much of it still overlaps, plus the
    current window's count.

    Credit: as time passes within a window the weighted count only falls (the
    previous window weighs less), so the room found by one full computation is
    a lower bound for the rest of that window. Until the RateLimit ``t`` would
    tick down (at most a second), that many requests are admitted by
    decrementing it, without redoing the arithmetic; the ``r`` they report is
    at most a second's decay below the exact value, and their ``t`` is exact.
    Never more requests than the exact algorithm allows. Requests admitted on
    credit are added to the window's count when credit is next granted (the
    count is read only then). ``take`` spends credit on a counter the caller
    holds (the hot path keeps one per connection), without looking it up again.

    Tokens: a holder may set part of the credit aside as tokens (``set_aside``),
    one per request, each an object of its choosing (the hot path's: the fields
    that state the quota left). Tokens are spent before the rest of the credit,
    by ``take`` or by the holder itself with ``next(counter[8], None)``: one C
    call where counting in Python took three operations.
    """

    # A counter: [0 current window start, 1 count settled, 2 previous window's count,
    # 3 window, 4 credit valid until, 5 credit left outside the tokens (int), 6 the t of the
    # credit (int), 7 credit granted (int), 8 tokens (an iterator)]. A grant empties the tokens.

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # policy -> key -> counter. Per policy (a Policy object in the gateway), so the
        # per-request lookup is by the key string alone.
        self._tables: dict[Hashable, dict[str, list[Any]]] = {}
        self._next_prune = 0.0

    def hit(self, policy: Hashable, key: str, amount: int, window: int) -> tuple[bool, int, int]:
        """Count one request; return (allowed, remaining, seconds until it would be allowed/reset)."""
        table = self._tables.get(policy)
        if table is None:
            table = self._tables[policy] = {}
        now = self._clock()
        c = table.get(key)
        if c is not None:
            remaining = self.take(c, now)
            if remaining is not None:
                return True, remaining, c[6]
            c[1] += c[7] - self.left(c)  # settle what the credit admitted
            c[5] = c[7] = 0
            c[8] = _NO_TOKENS
        start = now - now % window
        if c is None or c[0] != start:
            previous = c[1] if c is not None and c[0] == start - window else 0
            c = table[key] = [start, 0, previous, window, 0.0, 0, window, 0, _NO_TOKENS]
        elapsed = now - start
        weighted = c[2] * (window - elapsed) / window + c[1]
        if now >= self._next_prune:
            self._prune(now)
        if weighted + 1 <= amount:
            c[1] += 1
            remaining = int(amount - weighted - 1)
            reset_in = math.ceil(window - elapsed)  # 0 <= elapsed < window: 1..window seconds
            # Credit until t ticks down, so every request it admits states this t; the credit
            # never crosses into the next window (reset_in >= 1).
            c[4] = start + window - (reset_in - 1)
            c[5] = c[7] = remaining
            c[6] = reset_in
            return True, remaining, reset_in
        wait = self._wait(c, amount, window, elapsed)
        return False, max(0, int(amount - weighted)), max(1, min(2 * window, math.ceil(wait)))

    def counter(self, policy: Hashable, key: str) -> list[Any] | None:
        """The counter of ``key`` under ``policy``, for ``take``; None before its first hit."""
        table = self._tables.get(policy)
        return table.get(key) if table is not None else None

    @staticmethod
    def take(c: list[Any], now: float) -> int | None:
        """Count one request at ``now`` (the counters' clock) against the credit of counter ``c``:
        the remaining quota, with ``c[6]`` the seconds until the window resets; None when the
        credit is used up or has expired (then ``hit`` decides).

        A caller may hold on to ``c`` (the hot path keeps it per connection): once its
        window is over, the table has a new list and ``c``'s credit has expired with it.
        """
        if now < c[4]:
            if next(c[8], None) is not None:
                return c[5] + length_hint(c[8])
            if c[5] >= 1:
                c[5] -= 1
                return c[5]  # type: ignore[no-any-return]
        return None

    @staticmethod
    def left(c: list[Any]) -> int:
        """The credit counter ``c`` has left, tokens included."""
        return c[5] + length_hint(c[8])  # type: ignore[no-any-return]

    @staticmethod
    def set_aside(c: list[Any], units: int, token: object) -> None:
        """Turn ``units`` of ``c``'s credit (0 <= units <= credit left) into tokens ``token``."""
        c[5] = LocalWindows.left(c) - units
        c[8] = itertools.repeat(token, units)

    @staticmethod
    def _wait(c: list[Any], amount: int, window: int, elapsed: float) -> float:
        """Seconds until one more request fits, as the weighted count decays."""
        previous, current = c[2], c[1]
        if current + 1 <= amount:  # this window has room once the previous one's weight drops
            return (window - (amount - 1 - current) * window / previous) - elapsed if previous else 0.0
        # This window is full: in the next one its count is the "previous" and decays from there.
        return (window - elapsed) + window * (1 - (amount - 1) / current)

    def _prune(self, now: float) -> None:
        # Counters older than two windows weigh nothing: drop them, so per-IP keys cannot grow memory.
        self._next_prune = now + 30
        for table in self._tables.values():
            stale = [key for key, c in table.items() if c[0] + 2 * c[3] <= now]
            for key in stale:
                del table[key]


class RateLimiter:
    def __init__(self, settings: RateLimitSettings) -> None:
        self.local = LocalWindows() if settings.storage.startswith("memory://") else None
        # Failed credentials seen by this process, by IP: the times of the last few. With local
        # storage, an IP with fewer failures in the window than the limit cannot be blocked,
        # so the per-request gate check needs no call into limits (see may_be_blocked).
        self._failures: dict[str, collections.deque[float]] = {}
        uri = _async_uri(settings.storage)
        # limits defaults to coredis for async Redis; redis-py (the [redis] extra) is the better-kept client.
        options = {"implementation": "redispy"} if "redis" in uri else {}
        storage = storage_from_string(uri, **options)
        self._window = SlidingWindowCounterRateLimiter(storage)  # cheap: two counters per key
        self._moving = MovingWindowRateLimiter(storage)  # exact, for the rare failed logins
        self.per_caller = _policy("caller", settings.per_caller)
        self.per_ip = _policy("ip", settings.per_ip)
        self.auth_failures = _item(settings.auth_failures)
        # Failures remembered per IP: enough to tell "under the limit" exactly for limits up
        # to 16 (the default is 10); above that, 16 recent failures already count as "maybe".
        self._tracked = min(self.auth_failures.amount, 16) if self.auth_failures is not None else 0
        self._failures_elsewhere = self.auth_failures is not None and self.local is None
        self.roles = {role: _policy("caller", rate) for role, rate in settings.roles.items()}
        self._overrides: dict[str, Policy | None] = {}
        self.rejections: dict[str, int] = {}

    def policy_for(self, principal: Principal) -> Policy | None:
        if principal.rate_limit:
            policy = self._overrides.get(principal.rate_limit)
            if policy is None and principal.rate_limit not in self._overrides:
                policy = self._overrides[principal.rate_limit] = _policy("caller", principal.rate_limit)
            return policy
        if principal.role in self.roles:
            return self.roles[principal.role]
        return self.per_caller

    def check_now(self, policy: Policy, key: str) -> Verdict | None:
        """The check without an await, when counters are in this process; None when they are not."""
        if self.local is None:
            return None
        allowed, remaining, reset_in = self.local.hit(policy, key, policy.quota, policy.window)
        return Verdict(True, policy, remaining, reset_in) if allowed else self.refused(policy, remaining, reset_in)

    def refused(self, policy: Policy, remaining: int, reset_in: int) -> Verdict:
        self.rejections[policy.name] = self.rejections.get(policy.name, 0) + 1
        return Verdict(False, policy, remaining, reset_in)

    async def check(self, policy: Policy, key: str) -> Verdict:
        verdict = self.check_now(policy, key)
        if verdict is not None:
            return verdict
        item = policy.item
        allowed = await self._window.hit(item, policy.name, key)
        stats = await self._window.get_window_stats(item, policy.name, key)
        reset_in = max(1, min(policy.window, math.ceil(stats.reset_time - time.time())))
        remaining = max(0, stats.remaining)
        return Verdict(True, policy, remaining, reset_in) if allowed else self.refused(policy, remaining, reset_in)

    # ------------------------------------------------ failed credentials (brute force)

    async def auth_failure(self, ip: str) -> bool:
        """Count a failed credential; False once the IP is over the limit."""
        if self.auth_failures is None:
            return True
        now = time.monotonic()
        if len(self._failures) > 10000:
            horizon = now - self.auth_failures.get_expiry() - 1.0
            self._failures = {k: v for k, v in self._failures.items() if v[-1] > horizon}
        stamps = self._failures.get(ip)
        if stamps is None:
            stamps = self._failures[ip] = collections.deque(maxlen=self._tracked)
        stamps.append(now)
        return await self._moving.hit(self.auth_failures, "auth_failures", ip)

    def may_be_blocked(self, ip: str) -> bool:
        """False when ``ip`` certainly is not blocked; decided without an await, for every request."""
        stamps = self._failures.get(ip)  # only failures counted under a limit are recorded
        if stamps is None:
            # None from ip here: with local storage, then, none at all; with Redis another replica may have some.
            return self._failures_elsewhere
        if self.local is not None and self.auth_failures is not None:
            # Blocked means as many failures in the moving window as the limit allows. Fewer of
            # the last few within it (plus a second: limits keeps its own clock), and it is not.
            horizon = time.monotonic() - self.auth_failures.get_expiry() - 1.0
            return sum(1 for t in stamps if t > horizon) >= self._tracked
        return True

    async def auth_blocked_for(self, ip: str) -> float:
        if not self.may_be_blocked(ip):
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
        return await self.check(self.per_ip, client_ip(scope))


class RateLimitMiddleware:
    """Limits identified callers by identity, the rest by client IP."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    def _policy(self, scope: Scope, principal: Principal | None) -> tuple[Policy | None, str]:
        if principal is None or principal.method == "anonymous":
            return self.limiter.per_ip, client_ip(scope)
        return self.limiter.policy_for(principal), principal.id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in NEVER_LIMITED:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        policy, key = self._policy(scope, state.get("principal"))
        if policy is None:
            await self.app(scope, receive, send)
            return
        local = self.limiter.local
        if local is not None:  # in-process counters: no await, and no Verdict unless refused
            allowed, remaining, reset_in = local.hit(policy, key, policy.quota, policy.window)
            if allowed:
                state.setdefault("gateway.headers", []).extend(policy.fields(remaining, reset_in))
                await self.app(scope, receive, send)
                return
            verdict = self.limiter.refused(policy, remaining, reset_in)
        else:
            verdict = await self.limiter.check(policy, key)
            if verdict.allowed:
                state.setdefault("gateway.headers", []).extend(verdict.headers())
                await self.app(scope, receive, send)
                return
        problem = verdict.problem()
        state["gateway.detail"] = problem.detail
        await send_problem(send, problem, head=scope["method"] == "HEAD")

    def admit_now(self, scope: Scope, principal: Principal, path: str, now: float) -> tuple[Header, bytes] | tuple[()] | None:
        """Count the request and return its fields, when it is admitted without an await.

        For the hot path, given the request's ``route_path`` and the time it began
        (``time.monotonic()``, the counters' clock): ``RateLimit-Policy`` (the same
        object for every request of the policy) and the ``RateLimit`` line; ``()``
        when no limit applies. None when counters are not in this process or the
        request is refused; a refused request is not counted (the algorithm counts
        only what it admits), so ``__call__`` then decides it afresh.

        A connection holds the counter of the identity it last admitted
        (``scope["gateway.connection"]``, a ``HeldCounter``): while the auth layer
        hands over the very same principal (a repeated request, see
        ``gateway.httpproto``), its next requests spend that counter's credit
        without choosing the policy again: first the tokens ``HeldCounter.remake``
        set aside, each the fields ``Policy.line`` makes for the quota it leaves.
        """
        if path in NEVER_LIMITED:
            return ()
        connection = scope.get("gateway.connection")
        held = connection.get("ratelimit") if connection is not None else None
        if held is not None and held.principal is principal:
            c = held.counter
            if c is None:  # no limit for this principal
                return ()
            # LocalWindows.take, for a token set aside by remake: the fields that state this request's r.
            if now < c[4]:
                fields = next(c[8], None)
                if fields is not None:
                    return fields  # type: ignore[no-any-return]
            remaining = LocalWindows.take(c, now)
            if remaining is not None:
                return held.remake(remaining)
        local = self.limiter.local
        policy, key = self._policy(scope, principal)
        # Per-IP keys vary behind a proxy: anonymous callers are never held.
        holds = connection is not None and principal.method != "anonymous"
        if policy is None:
            if holds:
                connection["ratelimit"] = HeldCounter(principal, None, None)  # type: ignore[index]
            return ()
        if local is None:
            return None
        allowed, remaining, reset_in = local.hit(policy, key, policy.quota, policy.window)
        if not allowed:
            return None
        if not holds:
            return policy.policy_field, policy.line(remaining, reset_in)
        held = connection["ratelimit"] = HeldCounter(principal, policy, local.counter(policy, key))  # type: ignore[index]
        return held.remake(remaining)


class HeldCounter:
    """A connection's hold on its caller's counter in ``LocalWindows``; with no policy and no
    counter, that no limit applies to the caller."""

    __slots__ = ("counter", "policy", "principal")

    def __init__(self, principal: Principal, policy: Policy | None, counter: list[Any] | None) -> None:
        self.principal = principal
        self.policy = policy
        self.counter = counter

    def remake(self, remaining: int) -> tuple[Header, bytes]:
        """``admit_now``'s fields for ``remaining`` (just spent from the counter's credit); the
        credit down to the least quota they state alike (see shown_remaining) is set aside as
        tokens of them, for the next requests of this caller on any connection."""
        c, policy = self.counter, self.policy
        assert c is not None and policy is not None
        fields = (policy.policy_field, policy.line(remaining, c[6]))
        LocalWindows.set_aside(c, remaining - shown_remaining(remaining), fields)
        return fields
