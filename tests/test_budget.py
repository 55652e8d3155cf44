"""The upstream budget: local slots kept for work the caller left, and the Redis lease shared by gateways.

Unit tests: real Redis where the budget is shared, an injected wall clock for lease expiry
(no sleeping to let time pass).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.budget import LEASES_KEY, NEXT_START_KEY, UpstreamBudget
from gateway.errors import Overloaded
from gateway.shared import Shared
from tests.redis_harness import RedisServer


def budget(shared: Shared | None = None, **kw: object) -> UpstreamBudget:
    opts: dict[str, object] = {"max_concurrency": 1, "min_interval": 0.0, "max_queue": 8, "queue_timeout": 2.0, **kw}
    return UpstreamBudget(shared=shared, **opts)  # type: ignore[arg-type]


async def flush(url: str) -> None:
    shared = Shared(url)
    await shared.run(lambda r: r.delete(LEASES_KEY, NEXT_START_KEY))
    await shared.aclose()


def test_a_slot_the_caller_left_stays_held_until_the_work_ends() -> None:
    async def scenario() -> tuple[int, int, int]:
        b = budget()
        pvs_done = asyncio.Event()
        work = asyncio.get_running_loop().create_task(pvs_done.wait())
        async with b.slot() as slot:
            slot.keep_until(work)  # the caller gives up here; the PVS is still working
        await asyncio.sleep(0.05)
        held_while_working = b.in_flight
        second = asyncio.get_running_loop().create_task(_take(b))
        await asyncio.sleep(0.1)
        waited = int(not second.done())
        pvs_done.set()
        await asyncio.wait_for(second, 2)
        return held_while_working, waited, b.max_in_flight

    held, waited, max_in_flight = asyncio.run(scenario())
    assert held == 1 and waited == 1
    assert max_in_flight == 1


async def _take(b: UpstreamBudget) -> None:
    async with b.slot():
        pass


def test_two_gateways_share_one_slot_through_redis(redis: RedisServer) -> None:
    async def scenario() -> tuple[bool, bool, int]:
        await flush(redis.url)
        a_shared, b_shared = Shared(redis.url), Shared(redis.url)
        a, b = budget(a_shared), budget(b_shared, queue_timeout=0.3)
        async with a.slot():
            try:
                async with b.slot():
                    b_got_it = True
            except Overloaded:
                b_got_it = False
        async with b.slot():
            b_after = True
        leases = await a_shared.run(lambda r: r.zcard(LEASES_KEY))
        await a_shared.aclose()
        await b_shared.aclose()
        return b_got_it, b_after, int(leases or 0)

    b_during, b_after, leases_left = asyncio.run(scenario())
    assert b_during is False, "a second gateway got a slot while the first held the only one"
    assert b_after is True
    assert leases_left == 0


def test_a_dead_holders_lease_expires(redis: RedisServer) -> None:
    """Lease expiry on an injected wall clock: the holder stops renewing (dies); after lease_ttl its slot is free."""

    async def scenario() -> tuple[bool | None, bool | None, bool | None]:
        await flush(redis.url)
        now = [1_000_000.0]
        a_shared, b_shared = Shared(redis.url), Shared(redis.url)
        a = budget(a_shared, wall=lambda: now[0], lease_ttl=30.0)
        b = budget(b_shared, wall=lambda: now[0], lease_ttl=30.0)
        assert await a._cluster_acquire(deadline=float("inf")) is not None  # held, and never renewed or released
        during = await b._try_lease("b:1")
        now[0] += 29.0
        just_before = await b._try_lease("b:1")
        now[0] += 2.0
        after = await b._try_lease("b:1")
        await a_shared.aclose()
        await b_shared.aclose()
        return during, just_before, after

    during, just_before, after = asyncio.run(scenario())
    assert (during, just_before, after) == (False, False, True)


def test_min_interval_is_measured_across_gateways(redis: RedisServer) -> None:
    async def scenario() -> list[float]:
        await flush(redis.url)
        now = [2_000_000.0]
        shareds = [Shared(redis.url) for _ in range(3)]
        budgets = [budget(s, min_interval=2.0, wall=lambda: now[0]) for s in shareds]
        delays = [await b.reserve_start() for b in budgets]  # three gateways, same instant
        now[0] += 10.0
        delays.append(await budgets[0].reserve_start())  # long after: no wait
        for s in shareds:
            await s.aclose()
        return delays

    assert asyncio.run(scenario()) == pytest.approx([0.0, 2.0, 4.0, 0.0])


def test_redis_down_means_the_local_budget_alone(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, bool, int]:
        dead = RedisServer(tmp_path)  # never started: nothing listens on its port
        shared = Shared(dead.url)
        b = budget(shared)
        async with b.slot() as slot:
            lease = slot.lease
        delay = await budget(shared, min_interval=1.0).reserve_start()
        await shared.aclose()
        return 0 if lease is None else 1, shared.available, int(delay)

    lease, available, delay = asyncio.run(scenario())
    assert (lease, available, delay) == (0, False, 0)
