"""Liveness and readiness, as an orchestrator or a power-cycling automation sees them."""

from __future__ import annotations

import time

import httpx

from tests.harness import Simulator


def test_healthz_needs_no_credentials_and_readyz_probes_an_idle_pvs_once(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    first = httpx.get(gw.url + "/readyz")
    assert first.status_code == 200, first.text  # an idle gateway probes, then says ready
    body = first.json()
    assert body["ready"] is True and body["upstream"]["consecutive_failures"] == 0
    for _ in range(30):
        assert httpx.get(gw.url + "/readyz").status_code == 200
    assert fresh_simulator.stats()["total"] == 1, "hammering /readyz must not hammer the PVS"


def test_readyz_turns_503_when_the_pvs_is_gone_too_long(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"cache": {"max_stale": 2, "ttl": {"supervisor/info": 0.5}}, "upstream": {"failure_threshold": 1}})
    assert httpx.get(gw.url + "/readyz").status_code == 200
    fresh_simulator.fault("down")
    time.sleep(2.3)
    with gw.client() as c:
        c.get("/cgi-bin/dl_cgi/supervisor/info")  # fails upstream: counted
    r = httpx.get(gw.url + "/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["upstream"]["consecutive_failures"] >= 1
    assert r.json()["upstream"]["last_error"]
    assert httpx.get(gw.url + "/healthz").status_code == 200  # alive all the same
