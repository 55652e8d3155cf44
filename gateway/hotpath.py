"""Fresh cache hits answered in the connection protocol, without an ASGI task.

A poller's request for a fresh cached answer needs no I/O and no await: a
key looked up, a counter bumped, a stored body sent. Through ASGI it still
costs a task, a coroutine per layer and a send wrapper per layer, most of
its time in ``bench/``. ``gateway.httpproto`` therefore offers each request
to ``HotPath.answer`` first, in the same event-loop turn that parsed it.

The hot path makes no decision of its own. It asks the ASGI layers'
synchronous halves, in the layers' order: the forwarded-header layer
whether it would rewrite the request, the guard for its problem, the proxy
for a fresh hit, the auth layer for the principal it would pass inward, the
rate-limit layer to count the request. Anything those cannot settle without
an await, and every refusal, is declined *before any side effect*, and the
request goes through ASGI exactly as if the hot path did not exist.
``tests/test_hotpath.py`` sends the same requests to a gateway with and
without it and requires the same answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import Scope

from gateway.auth.middleware import AuthMiddleware
from gateway.middleware.accesslog import AccessLogMiddleware
from gateway.middleware.forwarded import ForwardedMiddleware
from gateway.middleware.guard import GuardMiddleware
from gateway.proxy import Proxy, is_proxied
from gateway.ratelimit import RateLimitMiddleware
from gateway.responses import Header
from gateway.scopes import route_path

# status, fields that stay the same across requests (the same list object while they do),
# the request's own fields, its RateLimit line (Policy.line, or b""), body (empty
# for HEAD). The protocol adds its default fields (Date).
Respond = Callable[[int, list[Header], list[Header], bytes, bytes], None]


class HotPath:
    def __init__(
        self,
        *,
        access: AccessLogMiddleware,
        forwarded: ForwardedMiddleware,
        guard: GuardMiddleware,
        auth: AuthMiddleware,
        ratelimit: RateLimitMiddleware,
        proxy: Proxy,
        cookie_sessions: bool,
    ) -> None:
        self.access = access
        self.forwarded = forwarded
        self.guard = guard
        self.auth = auth
        self.ratelimit = ratelimit
        self.proxy = proxy
        # With the OIDC login on, a cookie may carry a login session that its middleware maintains.
        self.cookie_sessions = cookie_sessions
        self.answered = 0  # requests the hot path answered (``/stats``, tests)
        self.repeats = 0  # requests not parsed again, counted by the protocol (``/stats``, tests)
        # (id(proxy fields), id(RateLimit-Policy)) -> (proxy fields, security fields, RateLimit-Policy,
        # all three): one list per cache entry, second and policy, so the protocol encodes that
        # part of the head once (HeadEncoder.encode_split).
        self._fixed: dict[tuple[int, int], tuple[list[Header], list[Header], Header | None, list[Header]]] = {}

    def answer(self, scope: Scope, respond: Respond) -> bool:
        """Answer the request through ``respond`` and return True, or return False having changed nothing."""
        start = time.monotonic()  # also the rate-limit counters' clock: one reading for both
        if self.forwarded.rewrites(scope) or self.guard.check(scope) is not None:
            return False
        if self.cookie_sessions and any(name == b"cookie" for name, _ in scope["headers"]):
            return False
        path = route_path(scope)
        if not is_proxied(path):
            return False
        found = self.proxy.fresh_now(scope)
        if found is None:
            return False
        principal = self.auth.admit_now(scope, path)
        if principal is None:
            return False
        limit = self.ratelimit.admit_now(scope, principal, path, start)  # the first side effect: a counted request
        if limit is None:
            return False

        # Committed: from here on, what the ASGI layers would do for this request.
        state = scope.setdefault("state", {})
        request_id = self.access.next_request_id()
        state["request_id"] = request_id
        state["principal"] = principal
        status, fields, body = self.proxy.answer_now(scope, *found)
        state["gateway.status"] = status
        # RateLimit-Policy is the same for every request of the policy: it goes with the fixed part.
        policy, line = limit if limit else (None, b"")
        fixed = self._fixed_fields(fields, self.guard.fields_for(scope), policy)
        respond(status, fixed, [(b"x-request-id", request_id.encode())], line, body)
        self.answered += 1
        self.access.record(scope, state, status, time.monotonic() - start, request_id)
        return True

    def _fixed_fields(self, fields: list[Header], secure: list[Header], policy: Header | None) -> list[Header]:
        """``[*fields, *secure, policy]``, the same list object for the same three."""
        key = (id(fields), id(policy))  # callers on different policies alternate without thrashing
        memo = self._fixed.get(key)
        if memo is not None and memo[0] is fields and memo[1] is secure and memo[2] is policy:
            return memo[3]
        if len(self._fixed) >= 64:
            self._fixed.clear()
        joined = [*fields, *secure, policy] if policy is not None else [*fields, *secure]
        self._fixed[key] = (fields, secure, policy, joined)
        return joined
