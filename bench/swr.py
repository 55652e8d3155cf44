"""Stale-while-revalidate in steady state: does a caller ever wait for a DeviceList refresh?

A simulator with DeviceList taking ~1 s (latency scale 0.1). DeviceList
callers (wrk, paced) poll the gateway for several TTLs. Three gateways,
one after another, same load:

- ``hit``: TTL 1 h, every answer from memory (the cache-hit level);
- ``swr``: TTL 2 s with stale-while-revalidate (the default window): the
  entry goes stale every ~2 s and is refreshed in the background;
- ``no-swr``: TTL 2 s, ``stale_while_revalidate = 0``: callers wait for each
  refresh (the contrast: what SWR saves).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import servers, wrk
from bench.common import SUT_CPUS, cpu_busy_seconds, cpu_seconds, get, median
from bench.storm import sim_post, sim_stats

SIM_ARGS = ("--latency-scale", "0.1", "--clock", "12:00", "--seed", "7")

VARIANTS: dict[str, dict[str, Any]] = {
    "hit": {"cache": {"ttl": {"DeviceList": 3600}}},
    "swr": {"cache": {"ttl": {"DeviceList": 2}}},  # stale_while_revalidate: the default (300 s)
    "no-swr": {"cache": {"ttl": {"DeviceList": 2}, "stale_while_revalidate": 0}},
}


def run(work: Path, *, duration: float, connections: int, delay_ms: int, log: Any = print) -> dict[str, Any]:
    sim = servers.simulator(work / "sim-swr", "sim-swr", *SIM_ARGS)
    result: dict[str, Any] = {"duration_s": duration, "connections": connections, "delay_ms": delay_ms,
                              "simulator_args": list(SIM_ARGS), "variants": {}}
    # The upstream's own DeviceList latency, measured directly.
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        status, _, _ = get(sim.url + servers.DEVICE_LIST, timeout=30)
        samples.append(time.perf_counter() - t0)
        assert status == 200, status
    result["upstream_devicelist_ms"] = median(samples) * 1000
    for name, overrides in VARIANTS.items():
        gw = servers.gateway(work / f"swr-{name}", sim.url, {"upstream": {"min_interval": 0.0}, **overrides}, name=f"swr-{name}")
        get(gw.url + servers.DEVICE_LIST, servers.auth_headers(gw), timeout=30)  # cold fill
        lua = wrk.script(work / f"swr-{name}.lua", servers.auth_headers(gw), delay_ms=delay_ms)
        for attempt in range(2):  # redone once when other processes crowded the gateway's core
            sim_post(sim, "/__sim/reset")
            c0, b0 = cpu_seconds(gw.pid), cpu_busy_seconds(SUT_CPUS)
            r = wrk.run(gw.url + servers.DEVICE_LIST, lua, connections=connections, duration=duration)
            secs = r["duration_us"] / 1e6
            r["other_on_sut_core"] = max(0.0, (cpu_busy_seconds(SUT_CPUS) - b0) - (cpu_seconds(gw.pid) - c0)) / secs
            r["attempt"] = attempt + 1
            time.sleep(0.2)
            r["upstream_devicelist_requests"] = sim_stats(sim)["by_request"].get("DeviceList", 0)
            if not r["other_on_sut_core"] > 0.15:
                break
        gw.stop()
        result["variants"][name] = r
        log(f"  {name:7} {r['requests']:6} requests, p50 {r['latency_us']['p50'] / 1000:7.2f} ms, p99 {r['latency_us']['p99'] / 1000:7.2f} ms, "
            f"max {r['latency_us']['max'] / 1000:7.1f} ms, {r['upstream_devicelist_requests']} upstream refreshes, errors {r['error_count']}, "
            f"others on its core {r['other_on_sut_core']:.0%}")
    sim.stop()
    return result
