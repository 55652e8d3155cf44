"""Issue 7: what checking a rate limit costs a cached hit, measured side by side.

Runs one after another cannot resolve a few percent on this host: its speed
drifts by ±10% within seconds (an A/A pair of 1 s runs of one gateway
spread from -16% to +8%). So the two variants run *at the same time*, on the
same core, each under its own wrk: whatever slows the core slows both, and
the cost is 1 - (requests per CPU-second with limits) / (without), the CPU
time read from /proc for each process over the same interval.

Two processes of each variant (with, without, with, without) cancel the
order in which they were started, which moves a process by about 1%; the
A/A ratios of the two pairs report that, the instrument's own noise. wrk
starts in a rotated order each round.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from bench import servers, wrk
from bench.common import Proc, cpu_seconds, median

CACHE = {"cache": {"ttl": {"DeviceList": 3600}}}
VARIANTS = {
    "limits": CACHE,  # as benchmarked elsewhere: limits checked on every request, raised so they never trip
    "nolimit": {**CACHE, "ratelimit": {"per_caller": "off", "per_ip": "off", "auth_failures": "off"}},
}


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = len(ordered) // 4
    return {"median": median(values), "q1": ordered[q], "q3": ordered[-1 - q]}


def run(work: Path, upstream_url: str, *, rounds: int, duration: float, connections: int = 16, log: Any = print) -> dict[str, Any]:
    procs: list[tuple[Proc, Path]] = []
    for i, variant in enumerate(["limits", "nolimit", "limits", "nolimit"]):
        p = servers.gateway(work / f"{variant}{i}", upstream_url, VARIANTS[variant], name=f"{variant}{i}")
        procs.append((p, wrk.script(work / f"{variant}{i}.lua", servers.auth_headers(p))))
    try:
        for p, lua in procs:  # fills each cache, and warms each process
            wrk.run(p.url + servers.DEVICE_LIST, lua, connections=connections, duration=2.0)
        costs: list[float] = []
        same_limits: list[float] = []
        same_nolimit: list[float] = []
        per_cpu_s: list[list[float]] = []
        for r in range(rounds):
            rate = _round(procs[r % 4 :] + procs[: r % 4], procs, connections, duration)
            per_cpu_s.append(rate)
            costs.append(1 - (rate[0] + rate[2]) / (rate[1] + rate[3]))
            same_limits.append(1 - rate[0] / rate[2])
            same_nolimit.append(1 - rate[1] / rate[3])
            log(f"  round {r + 1}/{rounds}: requests per CPU-second {' '.join(f'{x:6.0f}' for x in rate)}"
                f" -> limits cost {costs[-1]:+.1%} (A/A {same_limits[-1]:+.1%}, {same_nolimit[-1]:+.1%})")
    finally:
        for p, _ in procs:
            p.stop()
    return {
        "rounds": rounds, "duration_s": duration, "connections": connections,
        "requests_per_cpu_s": per_cpu_s, "costs": costs, "cost": _spread(costs),
        "aa_limits": _spread(same_limits), "aa_nolimit": _spread(same_nolimit),
    }


def _round(order: list[tuple[Proc, Path]], procs: list[tuple[Proc, Path]], connections: int, duration: float) -> list[float]:
    """All four loaded at once; requests per CPU-second of each, in ``procs`` order."""
    results: dict[int, dict[str, Any]] = {}
    before = {p.pid: cpu_seconds(p.pid) for p, _ in procs}

    def load(p: Proc, lua: Path) -> None:
        results[p.pid] = wrk.run(p.url + servers.DEVICE_LIST, lua, connections=connections, duration=duration)

    threads = [threading.Thread(target=load, args=pair) for pair in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rates = []
    for p, _ in procs:
        cpu = cpu_seconds(p.pid) - before[p.pid]
        r = results[p.pid]
        if r["error_count"] or cpu <= 0:
            raise RuntimeError(f"{p.name}: {r['error_count']} errors, {cpu:.2f} CPU-seconds in a round")
        rates.append(r["requests"] / cpu)
    return rates
