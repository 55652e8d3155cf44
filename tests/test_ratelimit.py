"""Per-caller and per-IP limits with the IETF RateLimit fields; Redis shared between replicas."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

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
        # A sliding window frees a slot as the earlier requests' weight decays: never sooner than now,
        # never later than two windows.
        assert 1 <= int(limited.headers["retry-after"]) <= 120
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


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install-test-deps installs it)")
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=5)


def test_two_gateways_sharing_redis_enforce_one_limit(simulator: Simulator, make_gateway, redis_url: str) -> None:
    config = {"ratelimit": {"per_caller": "6/minute", "storage": redis_url}}
    first = make_gateway(simulator.url, config)
    # The second replica shares the first's keys file, as replicas behind one Traefik would.
    second = make_gateway(simulator.url, {**config, "auth": {"keys_file": str(first.workdir / "keys.json")}}, key_roles={})
    key = first.keys["viewer"]
    codes = []
    for i in range(8):
        gw = first if i % 2 == 0 else second
        codes.append(httpx.get(gw.url + SUPERVISOR, headers={"Authorization": f"Bearer {key}"}).status_code)
    assert codes == [200] * 6 + [429, 429]


def test_local_sliding_window_matches_the_algorithm_on_a_fake_clock() -> None:
    from gateway.ratelimit import LocalWindows

    now = [600.0]  # the start of a 60 s window
    windows = LocalWindows(clock=lambda: now[0])
    assert [windows.hit("caller", "k", 5, 60)[0] for _ in range(5)] == [True] * 5
    allowed, remaining, wait = windows.hit("caller", "k", 5, 60)
    assert (allowed, remaining) == (False, 0)
    # Full window: the next one starts in 60 s, then the 5 requests weigh 5*(60-e)/60 <= 4 from e = 12 s.
    assert wait == 72
    assert windows.hit("other", "k", 5, 60)[0] is True  # policies and keys are separate
    now[0] = 600 + 60 + 11.0
    assert windows.hit("caller", "k", 5, 60)[0] is False
    now[0] = 600 + 60 + 12.5
    assert windows.hit("caller", "k", 5, 60)[0] is True
    # Counters two windows old weigh nothing and are dropped, so per-IP keys cannot grow memory.
    now[0] = 600 + 1000.0
    windows.hit("ip", "fresh", 5, 60)
    assert "k" not in windows._tables["caller"]


def _exact_sliding_window(state: dict[str, list[float]], key: str, now: float, amount: int, window: int) -> tuple[bool, int]:
    """The reference: limits' sliding-window counter, recomputed on every request."""
    start = now - now % window
    c = state.get(key)
    if c is None or c[0] != start:
        previous = c[1] if c is not None and c[0] == start - window else 0.0
        c = state[key] = [start, 0.0, previous]
    elapsed = now - start
    weighted = c[2] * (window - elapsed) / window + c[1]
    if weighted + 1 <= amount:
        c[1] += 1
        return True, int(amount - weighted - 1)
    return False, max(0, int(amount - weighted))


def test_credit_gives_the_exact_algorithms_decisions() -> None:
    """Admitting on credit (no arithmetic for up to a second) decides exactly as recomputing would;
    only the reported remaining quota may lag, and only downwards (never promising too much)."""
    import random

    from gateway.ratelimit import LocalWindows

    rng = random.Random(7)
    for amount, window in ((5, 60), (30, 10), (100, 60), (3, 1)):
        now = [1000.0 * window]
        windows = LocalWindows(clock=lambda: now[0])
        reference: dict[str, list[float]] = {}
        decisions = 0
        for _ in range(3000):
            pace = window / amount  # steps around the allowed pace: bursts, lulls, and everything between
            now[0] += rng.choice((0.0, 0.0, 0.0, 0.1 * pace, 0.25 * pace, 0.5 * pace, pace, 2 * pace))
            if rng.random() < 0.01:
                now[0] += rng.choice((window / 2, 1.5 * window))  # a lull: the previous window decays
            key = rng.choice(("a", "b"))
            allowed, remaining, _ = windows.hit("caller", key, amount, window)
            exact_allowed, exact_remaining = _exact_sliding_window(reference, key, now[0], amount, window)
            assert allowed == exact_allowed, (amount, window, now[0], key)
            assert remaining <= exact_remaining
            decisions += not allowed
        assert decisions > 0  # the timelines do reach the limits


def test_a_counter_held_across_requests_decides_as_the_table_does() -> None:
    """The hot path keeps a caller's counter per connection and spends its credit with ``take``;
    across window changes and pruning that must decide exactly as looking it up each time."""
    import random

    from gateway.ratelimit import LocalWindows

    rng = random.Random(11)
    amount, window = 20, 10
    now = [1000.0 * window]
    windows = LocalWindows(clock=lambda: now[0])
    reference: dict[str, list[float]] = {}
    held = None
    taken = admitted = 0
    for _ in range(5000):
        now[0] += rng.choice((0.0, 0.0, 0.1, 0.3, 0.5, 1.0))
        if rng.random() < 0.01:
            now[0] += rng.choice((window / 2, 1.5 * window, 40.0 * window))  # lulls, and one long enough to prune
        spent = windows.take(held, now[0]) if held is not None else None
        if spent is not None:
            allowed, remaining = True, spent
            taken += 1
        else:
            allowed, remaining, _ = windows.hit("caller", "k", amount, window)
            held = windows.counter("caller", "k")
        exact_allowed, exact_remaining = _exact_sliding_window(reference, "k", now[0], amount, window)
        assert allowed == exact_allowed, now[0]
        assert remaining <= exact_remaining
        admitted += allowed
    assert taken > 1000 and admitted < 5000  # credit was spent, and the limit was reached


