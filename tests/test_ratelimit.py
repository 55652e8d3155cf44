"""Per-caller and per-IP limits with the IETF RateLimit fields; Redis shared between replicas."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import httpx

from gateway.auth import Principal
from gateway.ratelimit import RateLimiter, Verdict
from gateway.settings import RateLimitSettings
from gateway.shared import Shared
from tests.harness import Simulator

SUPERVISOR = "/cgi-bin/dl_cgi/supervisor/info"


def test_sixth_request_of_one_key_is_limited_and_another_key_is_not(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url, {"ratelimit": {"per_caller": "5/minute"}})
    with gw.client("viewer") as viewer, gw.client("admin") as admin:
        for i in range(5):
            r = viewer.get(SUPERVISOR)
            assert r.status_code == 200
            assert r.headers["ratelimit-policy"] == '"caller";q=5;w=60'
            assert r.headers["ratelimit"].startswith(f'"caller";r={4 - i};t=')
        limited = viewer.get(SUPERVISOR)
        assert limited.status_code == 429
        assert limited.headers["ratelimit-policy"] == '"caller";q=5;w=60'
        assert limited.headers["ratelimit"].startswith('"caller";r=0;t=')
        # The window began with the first request: it ends within one window, never sooner than now.
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["ratelimit"] == f'"caller";r=0;t={limited.headers["retry-after"]}'
        problem = limited.json()
        assert limited.headers["content-type"] == "application/problem+json"
        assert problem["violated-policies"] == ["caller"]
        assert problem["type"].endswith("#quota-exceeded")
        assert admin.get(SUPERVISOR).status_code == 200
        # Health checks are never limited.
        assert viewer.get("/healthz").status_code == 200
        assert "ratelimit" not in viewer.get("/healthz").headers


def test_per_role_and_per_key_overrides(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url, {"ratelimit": {"per_caller": "2/minute", "roles": {"admin": "4/minute"}}})
    gw.add_key("dashboard", rate_limit="3/minute")
    with gw.client("viewer") as v, gw.client("admin") as a, gw.client("dashboard") as d:
        assert [v.get(SUPERVISOR).status_code for _ in range(3)] == [200, 200, 429]
        assert [a.get(SUPERVISOR).status_code for _ in range(5)] == [200] * 4 + [429]
        deadline = time.monotonic() + 5
        while d.get(SUPERVISOR).status_code == 401:  # the new key is picked up without a restart
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert d.get(SUPERVISOR).headers["ratelimit-policy"] == '"caller";q=3;w=60'


def test_unauthenticated_requests_are_limited_by_client_ip(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url, {"ratelimit": {"per_ip": "3/minute"}, "server": {"trusted_proxies": ["127.0.0.1/32"]}})
    with httpx.Client(base_url=gw.url) as c:
        one = {"X-Forwarded-For": "192.0.2.10"}
        two = {"X-Forwarded-For": "192.0.2.20"}
        answers = [c.get(SUPERVISOR, headers=one) for _ in range(4)]
        assert [r.status_code for r in answers] == [401, 401, 401, 429]
        assert answers[3].headers["ratelimit-policy"] == '"ip";q=3;w=60'
        assert answers[3].headers["ratelimit"].startswith('"ip";r=0;t=')
        assert answers[3].json()["violated-policies"] == ["ip"]
        assert c.get(SUPERVISOR, headers=two).status_code == 401
        assert c.get("/healthz", headers=one).status_code == 200
        # Identified callers from that address use their own budget.
        assert c.get(SUPERVISOR, headers={**one, "Authorization": f"Bearer {gw.keys['viewer']}"}).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gateways_sharing_redis_enforce_one_limit(simulator: Simulator, make_gateway, redis_url: str) -> None:
    config = {"ratelimit": {"per_caller": "6/minute"}, "cluster": {"redis_url": redis_url}}
    first = make_gateway(simulator.url, config)
    # The second replica shares the first's keys file, as replicas behind one Traefik would.
    second = make_gateway(simulator.url, {**config, "auth": {"keys_file": str(first.workdir / "keys.json")}}, key_roles={})
    key = first.keys["viewer"]
    codes = []
    for i in range(8):
        gw = first if i % 2 == 0 else second
        codes.append(httpx.get(gw.url + SUPERVISOR, headers={"Authorization": f"Bearer {key}"}).status_code)
    assert codes == [200] * 6 + [429, 429]


# ---------------------------------------------------------------- the limiter itself, in process


def _limiter(shared: Shared | None = None, **rates: str) -> RateLimiter:
    settings = RateLimitSettings(**{"per_caller": "5/minute", "per_ip": "3/minute", "auth_failures": "2/minute", **rates})
    return RateLimiter(settings, shared)


def test_a_policy_states_its_quota_and_what_is_left() -> None:
    async def run() -> list[Verdict]:
        limiter = _limiter()
        assert limiter.per_caller is not None
        return [await limiter.check(limiter.per_caller, "alice") for _ in range(6)]

    verdicts = asyncio.run(run())
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    fields = dict(verdicts[0].headers())
    assert fields[b"ratelimit-policy"] == b'"caller";q=5;w=60'
    assert re.fullmatch(rb'"caller";r=4;t=\d+', fields[b"ratelimit"])
    problem = verdicts[-1].problem()
    assert problem.status == 429
    assert dict(problem.headers)["Retry-After"] == str(verdicts[-1].reset_in)
    assert problem.extra["violated-policies"] == ["caller"]


def test_keys_are_counted_apart_and_overrides_win() -> None:
    async def run() -> tuple[bool, bool, int]:
        limiter = _limiter(roles={"admin": "100/minute"})
        assert limiter.per_caller is not None
        for _ in range(5):
            await limiter.check(limiter.per_caller, "alice")
        alice = await limiter.check(limiter.per_caller, "alice")
        bob = await limiter.check(limiter.per_caller, "bob")
        admin = limiter.policy_for(Principal("k1", "root", "admin", "api_key"))
        own = limiter.policy_for(Principal("k2", "x", "viewer", "api_key", "7/hour"))
        assert admin is not None and own is not None and own.window == 3600
        return alice.allowed, bob.allowed, admin.quota

    assert asyncio.run(run()) == (False, True, 100)


def test_failed_credentials_block_an_address_only_past_the_limit() -> None:
    async def run() -> list[float]:
        limiter = _limiter()
        waits = [await limiter.auth_blocked_for("10.0.0.9")]
        for _ in range(2):
            await limiter.auth_failure("10.0.0.9")
            waits.append(await limiter.auth_blocked_for("10.0.0.9"))
        waits.append(await limiter.auth_blocked_for("10.0.0.8"))
        return waits

    waits = asyncio.run(run())
    assert waits[:2] == [0.0, 0.0] and waits[3] == 0.0
    assert waits[2] >= 1.0


def test_with_redis_unreachable_limits_count_locally_and_never_fail() -> None:
    """cluster.redis_url pointing at nothing: every check still decides, in this process."""
    clock = [0.0]
    shared = Shared(f"redis://127.0.0.1:{_free_port()}", clock=lambda: clock[0], timeout=0.2)

    async def run() -> list[bool]:
        limiter = _limiter(shared)
        assert limiter.per_caller is not None
        out = []
        for _ in range(6):
            out.append((await limiter.check(limiter.per_caller, "alice")).allowed)
            clock[0] += 2.0  # past Shared's retry pause: Redis is asked (and fails) every time
        await shared.aclose()
        return out

    assert asyncio.run(run()) == [True] * 5 + [False]
    assert not shared.available and shared.outages == 1  # one outage, logged once


def test_redis_counts_are_shared_and_the_local_fallback_takes_over_when_it_goes(redis_url: str) -> None:
    async def run() -> tuple[list[bool], list[bool]]:
        one, two = Shared(redis_url), Shared(redis_url)
        a, b = _limiter(one), _limiter(two)
        assert a.per_caller is not None and b.per_caller is not None
        shared_run = [(await (a if i % 2 else b).check(a.per_caller, "alice")).allowed for i in range(6)]
        await one.aclose()
        await two.aclose()
        return shared_run, [one.available, two.available]

    decisions, available = asyncio.run(run())
    assert decisions == [True] * 5 + [False]  # one count across both limiters
    assert available == [True, True]
