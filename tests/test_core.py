"""Core: GET-only, allowlisted proxying, proven by what the simulator saw."""

from __future__ import annotations

import httpx
import pytest

from tests.harness import Gateway, Simulator

# Every request a fresh miss, so each allowed one reaches the PVS exactly once.
NO_CACHE = {"cache": {"default_ttl": 0, "stale_while_revalidate": 0, "ttl": {"DeviceList": 0}}}

FORBIDDEN_TARGETS = [
    "/cgi-bin/dl_cgi?Command=GridProfileRefresh",
    "/cgi-bin/dl_cgi?Command=SetCellPurchased",
    "/cgi-bin/dl_cgi?Command=GridProfile",
    "/cgi-bin/dl_cgi?command=DeviceList",
    "/cgi-bin/dl_cgi?COMMAND=DeviceList",
    "/cgi-bin/dl_cgi?Command=DeviceList&Command=GridProfileRefresh",
    "/cgi-bin/dl_cgi?Command=DeviceList&command=Start",
    "/cgi-bin/dl_cgi?Command=DeviceList&extra=1",
    "/cgi-bin/dl_cgi?Command=Get_Comm&SerialNumber=../../etc",
    "/cgi-bin/dl_cgi/network/interfaceConfig/dhcp/eth",
    "/cgi-bin/dl_cgi/network/interfaceConfig/dhcp/wifi",
    "/cgi-bin/dl_cgi/supervisor/../network/interfaceConfig/dhcp/eth",
    "/cgi-bin/dl_cgi/supervisor/%2e%2e/network/interfaceConfig/dhcp/eth",
    "/cgi-bin/dl_cgi/supervisor%2Finfo",
    "/cgi-bin/dl_cgi//supervisor/info",
    "/cgi-bin/dl_cgi/supervisor/info;x=1",
    "/cgi-bin/dl_cgi/firmware/upgrade",
    "/cgi-bin/dl_cgi/network/ping",
    "/cgi-bin/swagger.json",
    "/vars?set=/sys/telemetryws/enable=1",
    "/vars?name=/sys/info/sw_rev&set=/sys/telemetryws/enable=1",
    "/vars?match=rev&clearcache=x",
    "/vars?SET=/sys/telemetryws/enable=1",
    "/vars?name=/sys/info/wpa_key",
    "/vars?name=/sys/info/sw_rev,/sys/info/wpa_key",
    "/vars?name=/sys/info/../info/wpa_key",
    "/vars?match=rev&match=livedata",
    "/vars?tags=x",
    "/vars",
    "/auth?login&x=1",
]


def test_non_get_methods_get_405_on_every_path_and_reach_nothing(fresh_simulator: Simulator, make_gateway) -> None:
    gw: Gateway = make_gateway(fresh_simulator.url, NO_CACHE)
    with gw.client() as c, gw.client(key=None) as anon:
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"):
            for path in ("/cgi-bin/dl_cgi?Command=DeviceList", "/vars?name=/sys/info/sw_rev", "/healthz", "/nope", "/"):
                for client in (c, anon):
                    r = client.request(method, path, content=b"set=/sys/telemetryws/enable=1")
                    assert r.status_code == 405, (method, path, r.status_code)
                    assert r.headers["allow"] == "GET, HEAD"
                    assert r.headers["content-type"] == "application/problem+json"
        hint = c.post("/vars", content=b"name=/sys/info/sw_rev").json()["detail"]
        assert "GET /vars?name=" in hint
    assert fresh_simulator.stats()["total"] == 0


