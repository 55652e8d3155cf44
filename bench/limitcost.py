"""Issue 7: what checking a rate limit costs a cached hit, measured side by side.

Runs one after another cannot resolve a few percent on this host: its speed
drifts by ±10% within seconds (an A/A pair of 1 s runs of one gateway
spread from -16% to +8%). So the two variants run *at the same time*, on the
same core, each under its own wrk: whatever slows the core slows both, and
the cost is 1 - (requests per CPU-second with limits) / (without), the CPU
time read from /proc for each process over the same interval.

Each round starts four fresh processes, two of each variant, in the order
with, without, without, with (and the mirror order the next round): one
process differs from another of the same code by about 1% for the whole of
its life (memory layout, hash seed), and the order processes start in moves
them too. Kept across rounds, four processes gave A/A "costs" of +0.3% and
+1.1% in two runs; fresh ones average that out. The verdict uses the mean
cost over the rounds and its 95% bootstrap interval.

What "not measurably" can mean here: the gateway's own throughput runs
(``throughput.py``) spread by one to several percent, so a cost under 1%
does not show in them; this instrument resolves a few tenths of a percent,
and from run to run its mean moves by about as much as its interval is wide
(four runs of the final code: +0.10% to +0.68%). The verdict is met when the interval's
upper end is at most 1%; it says nothing when the interval is wider than
±1% (``--quick``).
"""

from __future__ import annotations

import random
import statistics
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
BOUND = 0.01  # a cost below this cannot show in any throughput figure of the bench


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = len(ordered) // 4
    return {"median": median(values), "q1": ordered[q], "q3": ordered[-1 - q]}


def mean_interval(values: list[float], level: float = 0.95, resamples: int = 10000) -> dict[str, float]:
    """The mean of ``values`` and its percentile-bootstrap interval (seeded: the same data, the same interval)."""
    rng = random.Random(7)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return {"mean": statistics.fmean(values), "low": means[tail], "high": means[-1 - tail]}


def within_bound(interval: dict[str, float]) -> bool | None:
    """Whether the cost is at most ``BOUND`` with 95% confidence; None when the interval is too wide to tell."""
    if (interval["high"] - interval["low"]) / 2 > BOUND:
        return None
    return interval["high"] <= BOUND


def run(work: Path, upstream_url: str, *, rounds: int, duration: float, connections: int = 16, log: Any = print) -> dict[str, Any]:
    costs: list[float] = []
    same_limits: list[float] = []
    same_nolimit: list[float] = []
    per_cpu_s: list[dict[str, float]] = []
    for r in range(rounds):
        order = ["limits", "nolimit", "nolimit", "limits"] if r % 2 == 0 else ["nolimit", "limits", "limits", "nolimit"]
        rate = _round(work, upstream_url, order, r, connections, duration)
        per_cpu_s.append(rate)
        first = {v: rate[f"{v}{order.index(v)}"] for v in VARIANTS}
        second = {v: rate[f"{v}{3 - order.index(v)}"] for v in VARIANTS}
        costs.append(1 - (first["limits"] + second["limits"]) / (first["nolimit"] + second["nolimit"]))
        same_limits.append(1 - first["limits"] / second["limits"])
        same_nolimit.append(1 - first["nolimit"] / second["nolimit"])
        log(f"  round {r + 1}/{rounds}: requests per CPU-second {' '.join(f'{k}={v:.0f}' for k, v in rate.items())}"
            f" -> limits cost {costs[-1]:+.1%} (A/A {same_limits[-1]:+.1%}, {same_nolimit[-1]:+.1%})")
    return {
        "rounds": rounds, "duration_s": duration, "connections": connections,
        "requests_per_cpu_s": per_cpu_s, "costs": costs, "cost": _spread(costs), "mean_cost": mean_interval(costs),
        "aa_limits": _spread(same_limits), "aa_nolimit": _spread(same_nolimit),
    }


def _round(work: Path, upstream_url: str, order: list[str], r: int, connections: int, duration: float) -> dict[str, float]:
    """Four fresh processes loaded at once; requests per CPU-second of each, by variant and place."""
    procs: list[tuple[str, Proc, Path]] = []
    try:
        for i, variant in enumerate(order):
            # A name of its own each round: the launcher finds the port in the process's log.
            p = servers.gateway(work / f"slot{i}", upstream_url, VARIANTS[variant], name=f"{variant}{i}-round{r}")
            procs.append((f"{variant}{i}", p, wrk.script(work / f"slot{i}.lua", servers.auth_headers(p))))
        _load_all(procs, connections, 2.0)  # fills each cache, and warms each process
        before = {p.pid: cpu_seconds(p.pid) for _, p, _ in procs}
        results = _load_all(procs, connections, duration)
        rates = {}
        for name, p, _ in procs:
            cpu = cpu_seconds(p.pid) - before[p.pid]
            got = results[name]
            if got["error_count"] or cpu <= 0:
                raise RuntimeError(f"{name}: {got['error_count']} errors, {cpu:.2f} CPU-seconds in a round")
            rates[name] = got["requests"] / cpu
        return rates
    finally:
        for _, p, _ in procs:
            p.stop()


def _load_all(procs: list[tuple[str, Proc, Path]], connections: int, duration: float) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}

    def load(name: str, p: Proc, lua: Path) -> None:
        results[name] = wrk.run(p.url + servers.DEVICE_LIST, lua, connections=connections, duration=duration)

    threads = [threading.Thread(target=load, args=triple) for triple in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [name for name, _, _ in procs if name not in results]
    if missing:
        raise RuntimeError(f"wrk gave no result for {', '.join(missing)}")
    return results
