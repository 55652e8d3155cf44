"""The response cache shared through Redis: one fetch serves every gateway; one fill per resource cluster-wide.

Each ResponseCache stands for one gateway; they share a real Redis. Freshness runs on
injected clocks (a monotonic and a wall clock per "gateway").
"""

from __future__ import annotations

import asyncio

from gateway.cache import ResponseCache
from gateway.errors import UpstreamError, UpstreamUnavailable
from gateway.settings import CacheSettings
from gateway.shared import Shared
from gateway.shared import key as shared_key
from gateway.upstream import Fetched
from tests.redis_harness import RedisServer

KEY = "/cgi-bin/dl_cgi?Command=DeviceList"





class Clock:
    def __init__(self, wall: float) -> None:
        self.mono = 100.0
        self.wall_time = wall

    def __call__(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.wall_time

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_time += seconds


class PVS:
    """Counts fetches; each answer is stamped with the fetching gateway's wall clock."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail

    def fetch(self, clock: Clock) -> object:
        async def go() -> Fetched:
            self.calls += 1
            await asyncio.sleep(self.delay)
            if self.fail:
                raise UpstreamUnavailable("the PVS is busy (HTTP 503)")
            return Fetched(200, b'{"n": %d}' % self.calls, clock.wall())

        return go


def gateway_cache(shared: Shared, clock: Clock) -> ResponseCache:
    settings = CacheSettings(default_ttl=30.0, max_stale=600.0, stale_while_revalidate=0.0)
    return ResponseCache(settings, clock=clock, wall=clock.wall, shared=shared)


async def clear(url: str) -> None:
    shared = Shared(url)
    await shared.run(lambda r: r.flushdb())
    await shared.aclose()


def test_one_fetch_serves_every_gateway_while_fresh(redis: RedisServer) -> None:
    async def scenario() -> tuple[int, list[str], bytes]:
        await clear(redis.url)
        clocks = [Clock(1_000_000.0) for _ in range(3)]
        shareds = [Shared(redis.url) for _ in clocks]
        caches = [gateway_cache(s, c) for s, c in zip(shareds, clocks, strict=True)]
        pvs = PVS()
        statuses = []
        for cache, clock in zip(caches, clocks, strict=True):
            found = await cache.get(KEY, 30.0, pvs.fetch(clock))  # type: ignore[arg-type]
            statuses.append(found.cache_status.split(";")[1].strip())
        clocks[2].advance(10.0)
        again = await caches[2].get(KEY, 30.0, pvs.fetch(clocks[2]))  # type: ignore[arg-type]
        for s in shareds:
            await s.aclose()
        return pvs.calls, statuses, again.entry.body

    calls, statuses, body = asyncio.run(scenario())
    assert calls == 1
    assert statuses == ["fwd=miss", "hit", "hit"]
    assert body == b'{"n": 1}'


def test_a_shared_entry_goes_stale_by_its_wall_clock_age(redis: RedisServer) -> None:
    async def scenario() -> tuple[int, str]:
        await clear(redis.url)
        a, b = Clock(2_000_000.0), Clock(2_000_000.0)
        sa, sb = Shared(redis.url), Shared(redis.url)
        pvs = PVS()
        await gateway_cache(sa, a).get(KEY, 30.0, pvs.fetch(a))  # type: ignore[arg-type]
        b.advance(31.0)  # B starts 31 s after A fetched: the shared copy is stale for it
        found = await gateway_cache(sb, b).get(KEY, 30.0, pvs.fetch(b))  # type: ignore[arg-type]
        await sa.aclose()
        await sb.aclose()
        return pvs.calls, found.cache_status

    calls, status = asyncio.run(scenario())
    assert calls == 2
    assert "fwd=" in status


def test_concurrent_misses_on_three_gateways_make_one_fetch(redis: RedisServer) -> None:
    async def scenario() -> tuple[int, list[bytes]]:
        await clear(redis.url)
        clocks = [Clock(3_000_000.0) for _ in range(3)]
        shareds = [Shared(redis.url) for _ in clocks]
        caches = [gateway_cache(s, c) for s, c in zip(shareds, clocks, strict=True)]
        pvs = PVS(delay=0.5)
        results = await asyncio.gather(
            *(c.get(KEY, 30.0, pvs.fetch(clock)) for c, clock in zip(caches, clocks, strict=True) for _ in range(5))  # type: ignore[arg-type]
        )
        for s in shareds:
            await s.aclose()
        return pvs.calls, sorted({r.entry.body for r in results})

    calls, bodies = asyncio.run(scenario())
    assert calls == 1
    assert bodies == [b'{"n": 1}']


def test_the_fillers_failure_reaches_the_waiting_gateways_without_a_second_fetch(redis: RedisServer) -> None:
    async def scenario() -> tuple[int, list[str]]:
        await clear(redis.url)
        a, b = Clock(4_000_000.0), Clock(4_000_000.0)
        sa, sb = Shared(redis.url), Shared(redis.url)
        pvs = PVS(delay=0.4, fail=True)
        outcomes = await asyncio.gather(
            gateway_cache(sa, a).get(KEY, 30.0, pvs.fetch(a)),  # type: ignore[arg-type]
            gateway_cache(sb, b).get(KEY, 30.0, pvs.fetch(b)),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        await sa.aclose()
        await sb.aclose()
        return pvs.calls, [type(o).__name__ for o in outcomes]

    calls, outcomes = asyncio.run(scenario())
    assert calls == 1
    assert all(o == "UpstreamUnavailable" for o in outcomes), outcomes


def test_a_fill_lock_left_by_a_dead_gateway_expires(redis: RedisServer) -> None:
    async def scenario() -> tuple[int, float]:
        await clear(redis.url)
        clock = Clock(5_000_000.0)
        shared = Shared(redis.url)
        # A gateway took the lock and died: nobody renews it; it lapses after its expiry (here 0.4 s).
        await shared.run(lambda r: r.set(shared_key("cache", "lock", KEY), "dead-gateway", px=400))
        pvs = PVS()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await gateway_cache(shared, clock).get(KEY, 30.0, pvs.fetch(clock))  # type: ignore[arg-type]
        waited = loop.time() - began
        await shared.aclose()
        return pvs.calls, waited

    calls, waited = asyncio.run(scenario())
    assert calls == 1
    assert 0.3 <= waited < 3.0


def test_without_redis_each_cache_fills_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> tuple[int, bool]:
        dead = RedisServer(tmp_path)  # never started
        clock = Clock(6_000_000.0)
        shared = Shared(dead.url)
        cache = gateway_cache(shared, clock)
        pvs = PVS()
        await cache.get(KEY, 30.0, pvs.fetch(clock))  # type: ignore[arg-type]
        found = await cache.get(KEY, 30.0, pvs.fetch(clock))  # type: ignore[arg-type]
        await shared.aclose()
        return pvs.calls, found.cache_status.startswith("pvs-gateway; hit")

    assert asyncio.run(scenario()) == (1, True)


def test_a_late_answer_still_fills_the_cache() -> None:
    """The caller timed out (StillWorking); the PVS's answer, when it comes, is kept for the next caller."""
    from gateway.upstream import StillWorking

    async def scenario() -> tuple[str, int]:
        clock = Clock(7_000_000.0)
        cache = gateway_cache(Shared(""), clock)
        late: asyncio.Future[Fetched] = asyncio.get_running_loop().create_future()

        async def timed_out() -> Fetched:
            raise StillWorking("the PVS did not answer in time", late=late)

        try:
            await cache.get(KEY, 30.0, timed_out)
            first = "answered"
        except UpstreamError as exc:
            first = type(exc).__name__
        late.set_result(Fetched(200, b'{"late": true}', clock.wall()))
        await asyncio.sleep(0.05)
        pvs = PVS()
        found = await cache.get(KEY, 30.0, pvs.fetch(clock))  # type: ignore[arg-type]
        return first, pvs.calls + (0 if found.entry.body == b'{"late": true}' else 100)

    assert asyncio.run(scenario()) == ("StillWorking", 0)


def test_callers_queued_behind_a_late_answer_get_it_and_the_pvs_is_not_asked_again() -> None:
    """A caller timed out; its request is still at the PVS. The next fill for the same resource waits for a
    turn; when the late answer lands, its callers are served at once, and at its turn it does not fetch."""
    from gateway.budget import UpstreamBudget
    from gateway.upstream import AlreadyFilled, StillWorking, still_needed

    async def scenario() -> tuple[str, bytes, float, int]:
        clock = Clock(8_000_000.0)
        cache = gateway_cache(Shared(""), clock)
        budget = UpstreamBudget(max_concurrency=1, min_interval=0.0, max_queue=8, queue_timeout=5.0)
        pvs_done = asyncio.Event()
        asked = [0]

        async def pvs_answer() -> Fetched:
            await pvs_done.wait()
            return Fetched(200, b'{"late": true}', clock.wall())

        async def fetch() -> Fetched:  # what UpstreamClient.fetch does, in small
            async with budget.slot() as slot:
                needed = still_needed.get()
                if needed is not None and not await needed():
                    raise AlreadyFilled(KEY)
                asked[0] += 1
                if asked[0] == 1:
                    exchange = asyncio.get_running_loop().create_task(pvs_answer())
                    slot.keep_until(exchange)
                    raise StillWorking("the PVS did not answer in time", late=exchange)
                return Fetched(200, b'{"second": true}', clock.wall())

        try:
            await cache.get(KEY, 30.0, fetch)
            first = "answered"
        except UpstreamError as exc:
            first = type(exc).__name__
        loop = asyncio.get_running_loop()
        second = loop.create_task(cache.get(KEY, 30.0, fetch))  # queued: the slot is still the PVS's
        await asyncio.sleep(0.1)
        began = loop.time()
        pvs_done.set()
        found = await asyncio.wait_for(second, 2)
        waited = loop.time() - began
        await asyncio.sleep(0.1)  # the queued fill takes its turn, and skips
        return first, found.entry.body, waited, asked[0]

    first, body, waited, asked = asyncio.run(scenario())
    assert first == "StillWorking"
    assert body == b'{"late": true}'
    assert waited < 0.5
    assert asked == 1, "the PVS was asked again for a resource already fresh"
