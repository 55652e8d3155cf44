"""Cached-hit throughput and latency over HTTPS with an API key, side by side.

Targets, all in front of (or standing in for) the same fast static upstream
(nginx answering the DeviceList bytes, on the load generator's core):

- ``gateway``: pvs-gateway as a user runs it (self-signed TLS, API key,
  access log to a file, rate limits checked on every request but raised so
  they never trip), cache warm (DeviceList TTL 1 h, so every request is a hit);
- ``bare``: a bare Starlette app returning the same bytes on stock uvicorn
  with the same protocol implementation and loop (h11, asyncio), the same
  TLS profile and certificate (bench/bare_app.py): the reference, what the
  stack costs without the gateway's own work;
- ``bare-headers``: the same bare app adding the headers a gateway cache hit
  carries (security headers, ``Cache-Status``, ``RateLimit``, ...; taken from
  the gateway's answer): the same HTTP work per answer, so gateway ÷
  bare-headers is the cost of the gateway's own Python alone (reported);
- ``caddy``: the seed guide's bridge (``reverse_proxy``, ``tls internal``), no cache;
- ``nginx-proxy``: nginx as a plain TLS reverse proxy (pass-through, no cache);
- ``nginx``: ``proxy_cache`` in front of the upstream, TLS with the gateway's certificate.

Every server under test runs on one core (CPU 1; Go with GOMAXPROCS=1,
nginx with one worker); wrk (one thread) and the upstream share the other.
Runs are interleaved across targets (run 1 of every target, then run 2, ...)
so that background noise on the machine spreads over all of them. CPU time
of the server (user + system, from /proc) over each run gives requests per
CPU-second, which other work on the machine disturbs less than req/s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench import churn, servers, wrk
from bench.common import (
    SUT_CPUS,
    Proc,
    Sampler,
    cpu_busy_seconds,
    cpu_seconds,
    get,
    hwm_mb,
    median,
    rss_mb,
)

DESCRIPTIONS = {
    "gateway": "pvs-gateway: TLS, API key, rate limits on, access log to a file, cache hit",
    "bare": "bare uvicorn + Starlette, same bytes, same protocol (h11), loop (asyncio) and TLS profile: the reference",
    "bare-headers": "the bare app adding the response headers of a gateway cache hit: the same HTTP work per answer",
    "caddy": "Caddy `reverse_proxy` + `tls internal` (seed guide), pass-through to the static upstream",
    "nginx-proxy": "nginx `proxy_pass` + TLS, pass-through to the static upstream (no cache)",
    "nginx": "nginx `proxy_cache` + TLS, cache hit",
}


def start_targets(work: Path, upstream: Proc, body_file: Path) -> dict[str, Proc]:
    targets: dict[str, Proc] = {}
    targets["gateway"] = servers.gateway(work / "gateway", upstream.url, {"cache": {"ttl": {"DeviceList": 3600}}})
    cert, key = targets["gateway"].extra["cert"], targets["gateway"].extra["keyfile"]
    targets["bare"] = servers.bare(work / "bare", body_file, cert, key)
    targets["bare-headers"] = servers.bare(work / "bare-headers", body_file, cert, key, name="bare-headers",
                                           headers_file=gateway_headers(work, targets["gateway"]))
    targets["caddy"] = servers.caddy(work / "caddy", upstream.url)
    targets["nginx-proxy"] = servers.nginx_proxy(work / "nginx-proxy", upstream.url, cert, key)
    targets["nginx"] = servers.nginx_cache(work / "nginx", upstream.url, cert, key)
    return targets


def gateway_headers(work: Path, gw: Proc) -> Path:
    """The headers of a gateway cache hit, less those every answer has, as JSON for bench/bare_app.py."""
    get(gw.url + servers.DEVICE_LIST, servers.auth_headers(gw))
    _, headers, _ = get(gw.url + servers.DEVICE_LIST, servers.auth_headers(gw))
    extra = {k: v for k, v in headers.items() if k not in ("content-type", "content-length", "connection")}
    path = work / "gateway-headers.json"
    path.write_text(json.dumps(extra))
    return path


def warm(name: str, p: Proc) -> dict[str, Any]:
    """One request to fill the cache; check it is answered from the cache afterwards."""
    headers = servers.auth_headers(p) if "key" in p.extra else {}
    url = p.url + servers.DEVICE_LIST
    status, _, body = get(url, headers)
    status2, h2, body2 = get(url, headers)
    if status != 200 or status2 != 200 or body2 != body:
        raise RuntimeError(f"{name}: warm-up got {status}/{status2}")
    info: dict[str, Any] = {"body_bytes": len(body2), "cache_status": h2.get("cache-status", "")}
    if name.startswith("gateway") and "hit" not in info["cache_status"]:
        raise RuntimeError(f"{name}: second request was not a cache hit: {info['cache_status']!r}")
    time.sleep(1.0)
    info["idle_warm_rss_mb"] = rss_mb(p.pid)
    return info


def measure(p: Proc, lua: Path, connections: int, duration: float) -> dict[str, Any]:
    c0, b0 = cpu_seconds(p.pid), cpu_busy_seconds(SUT_CPUS)
    with Sampler(p.pid) as s:
        r = wrk.run(p.url + servers.DEVICE_LIST, lua, connections=connections, duration=duration)
    cpu = cpu_seconds(p.pid) - c0
    busy = cpu_busy_seconds(SUT_CPUS) - b0
    secs = r["duration_us"] / 1e6
    r["sut_cpu_s"] = cpu
    r["sut_cpu_util"] = cpu / secs if secs else 0.0
    # Other processes on the server's core during the run (the machine may be shared): noise.
    r["other_on_sut_core"] = max(0.0, busy - cpu) / secs if secs else float("nan")
    r["requests_per_cpu_s"] = r["requests"] / cpu if cpu else 0.0
    r["max_rss_mb"] = s.max_rss_mb
    return r


NOISY = 0.15  # a run during which other processes took more than this share of the server's core is redone once


class Retries:
    """A bounded budget of re-runs for runs spoiled by other work on the server's core (the machine may be shared)."""

    def __init__(self, budget: int) -> None:
        self.left = budget
        self.used = 0

    def measure(self, p: Proc, lua: Path, connections: int, duration: float) -> dict[str, Any]:
        r = measure(p, lua, connections, duration)
        if r["other_on_sut_core"] > NOISY and self.left > 0:
            self.left -= 1
            self.used += 1
            again = measure(p, lua, connections, duration)
            again["redone_because_other_on_sut_core"] = r["other_on_sut_core"]
            if again["other_on_sut_core"] < r["other_on_sut_core"]:
                r = again
        return r