def test_remaining_is_exact_near_exhaustion_and_rounded_down_far_from_it() -> None:
    from gateway.ratelimit import shown_remaining

    table = {0: 0, 1: 1, 999: 999, 1000: 1000, 1009: 1000, 1999: 1990, 12345: 12300, 99_940_521: 99_900_000}
    assert {r: shown_remaining(r) for r in table} == table
    previous = 0
    for r in [*range(3000), *range(3000, 10**7, 7919)]:
        shown = shown_remaining(r)
        assert shown <= r and r - shown <= r // 100  # never more than there is, and within 1%
        assert shown >= previous  # monotonic: a line made at a higher r is right while r >= what it states
        previous = shown


def test_a_connection_reuses_a_line_only_while_it_states_the_exact_quota() -> None:
    """The hot path's admit_now spends tokens, each a RateLimit line made once for many requests
    (HeldCounter.remake); every answer must still carry exactly Policy.line(r, t) of that
    request's own counting."""
    import math
    import random

    from gateway.auth import Principal
    from gateway.ratelimit import LocalWindows, RateLimiter, RateLimitMiddleware
    from gateway.settings import RateLimitSettings

    rng = random.Random(5)
    now = [6000.0]
    quota = 3000  # r runs through the rounded (>= 1000) and the exact range
    limiter = RateLimiter(RateLimitSettings(per_caller=f"{quota}/minute"))
    limiter.local = local = LocalWindows(clock=lambda: now[0])
    middleware = RateLimitMiddleware(lambda *a: None, limiter)  # type: ignore[arg-type,return-value]
    policy = limiter.per_caller
    assert policy is not None
    alice = Principal(id="key:alice", name="alice", role="viewer", method="key")
    connections = [{"gateway.connection": {}} for _ in range(3)]  # three connections of one caller
    reference: dict[str, list[float]] = {}
    lines = set()
    reused = 0
    for _ in range(40000):
        now[0] += rng.choice((0.0, 0.0, 0.0, 0.0, 0.001, 0.002, 0.01, 0.1))
        scope = rng.choice(connections)
        admitted = middleware.admit_now(scope, alice, "/cgi-bin/dl_cgi", now[0])
        exact_allowed, exact_remaining = _exact_sliding_window(reference, "alice", now[0], quota, 60)
        assert (admitted is not None) == exact_allowed, now[0]
        if admitted is None:
            continue
        counter = local.counter(policy, alice.id)
        assert counter is not None
        remaining = LocalWindows.left(counter)  # this request's r: spent by a token, take or hit
        assert exact_remaining - quota // 60 - 1 <= remaining <= exact_remaining  # a second's decay at most
        reset_in = math.ceil(now[0] - now[0] % 60 + 60 - now[0])
        assert admitted == (policy.policy_field, policy.line(remaining, reset_in))  # r as stated, t exact
        reused += admitted[1] in lines
        lines.add(admitted[1])
    assert any(b"r=0;" in line for line in lines)  # the timeline reaches the limit
    assert len(lines) > 1000 and reused > 10000  # lines are remade, and reused (tokens spent)


def test_the_ratelimit_line_is_the_field_as_a_checked_encoder_writes_it() -> None:
    import limits
    from uvicorn.protocols.http import httptools_impl

    from gateway.httpproto import head_encoder
    from gateway.ratelimit import Policy

    policy = Policy("caller", limits.parse("60/minute"))
    encoder = head_encoder(httptools_impl)
    assert encoder is not None
    checked, _ = encoder.encode(200, [(b"content-length", b"0"), policy.fields(59, 30)[1]])
    assert checked.endswith(b"\r\n" + policy.line(59, 30) + b"\r\n")
    assert policy.line(59, 30) == b'ratelimit: "caller";r=59;t=30\r\n'


def test_an_address_is_maybe_blocked_only_once_it_has_failed_as_often_as_allowed() -> None:
    import asyncio

    from gateway.ratelimit import RateLimiter
    from gateway.settings import RateLimitSettings

    async def scenario() -> list[tuple[bool, float]]:
        limiter = RateLimiter(RateLimitSettings(auth_failures="3/minute"))
        seen = []
        for _ in range(4):
            seen.append((limiter.may_be_blocked("192.0.2.7"), await limiter.auth_blocked_for("192.0.2.7")))
            await limiter.auth_failure("192.0.2.7")
        seen.append((limiter.may_be_blocked("192.0.2.7"), await limiter.auth_blocked_for("192.0.2.7")))
        assert not limiter.may_be_blocked("192.0.2.8")
        return seen

    seen = asyncio.run(scenario())
    # One or two failures: certainly not blocked, no call into limits needed. From the third, limits decides.
    assert [maybe for maybe, _ in seen] == [False, False, False, True, True]
    assert [wait > 0 for _, wait in seen] == [False, False, False, True, True]