def test_forbidden_reads_are_refused_and_never_forwarded(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, NO_CACHE)
    with gw.client() as c:
        for target in FORBIDDEN_TARGETS:
            r = c.get(target)
            assert r.status_code in (400, 403, 404), (target, r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["detail"], target
            # A body on a GET is refused too, even on an allowed read.
        r = c.request("GET", "/cgi-bin/dl_cgi?Command=DeviceList", content=b"x=1")
        assert r.status_code == 400
    stats = fresh_simulator.stats()
    assert stats["total"] == 0, fresh_simulator.requests()


def test_device_list_reaches_the_pvs_once_per_request(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, NO_CACHE)
    with gw.client() as c:
        for _ in range(3):
            r = c.get("/cgi-bin/dl_cgi?Command=DeviceList")
            assert r.status_code == 200
            body = r.json()
            assert body["result"] == "succeed"
            assert any(d["DEVICE_TYPE"] == "PVS" for d in body["devices"])
    stats = fresh_simulator.stats()
    assert stats["by_request"].get("DeviceList") == 3
    assert stats["total"] == 3
    assert stats["by_method"] == {"GET": 3}
    # What reached the PVS was the canonical request, nothing the client added.
    assert {r["target"] for r in fresh_simulator.requests()} == {"/cgi-bin/dl_cgi?Command=DeviceList"}


def test_client_credentials_and_cookies_are_not_forwarded(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, NO_CACHE)
    with gw.client(headers={"Cookie": "session=client-secret-cookie", "X-Forwarded-For": "1.2.3.4"}) as c:
        assert c.get("/cgi-bin/dl_cgi/supervisor/info").status_code == 200
    logs = fresh_simulator.log_path.read_text()
    assert "client-secret-cookie" not in logs
    assert gw.keys["admin"] not in logs


def test_start_and_stop_are_answered_by_the_gateway(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, NO_CACHE)
    with gw.client() as c:
        start = c.get("/cgi-bin/dl_cgi?Command=Start").json()
        assert start["result"] == "succeed"
        assert start["supervisor"]["SERIAL"]  # as the PVS answers, even on a cold cache
        assert c.get("/cgi-bin/dl_cgi?Command=Stop").json()["result"] == "succeed"
    # Start and Stop never reach the PVS; the supervisor object is one read-only supervisor/info.
    assert [r["target"] for r in fresh_simulator.requests()] == ["/cgi-bin/dl_cgi/supervisor/info"]


def test_head_is_served_without_a_body(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    with gw.client() as c:
        r = c.head("/cgi-bin/dl_cgi/supervisor/info")
        assert r.status_code == 200
        assert r.content == b""
        assert int(r.headers["content-length"]) > 0


def test_unknown_paths_are_404_problems(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    with gw.client() as c:
        r = c.get("/no/such/thing")
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
    assert fresh_simulator.stats()["total"] == 0


def test_every_answer_carries_security_headers(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    with gw.client() as c, gw.client(key=None) as anon:
        for r in (c.get("/cgi-bin/dl_cgi/supervisor/info"), anon.get("/cgi-bin/dl_cgi/supervisor/info"), c.post("/x"), c.get("/healthz")):
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
            assert "content-security-policy" in r.headers
            assert r.headers.get("x-request-id")


@pytest.mark.parametrize("mode", ["garbage", "headers-in-body", "truncated", "error"])
def test_bad_pvs_answers_become_clear_errors(mode: str, fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, NO_CACHE)
    fresh_simulator.fault(mode)
    with gw.client() as c:
        r = c.get("/cgi-bin/dl_cgi/supervisor/info")
    if mode == "headers-in-body":
        # A real PVS quirk: the gateway skips the stray header block and serves the JSON.
        assert r.status_code == 200, r.text
        assert "supervisor" in r.json()
        return
    assert r.status_code == 502, (mode, r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["proxy-status"].startswith("pvs-gateway; error=")
    assert r.json()["detail"]
    with gw.client() as c:
        assert c.get("/healthz").status_code == 200  # the gateway is still up


def test_localapi_match_root_never_returns_the_wifi_password(make_simulator, make_gateway) -> None:
    sim = make_simulator("--firmware", "localapi", "--latency-scale", "0.05")
    gw = make_gateway(sim.url, {"upstream": {"firmware": "auto", "verify_tls": "pin"}})
    with gw.client() as c:
        for query in ("match=/&fmt=obj", "match=/", "match=info&fmt=obj", "match=wpa", "match=/sys/info/"):
            r = c.get(f"/vars?{query}")
            assert r.status_code in (200, 400), (query, r.text)
            assert "wpa_key" not in r.text, query
        r = c.get("/vars?match=/&fmt=obj")
        assert "/sys/info/serialnum" in r.json()
    with httpx.Client(base_url=sim.url, verify=False) as direct:
        wpa_key = direct.get("/__sim/vars", params={"name": "/sys/info/wpa_key"}).json()["value"]
    assert len(wpa_key) >= 8
    assert wpa_key not in gw.logs()