def run(work: Path, upstream: Proc, body_file: Path, *, connections: list[int], runs: int, duration: float,
        warmup: float, paced_delay_ms: int, retry_budget: int = 0, churn_connections: int = 300,
        log: Any = print) -> dict[str, Any]:
    targets = start_targets(work, upstream, body_file)
    key = targets["gateway"].extra["key"]
    # Every target gets the same request, API key included (non-gateways ignore it; each gateway gets its own key).
    scripts: dict[str, tuple[Path, Path]] = {}
    for name, p in targets.items():
        headers = {"Authorization": f"Bearer {p.extra.get('key', key)}"}
        scripts[name] = (wrk.script(work / f"{name}.lua", headers),
                         wrk.script(work / f"{name}-paced.lua", headers, delay_ms=paced_delay_ms))
    result: dict[str, Any] = {"targets": {}, "connections": connections, "runs": runs, "duration_s": duration,
                              "warmup_s": warmup, "paced_delay_ms": paced_delay_ms, "descriptions": DESCRIPTIONS}
    for name, p in targets.items():
        result["targets"][name] = {"warm": warm(name, p), "runs": {str(c): [] for c in connections}, "pid": p.pid}

    retries = Retries(retry_budget)
    for c in connections:
        for name, p in targets.items():
            wrk.run(p.url + servers.DEVICE_LIST, scripts[name][0], connections=c, duration=warmup)
        for i in range(runs):
            for name, p in targets.items():
                r = retries.measure(p, scripts[name][0], c, duration)
                result["targets"][name]["runs"][str(c)].append(r)
                log(f"  {name:14} c={c:<3} run {i + 1}/{runs}: {r['rps']:8.0f} req/s  p50 {r['latency_us']['p50'] / 1000:6.2f} ms"
                    f"  p99 {r['latency_us']['p99'] / 1000:6.2f} ms  cpu {r['sut_cpu_util']:.0%} (wrk {r['wrk_cpu_util']:.0%})  others on its core {r['other_on_sut_core']:.0%}"
                    f"  errors {r['error_count']}")

    # Light load: every connection waits paced_delay_ms between requests, so latency is service time, not queueing.
    for name, p in targets.items():
        r = retries.measure(p, scripts[name][1], 16, duration)
        result["targets"][name]["paced"] = r
        log(f"  {name:14} paced c=16: {r['rps']:8.0f} req/s  p50 {r['latency_us']['p50'] / 1000:6.2f} ms  p99 {r['latency_us']['p99'] / 1000:6.2f} ms"
            f"  others on its core {r['other_on_sut_core']:.0%}")

    result["retry_budget"] = retry_budget
    result["retries_used"] = retries.used
    for name, p in targets.items():
        t = result["targets"][name]
        t["peak_rss_mb"] = hwm_mb(p.pid)
        t["rss_after_runs_mb"] = rss_mb(p.pid)
        t["summary"] = {str(c): summarize(t["runs"][str(c)]) for c in connections}
        if not p.alive():
            t["died"] = p.log()[-2000:]
    # Last, as it leaves memory behind: connections closed before the answer was read.
    result["aborted_connections"] = churn.run(targets, churn_connections, log=log)
    for p in targets.values():
        p.stop()
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rps": median([r["rps"] for r in runs]),
        "rps_min": min(r["rps"] for r in runs),
        "rps_max": max(r["rps"] for r in runs),
        "p50_ms": median([r["latency_us"]["p50"] / 1000 for r in runs]),
        "p99_ms": median([r["latency_us"]["p99"] / 1000 for r in runs]),
        "p999_ms": median([r["latency_us"]["p999"] / 1000 for r in runs]),
        "sut_cpu_util": median([r["sut_cpu_util"] for r in runs]),
        "other_on_sut_core": median([r["other_on_sut_core"] for r in runs]),
        "wrk_cpu_util": median([r["wrk_cpu_util"] for r in runs]),
        "requests_per_cpu_s": median([r["requests_per_cpu_s"] for r in runs]),
        "max_rss_mb": max(r["max_rss_mb"] for r in runs),
        "errors": sum(r["error_count"] for r in runs),
        "bytes_per_response": median([r["bytes_per_response"] for r in runs]),
    }
