"""Soak: an accelerated long run whose memory must stay flat.

Every TTL is 0.05 s and the simulated PVS answers DeviceList in ~10 ms, so
each second of the run is dozens of upstream cycles (cache refill, store,
evict; LocalAPI session reuse and re-login): an 8 s run holds what a default
gateway (DeviceList TTL 60 s) does in an hour or two, 5 minutes a day or more. Meanwhile clients poll a mix
of everything (fresh and stale hits, misses, /vars with stored-query
aliases, LocalAPI re-logins, gateway sessions, 401/403/404, Start/Stop) and
the PVS fails for a moment every few seconds (stale-if-error, back-off,
recovery). The gateway's RSS after warm-up is compared with its RSS at the end.

CI form: 8 s. Full form (``PVSGW_LONG=1``): 5 minutes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway.settings import DEFAULT_TTLS
from tests.harness import rss_bytes, start_gateway, start_simulator

LONG = os.environ.get("PVSGW_LONG") == "1"
DURATION = 300.0 if LONG else 8.0
TTL = 0.05
TOLERANCE = 4 * 1024 * 1024  # allocator noise; a leak of one object per cycle would exceed it
CLIENTS = 4
TARGETS = [
    "/cgi-bin/dl_cgi?Command=DeviceList",
    "/cgi-bin/dl_cgi/devices/list",
    "/vars?match=livedata&fmt=obj",
    "/vars?name=/sys/info/sw_rev,/sys/info/serialnum&fmt=obj",
    "/vars?match=meter&cache=soak",
    "/vars?cache=soak",
    "/cgi-bin/dl_cgi?Command=Start",
    "/cgi-bin/dl_cgi?Command=Stop",
    "/cgi-bin/dl_cgi/supervisor/info",
    "/api/v1/summary",
    "/vars?set=/sys/x=1",  # 403
    "/nope",  # 404
]

pytestmark = pytest.mark.slow


def test_memory_stays_flat_over_thousands_of_upstream_cycles(tmp_path: Path) -> None:
    sim = start_simulator(tmp_path / "sim", "--firmware", "localapi", "--latency-scale", "0.001", "--clock", "12:00", "--session-ttl", "3")
    gw = start_gateway(
        tmp_path / "gw",
        sim.url,
        {
            "server": {"access_log": "text"},
            "upstream": {
                "firmware": "localapi", "verify_tls": "pin", "min_interval": 0, "timeout": 2,
                "failure_threshold": 2, "backoff_initial": 0.1, "backoff_max": 0.3, "session_max_age": 10,
                "poll": ["DeviceList", "/vars?match=livedata&fmt=obj", "/cgi-bin/dl_cgi/devices/list", "/vars?name=/sys/info/uptime&fmt=obj"],
            },
            "cache": {"default_ttl": TTL, "stale_while_revalidate": 0.1, "max_stale": 30, "ttl": {n: TTL for n in DEFAULT_TTLS}},
            # The wrong keys sent on purpose must not lock the test's own address out.
            "ratelimit": {"auth_failures": "100000000/minute"},
        },
        key_roles={"admin": "admin", "viewer": "viewer", "ha": "viewer", "grafana": "viewer"},
    )
    rss: list[tuple[float, int]] = []
    sent = {"n": 0}
    statuses: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            rss.append((time.monotonic(), rss_bytes(gw.proc.pid)))

    async def client(i: int, deadline: float) -> None:
        name = ["admin", "viewer", "ha", "grafana"][i % 4]
        key = gw.keys[name]
        creds = [
            {"Authorization": f"Bearer {key}"},
            {"X-API-Key": key},
            {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()},
            {"Authorization": f"Bearer {key[:-3]}bad"},  # 401
        ]
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            session = (await c.get("/auth?login", headers=creds[2])).json()["session"]
            n = i
            while time.monotonic() < deadline:
                headers = creds[n % 3] if n % 17 else creds[3]
                if n % 11 == 0:
                    headers = {"Cookie": f"session={session}"}
                r = await c.get(TARGETS[n % len(TARGETS)], headers=headers)
                assert r.status_code in (200, 401, 403, 404, 502, 503), r.text
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                sent["n"] += 1
                n += 1

    async def faults(deadline: float) -> None:
        async with httpx.AsyncClient(base_url=sim.url, verify=False, timeout=5) as c:
            modes = ["error", "down", "garbage", "expire-sessions"]
            k = 0
            while time.monotonic() < deadline - 1:
                await asyncio.sleep(2.0)
                await c.post("/__sim/fault", json={"mode": modes[k % len(modes)], "seconds": 0.3})
                k += 1

    async def run() -> None:
        deadline = time.monotonic() + DURATION
        await asyncio.gather(*(client(i, deadline) for i in range(CLIENTS)), faults(deadline))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sim.reset()
        started = time.monotonic()
        sampler.start()
        asyncio.run(run())
        stop.set()
        sampler.join()
        stats = sim.stats()
        with gw.client() as c:
            r = c.get("/stats")
            assert r.status_code == 200, r.text
            gw_stats = r.json()
            assert c.get("/healthz").status_code == 200
        assert gw.proc.poll() is None
    finally:
        stop.set()
        gw.stop()
        sim.stop()
    # Warm-up: the first quarter (imports, caches filled, TLS and pools set up).
    warm_end = started + DURATION / 4
    after_warmup = [v for t, v in rss if warm_end <= t < warm_end + DURATION / 4]
    at_end = [v for t, v in rss if t >= started + DURATION * 3 / 4]
    warm, end = statistics.median(after_warmup), statistics.median(at_end)
    cycles = stats["total"]
    device_lists = stats["by_request"].get("DeviceList", 0)
    hours = device_lists * DEFAULT_TTLS["DeviceList"] / 3600
    print(
        f"\nsoak figures: {DURATION:.0f} s, {sent['n']} client requests, {cycles} upstream requests "
        f"({device_lists} DeviceList = {hours:.1f} h of polling at the default 60 s TTL), "
        f"RSS after warm-up {warm / 2**20:.1f} MB, at end {end / 2**20:.1f} MB, growth {(end - warm) / 2**20:+.2f} MB; "
        f"cache {gw_stats['cache']['entries']} entries, upstream errors {gw_stats['upstream']['errors']}; statuses {statuses}"
    )
    assert statuses.get(200, 0) > sent["n"] * 0.6, statuses
    assert cycles >= 30 * DURATION, cycles  # hundreds a second: thousands in the full form
    assert end - warm <= TOLERANCE, (warm, end, rss)
