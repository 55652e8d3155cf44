"""Liveness and readiness, as an orchestrator or a power-cycling automation sees them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from gateway.health import HEALTH_KEY, UpstreamHealth
from gateway.shared import Shared
from tests.harness import Simulator
from tests.redis_harness import RedisServer


def test_healthz_needs_no_credentials_and_readyz_probes_an_idle_pvs_once(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    first = httpx.get(gw.url + "/readyz")
    assert first.status_code == 200, first.text  # an idle gateway probes, then says ready
    body = first.json()
    assert body["ready"] is True and body["upstream"]["consecutive_failures"] == 0
    for _ in range(30):
        assert httpx.get(gw.url + "/readyz").status_code == 200
    assert fresh_simulator.stats()["total"] == 1, "hammering /readyz must not hammer the PVS"


def test_readyz_turns_503_when_the_pvs_is_gone_too_long(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"cache": {"max_stale": 2, "ttl": {"supervisor/info": 0.5}}, "upstream": {"failure_threshold": 1}})
    assert httpx.get(gw.url + "/readyz").status_code == 200
    fresh_simulator.fault("down")
    time.sleep(2.3)
    with gw.client() as c:
        c.get("/cgi-bin/dl_cgi/supervisor/info")  # fails upstream: counted
    r = httpx.get(gw.url + "/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["upstream"]["consecutive_failures"] >= 1
    assert r.json()["upstream"]["last_error"]
    assert httpx.get(gw.url + "/healthz").status_code == 200  # alive all the same


# ---------------------------------------------------------------- shared through Redis (unit, injected clocks)





class Clocks:
    def __init__(self) -> None:
        self.mono = 50.0
        self.wall = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def _health(shared: Shared, clocks: Clocks) -> UpstreamHealth:
    return UpstreamHealth(
        failure_threshold=2, backoff_initial=10.0, backoff_max=60.0,
        clock=lambda: clocks.mono, wall=lambda: clocks.wall, shared=shared,
    )


def test_a_back_off_started_by_one_gateway_holds_for_all(redis: RedisServer) -> None:
    async def scenario() -> tuple[float, float, int, float, float]:
        a_shared, b_shared = Shared(redis.url), Shared(redis.url)
        await a_shared.run(lambda r: r.delete(HEALTH_KEY))
        clocks = Clocks()
        a, b = _health(a_shared, clocks), _health(b_shared, clocks)
        await a.record_failure("timeout", "the PVS did not answer in time")
        await b.record_failure("timeout", "the PVS did not answer in time")  # the cluster's second: back off
        await a.pull()
        a_backoff = a.backoff_remaining()
        clocks.advance(4.0)
        c = _health(Shared(redis.url), clocks)  # a third gateway, started during the back-off
        await c.pull()
        c_backoff, c_failures = c.backoff_remaining(), c.consecutive_failures
        await c.record_success()
        await a.pull()
        since = a.since_success()
        await a_shared.aclose()
        await b_shared.aclose()
        return a_backoff, c_backoff, c_failures, a.backoff_remaining(), -1.0 if since is None else since

    a_backoff, c_backoff, c_failures, a_after, since = asyncio.run(scenario())
    assert a_backoff == pytest.approx(10.0)
    assert c_backoff == pytest.approx(6.0) and c_failures == 2
    assert a_after == 0.0 and since == pytest.approx(0.0)


def test_health_without_redis_stays_local(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, float]:
        clocks = Clocks()
        h = _health(Shared(RedisServer(tmp_path).url), clocks)  # nothing listens there
        await h.record_failure("refused", "refused")
        await h.record_failure("refused", "refused")
        await h.pull()
        return h.consecutive_failures, h.backoff_remaining()

    assert asyncio.run(scenario()) == (2, pytest.approx(10.0))
