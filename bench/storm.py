"""The storm (issue 3): many callers polling many reads; how much reaches the PVS?

Two simulators with realistic latency (DeviceList ~0.5 s at scale 0.05,
two request slots, reboots after repeated overload). One sits behind the
gateway, the other behind the seed guide's pass-through bridge (Caddy
``reverse_proxy``, ``tls internal``). The same callers (HTTPS, keep-alive,
back-to-back requests cycling through the reads) storm each for the same
time; the simulator's ``/__sim/stats`` counts what reached the device.

Bound for the gateway: each resource at most once per TTL plus its cold
fill, and upstream starts at least ``min_interval`` apart:
``min(resources * (ceil(T / ttl) + 1), ceil(T / min_interval) + 1)``.
"""

from __future__ import annotations

import asyncio
import http.client
import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench import servers
from bench.common import Proc, get

TARGETS = [
    "/cgi-bin/dl_cgi?Command=DeviceList",
    "/cgi-bin/dl_cgi?Command=Get_Comm",
    "/cgi-bin/dl_cgi?Command=GridProfileGet",
    "/cgi-bin/dl_cgi?Command=CheckFW",
    "/cgi-bin/dl_cgi/supervisor/info",
    "/cgi-bin/dl_cgi/devices/list",
    "/cgi-bin/dl_cgi/network/interfaces",
    "/cgi-bin/dl_cgi/communication/interfaces",
]
RESOURCES = ["DeviceList", "Get_Comm", "GridProfileGet", "CheckFW", "supervisor/info", "devices/list",
             "network/interfaces", "communication/interfaces"]
SIM_ARGS = ("--latency-scale", "0.05", "--clock", "12:00", "--seed", "7")


def sim_post(sim: Proc, path: str, body: bytes = b"{}") -> None:
    hostport = sim.url.split("://", 1)[1]
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        conn.getresponse().read()
    finally:
        conn.close()


def sim_stats(sim: Proc) -> dict[str, Any]:
    import json

    status, _, body = get(sim.url + "/__sim/stats")
    assert status == 200, status
    return dict(json.loads(body))


async def _storm(url: str, headers: dict[str, str], callers: int, duration: float, timeout: float) -> dict[str, Any]:
    codes: dict[str, int] = {}
    sent = 0
    errors: dict[str, int] = {}

    async def caller(i: int, deadline: float) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=url, verify=False, headers=headers, timeout=timeout) as c:
            n = i
            while time.monotonic() < deadline:
                sent += 1
                try:
                    r = await c.get(TARGETS[n % len(TARGETS)])
                    codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                n += 1

    deadline = time.monotonic() + duration
    start = time.monotonic()
    tasks = [asyncio.create_task(caller(i, deadline)) for i in range(callers)]
    _, pending = await asyncio.wait(tasks, timeout=duration + timeout + 5)
    for t in pending:
        t.cancel()
    elapsed = time.monotonic() - start
    return {"caller_requests": sent, "status": codes, "errors": errors, "elapsed_s": elapsed}


class Watch:
    """Polls the simulator's /__sim/stats during a storm: when did it go down, and for how long."""

    def __init__(self, sim: Proc, interval: float = 0.25) -> None:
        self.sim = sim
        self.interval = interval
        self.first_down_s: float | None = None
        self.down_samples = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                if sim_stats(self.sim).get("rebooting"):
                    self.down_samples += 1
                    if self.first_down_s is None:
                        self.first_down_s = time.monotonic() - start
                self.samples += 1
            except OSError:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def as_json(self) -> dict[str, Any]:
        return {
            "went_down": self.first_down_s is not None,
            "first_down_after_s": self.first_down_s,
            "down_fraction": self.down_samples / self.samples if self.samples else 0.0,
        }


def storm(url: str, headers: dict[str, str], callers: int, duration: float, sim: Proc, timeout: float = 10.0) -> dict[str, Any]:
    with Watch(sim) as watch:
        result = asyncio.run(_storm(url, headers, callers, duration, timeout))
    result["simulator"] = watch.as_json()
    return result


def run(work: Path, *, callers: int, duration: float, ttl: float, min_interval: float, log: Any = print) -> dict[str, Any]:
    result: dict[str, Any] = {"callers": callers, "duration_s": duration, "ttl_s": ttl, "min_interval_s": min_interval,
                              "targets": TARGETS, "simulator_args": list(SIM_ARGS)}
    per_resource = math.ceil(duration / ttl) + 1
    result["bound"] = min(len(TARGETS) * per_resource, math.ceil(duration / min_interval) + 1)

    # Through the gateway.
    sim = servers.simulator(work / "sim-gateway", "sim-gateway", *SIM_ARGS)
    gw = servers.gateway(
        work / "storm-gateway",
        sim.url,
        {
            "upstream": {"min_interval": min_interval, "max_concurrency": 1},
            "cache": {"default_ttl": ttl, "ttl": {name: ttl for name in RESOURCES}},
        },
        name="storm-gateway",
    )
    sim_post(sim, "/__sim/reset")
    g = storm(gw.url, servers.auth_headers(gw), callers, duration, sim)
    time.sleep(0.5)  # let a refresh begun at the deadline be counted
    g["upstream"] = sim_stats(sim)
    gw.stop()
    sim.stop()
    log(f"  gateway: {g['caller_requests']} caller requests -> {g['upstream']['total']} upstream "
        f"(went down: {g['simulator']['went_down']}, max in flight {g['upstream']['max_in_flight']})")

    # Through the pass-through bridge.
    sim2 = servers.simulator(work / "sim-caddy", "sim-caddy", *SIM_ARGS)
    cd = servers.caddy(work / "storm-caddy", sim2.url, name="storm-caddy")
    sim_post(sim2, "/__sim/fault", b'{"mode": "ok"}')
    sim_post(sim2, "/__sim/reset")
    c = storm(cd.url, {}, callers, duration, sim2)
    time.sleep(0.5)
    c["upstream"] = sim_stats(sim2)
    cd.stop()
    sim2.stop()
    log(f"  caddy:   {c['caller_requests']} caller requests -> {c['upstream']['total']} upstream "
        f"(went down: {c['simulator']['went_down']} after {c['simulator']['first_down_after_s']} s, "
        f"rejected {c['upstream']['rejected']}, dropped {c['upstream']['dropped']})")

    for r in (g, c):
        r["upstream_per_caller_request"] = r["upstream"]["total"] / r["caller_requests"] if r["caller_requests"] else float("nan")
        ok = r["status"].get("200", 0)
        r["ok_fraction"] = ok / r["caller_requests"] if r["caller_requests"] else 0.0
    result["gateway"] = g
    result["passthrough"] = c
    result["ratio_passthrough_to_gateway"] = (
        c["upstream_per_caller_request"] / g["upstream_per_caller_request"] if g["upstream_per_caller_request"] else float("inf")
    )
    return result
