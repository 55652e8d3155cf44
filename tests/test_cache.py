"""Cache and global budget: what the PVS sees while many callers poll it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from email.utils import parsedate_to_datetime

import httpx

from tests.harness import Gateway, Simulator

DEVICE_LIST = "/cgi-bin/dl_cgi?Command=DeviceList"


def test_fifty_cold_callers_make_one_upstream_request(fresh_simulator: Simulator, make_gateway) -> None:
    gw: Gateway = make_gateway(fresh_simulator.url)

    async def storm() -> list[httpx.Response]:
        async with gw.async_client(limits=httpx.Limits(max_connections=60)) as c:
            return await asyncio.gather(*(c.get(DEVICE_LIST) for _ in range(50)))

    responses = asyncio.run(storm())
    assert [r.status_code for r in responses] == [200] * 50
    bodies = {r.content for r in responses}
    assert len(bodies) == 1, "every waiter gets the one upstream answer"
    statuses = [r.headers["cache-status"] for r in responses]
    assert sum("stored" in s for s in statuses) == 1
    assert sum("collapsed" in s for s in statuses) == 49
    assert fresh_simulator.stats()["by_request"]["DeviceList"] == 1


def test_mixed_storm_keeps_the_pvs_within_its_budget(make_simulator, make_gateway) -> None:
    # A PVS that takes one request at a time and reboots after 3 over-capacity requests.
    sim = make_simulator("--latency-scale", "0.03", "--clock", "12:00", "--capacity", "1", "--seed", "3")
    ttl, interval, duration = 2.0, 0.2, 30.0
    targets = [
        DEVICE_LIST,
        "/cgi-bin/dl_cgi?Command=Get_Comm",
        "/cgi-bin/dl_cgi?Command=GridProfileGet",
        "/cgi-bin/dl_cgi?Command=CheckFW",
        "/cgi-bin/dl_cgi/supervisor/info",
        "/cgi-bin/dl_cgi/devices/list",
        "/cgi-bin/dl_cgi/network/interfaces",
        "/cgi-bin/dl_cgi/communication/interfaces",
    ]
    gw = make_gateway(
        sim.url,
        {
            "upstream": {"min_interval": interval, "max_concurrency": 1},
            "cache": {"default_ttl": ttl, "ttl": {name: ttl for name in ("DeviceList", "Get_Comm", "GridProfileGet", "CheckFW", "supervisor/info", "devices/list", "network/interfaces", "communication/interfaces")}},
        },
    )
    sent = 0
    codes: dict[int, int] = {}

    async def caller(i: int, deadline: float) -> None:
        nonlocal sent
        async with gw.async_client() as c:
            n = i
            while time.monotonic() < deadline:
                r = await c.get(targets[n % len(targets)])
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                sent += 1
                n += 1

    async def run() -> None:
        deadline = time.monotonic() + duration
        await asyncio.gather(*(caller(i, deadline) for i in range(24)))

    asyncio.run(run())
    stats = sim.stats()
    # The bound: each resource at most once per TTL (+1 cold fill), and starts at least `interval` apart.
    per_resource_bound = math.ceil(duration / ttl) + 1
    bound = min(len(targets) * per_resource_bound, math.ceil(duration / interval) + 1)
    assert codes.get(200, 0) == sent, codes
    assert stats["max_in_flight"] == 1
    assert stats["reboots"] == 0
    assert stats["rejected"] == 0
    assert stats["total"] <= bound, (stats["total"], bound)
    assert sent > 20 * stats["total"], "callers were served from memory"


def test_stale_if_error_then_503_then_recovery(fresh_simulator: Simulator, make_gateway) -> None:
    max_stale = 4.0
    gw = make_gateway(
        fresh_simulator.url,
        {
            "cache": {"ttl": {"DeviceList": 1}, "stale_while_revalidate": 0, "max_stale": max_stale},
            "upstream": {"failure_threshold": 2, "backoff_initial": 0.3, "backoff_max": 0.6},
        },
    )
    with gw.client() as c:
        warm = c.get(DEVICE_LIST)
        assert warm.status_code == 200
        warmed_at = time.monotonic()
        fresh_simulator.fault("down")
        stale_seen = 0
        while time.monotonic() - warmed_at < max_stale - 0.5:
            time.sleep(0.3)
            r = c.get(DEVICE_LIST)
            assert r.status_code == 200, r.text
            if time.monotonic() - warmed_at > 1.2:
                assert "fwd=stale" in r.headers["cache-status"], r.headers["cache-status"]
                assert r.content == warm.content
                assert int(r.headers["age"]) >= 1
                stale_seen += 1
        assert stale_seen >= 3
        time.sleep(max_stale - (time.monotonic() - warmed_at) + 0.6)
        r = c.get(DEVICE_LIST)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["proxy-status"].startswith("pvs-gateway; error=")
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == 503 and r.json()["detail"]

        fresh_simulator.fault("ok")
        deadline = time.monotonic() + 1 + 0.6 + 2  # one TTL + the longest back-off + the DeviceList itself
        while True:
            r = c.get(DEVICE_LIST)
            if r.status_code == 200:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert "fwd=" in r.headers["cache-status"] and "stored" in r.headers["cache-status"]


def test_stale_while_revalidate_answers_at_once_and_refreshes_in_background(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"cache": {"ttl": {"DeviceList": 1}, "stale_while_revalidate": 60}})
    with gw.client() as c:
        assert c.get(DEVICE_LIST).status_code == 200
        time.sleep(1.2)
        start = time.monotonic()
        r = c.get(DEVICE_LIST)
        took = time.monotonic() - start
        assert r.status_code == 200
        assert "hit" in r.headers["cache-status"] and "ttl=-" in r.headers["cache-status"]
        assert took < 0.25, f"a stale hit must not wait for the PVS ({took:.2f} s; DeviceList takes 0.5 s)"
        time.sleep(0.9)
        r = c.get(DEVICE_LIST)
        assert "hit; ttl=" in r.headers["cache-status"] and "ttl=-" not in r.headers["cache-status"]
    assert fresh_simulator.stats()["by_request"]["DeviceList"] == 2


def test_a_slow_miss_is_dated_when_it_is_answered(make_simulator, make_gateway) -> None:
    """Date is when the answer starts, not when the request arrived: a DeviceList that waited
    seconds for the PVS must not be dated before its own Last-Modified (downstream caches
    would count the wait as age)."""
    slow = make_simulator("--latency-scale", "0.4", "--clock", "12:00", "--seed", "7")  # DeviceList ~4 s
    gw = make_gateway(slow.url)
    with gw.client() as c:
        sent = time.time()
        r = c.get(DEVICE_LIST)
        received = time.time()
    assert r.status_code == 200 and "fwd=miss" in r.headers["cache-status"]
    assert received - sent >= 3.0  # the miss did wait
    # Both are whole seconds, and uvicorn renews its Date once a second: allow one second each way.
    date = parsedate_to_datetime(r.headers["date"]).timestamp()
    assert date >= parsedate_to_datetime(r.headers["last-modified"]).timestamp() - 1
    assert received - 2.5 <= date <= received + 1


def test_fresh_hits_carry_honest_headers(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"cache": {"ttl": {"supervisor/info": 30}}})
    with gw.client() as c:
        first = c.get("/cgi-bin/dl_cgi/supervisor/info")
        assert first.headers["cache-status"] == "pvs-gateway; fwd=miss; fwd-status=200; stored"
        assert first.headers["age"] == "0"
        assert "last-modified" in first.headers
        time.sleep(1.1)
        second = c.get("/cgi-bin/dl_cgi/supervisor/info")
        assert second.headers["cache-status"].startswith("pvs-gateway; hit; ttl=")
        assert 28 <= int(second.headers["cache-status"].rsplit("=", 1)[1]) <= 29
        assert int(second.headers["age"]) >= 1
        assert second.headers["cache-control"].startswith("private, max-age=")
        assert second.content == first.content


def test_full_queue_sheds_load_with_503(make_simulator, make_gateway) -> None:
    sim = make_simulator("--latency-scale", "0.2", "--clock", "12:00")  # DeviceList 2 s
    gw = make_gateway(sim.url, {"upstream": {"max_queue": 1, "queue_timeout": 10}})
    targets = [DEVICE_LIST, "/cgi-bin/dl_cgi?Command=Get_Comm", "/cgi-bin/dl_cgi/supervisor/info", "/cgi-bin/dl_cgi/devices/list"]

    async def run() -> list[httpx.Response]:
        async with gw.async_client() as c:
            first = asyncio.create_task(c.get(targets[0]))
            await asyncio.sleep(0.3)  # DeviceList is now in flight
            rest = await asyncio.gather(*(c.get(t) for t in targets[1:]))
            return [await first, *rest]

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 2 and codes.count(503) == 2, codes
    shed = [r for r in responses if r.status_code == 503]
    for r in shed:
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["proxy-status"].startswith("pvs-gateway; error=")
    assert sim.stats()["max_in_flight"] == 1


def test_min_interval_spaces_upstream_starts(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"upstream": {"min_interval": 0.5}})
    targets = ["/cgi-bin/dl_cgi/supervisor/info", "/cgi-bin/dl_cgi?Command=Get_Comm", "/cgi-bin/dl_cgi?Command=GridProfileGet"]

    async def run() -> None:
        async with gw.async_client() as c:
            rs = await asyncio.gather(*(c.get(t) for t in targets))
            assert all(r.status_code == 200 for r in rs)

    asyncio.run(run())
    times = sorted(r["time"] for r in fresh_simulator.requests())
    assert len(times) == 3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Starts are paced 0.5 s apart; arrivals jitter by connection setup, so allow some slack.
    assert times[-1] - times[0] >= 0.9, gaps
    assert min(gaps) >= 0.3, gaps


def test_background_polling_serves_callers_from_memory(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"upstream": {"poll": ["DeviceList"]}, "cache": {"ttl": {"DeviceList": 1.5}}})
    time.sleep(3.5)
    polled = fresh_simulator.stats()["by_request"].get("DeviceList", 0)
    assert 2 <= polled <= 4, polled
    with gw.client() as c:
        for _ in range(5):
            r = c.get(DEVICE_LIST)
            assert r.headers["cache-status"].startswith("pvs-gateway; hit; ttl="), r.headers["cache-status"]
            time.sleep(0.1)


def test_cache_memory_is_bounded(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"cache": {"max_entries": 3}})
    with gw.client() as c:
        for target in ["/cgi-bin/dl_cgi/supervisor/info", "/cgi-bin/dl_cgi?Command=Get_Comm", "/cgi-bin/dl_cgi?Command=GridProfileGet", "/cgi-bin/dl_cgi?Command=CheckFW", "/cgi-bin/dl_cgi/devices/list"]:
            assert c.get(target).status_code == 200
        stats = c.get("/stats").json()
    assert stats["cache"]["entries"] == 3
    assert stats["cache"]["evicted"] == 2


def test_idle_keepalive_wakes_the_pvs_only_when_nobody_polls(make_simulator, make_gateway) -> None:
    quiet_sim = make_simulator("--latency-scale", "0.05", "--clock", "12:00")
    make_gateway(quiet_sim.url, {"upstream": {"keepalive_interval": 1.0}})
    busy_sim = make_simulator("--latency-scale", "0.05", "--clock", "12:00")
    make_gateway(busy_sim.url, {"upstream": {"keepalive_interval": 1.0, "poll": ["DeviceList"]}, "cache": {"ttl": {"DeviceList": 0.4}}})
    quiet_sim.reset()
    busy_sim.reset()
    start = time.monotonic()
    time.sleep(3.5)
    # On a loaded CI machine the quiet gateway may fall behind its cadence: it has until 8 s
    # to send two, and may never send more than one per interval.
    while (quiet := quiet_sim.stats()["by_request"]).get("dl_cgi/supervisor/info", 0) < 2 and time.monotonic() - start < 8:
        time.sleep(0.2)
    elapsed = time.monotonic() - start
    assert 2 <= quiet.get("dl_cgi/supervisor/info", 0) <= elapsed / 1.0 + 1, (quiet, elapsed)
    busy = busy_sim.stats()["by_request"]
    assert busy.get("DeviceList", 0) >= 3, busy
    assert busy.get("dl_cgi/supervisor/info", 0) == 0, "a PVS that is being polled needs no keep-alive"


def test_a_pvs_reboot_is_noticed_and_reported(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"cache": {"ttl": {"DeviceList": 0.5}, "stale_while_revalidate": 0}})
    with gw.client() as c:
        assert c.get(DEVICE_LIST).status_code == 200
        time.sleep(1.5)  # let the simulated uptime grow past a second
        fresh_simulator.fault("reboot", 0.5)
        deadline = time.monotonic() + 10
        while True:
            time.sleep(0.6)
            c.get(DEVICE_LIST)
            if c.get("/stats").json()["upstream"]["reboots_noticed"] == 1:
                break
            assert time.monotonic() < deadline, c.get("/stats").json()
        ready = c.get("/readyz").json()
        assert ready["upstream"]["last_success"] is not None


def test_a_caller_that_hangs_up_leaves_its_fetch_to_finish_and_fill_the_cache(fresh_simulator: Simulator, make_gateway) -> None:
    """The slot is the PVS's, not the caller's: the next request waits for the abandoned one to end."""
    gw = make_gateway(fresh_simulator.url, {"upstream": {"max_concurrency": 1, "timeout": 10.0}})
    fresh_simulator.fault("slow", 1.0)  # every answer 1 s late (DeviceList: ~1.5 s)
    with gw.client(timeout=0.3) as impatient, contextlib.suppress(httpx.TimeoutException):
        impatient.get(DEVICE_LIST)  # the caller hangs up; the PVS is still working
    with gw.client() as c:
        other = c.get("/cgi-bin/dl_cgi?Command=Get_Comm")  # needs the slot the abandoned request holds
        assert other.status_code == 200
        fresh_simulator.fault("ok")
        again = c.get(DEVICE_LIST)
    stats = fresh_simulator.stats()
    assert stats["max_in_flight"] == 1, stats
    assert again.status_code == 200 and again.headers["cache-status"].startswith("pvs-gateway; hit"), again.headers
    assert stats["by_request"].get("DeviceList") == 1, stats  # the abandoned fetch filled the cache
