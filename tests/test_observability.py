"""Metrics and the normalized data API, checked against the simulator's truth over real sockets."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import normalize
from tests.harness import Gateway, Simulator

SITE = ("--latency-scale", "0.05", "--clock", "12:00", "--seed", "11")
# Short TTLs so a read that straddles the simulator's 60 s data interval can be retried quickly.
SHORT_TTL = {"cache": {"ttl": {"DeviceList": 3, "vars": 3}}}
KW = 1e-4  # the device's precision


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.25) -> Any:
    """``check()`` once it returns something truthy (it may raise AssertionError meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(interval)


def scrape(gw: Gateway, key: str = "admin") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with gw.client(key) as c:
        r = c.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


@pytest.fixture
def foreign_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not UTC on purpose: DATATIME carries no zone and both ends must read it as UTC whatever
    # the machine's zone (the simulator once wrote local time and the tests pinned TZ=UTC).
    monkeypatch.setenv("TZ", "America/Los_Angeles")


# ---------------------------------------------------------------- /metrics


def site_daylight(sim: Simulator) -> bool:
    site = sim.site()
    return bool(site["daylight"] and site["production_kw"] > 0)


def test_metrics_production_equals_the_simulators_production_meter(foreign_zone: None, make_simulator, make_gateway) -> None:
    sim: Simulator = make_simulator(*SITE)
    gw = make_gateway(sim.url, SHORT_TTL)

    def consistent() -> bool:
        found = scrape(gw)  # a scrape never waits for the PVS: the first ones start a background fetch
        site = sim.site()
        if metric(found, "pvsgw_solar_data_timestamp_seconds") != site["data_epoch"]:
            return False  # nothing cached yet, or the simulator moved on to its next data interval
        production = metric(found, "pvsgw_meter_power_watts", meter="production", serial=site["meters"]["production"])
        assert production == pytest.approx(site["production_kw"] * 1000, abs=KW * 1000)
        assert metric(found, "pvsgw_production_power_watts") == pytest.approx(site["production_kw"] * 1000, abs=0.1)
        assert metric(found, "pvsgw_consumption_power_watts") == pytest.approx(site["consumption_kw"] * 1000, abs=0.1)
        assert metric(found, "pvsgw_net_power_watts") == pytest.approx(site["net_kw"] * 1000, abs=0.1)
        joules = metric(found, "pvsgw_production_energy_joules_total")
        assert joules == pytest.approx(site["production_kwh"] * 3.6e6, abs=3.6e6 * KW)
        for inv in site["inverters"]:
            assert metric(found, "pvsgw_inverter_power_watts", serial=inv["serial"]) == pytest.approx(inv["p_kw"] * 1000, abs=0.1)
            assert metric(found, "pvsgw_inverter_working", serial=inv["serial"]) == 1.0
            assert metric(found, "pvsgw_inverter_temperature_celsius", serial=inv["serial"]) is not None
        assert metric(found, "pvsgw_pvs_uptime_seconds") is not None
        assert metric(found, "pvsgw_pvs_cpu_load") is not None
        assert metric(found, "pvsgw_pvs_flash_available_bytes") is not None
        return True

    assert site_daylight(sim)
    eventually(consistent)


def test_gateway_metrics_cover_requests_cache_upstream_and_limits(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    with gw.client("viewer") as c:
        assert c.get("/cgi-bin/dl_cgi?Command=DeviceList").status_code == 200
        assert c.get("/cgi-bin/dl_cgi?Command=DeviceList").status_code == 200
        # Arbitrary paths must not become label values (cardinality): they count as "other".
        assert c.get("/no/such/path-abc123").status_code == 404
    with gw.client(None) as anon:
        assert anon.get("/api/v1/summary").status_code == 401
    with gw.client("admin") as c:
        text = c.get("/metrics").text
    assert "abc123" not in text
    found = samples(text)
    dl = "/cgi-bin/dl_cgi"
    assert metric(found, "pvsgw_http_requests_total", route=dl, status="200", role="viewer") == 2
    assert metric(found, "pvsgw_http_requests_total", route="other", status="404", role="viewer") == 1
    assert metric(found, "pvsgw_http_requests_total", route="/api/v1/summary", status="401", role="none") == 1
    assert metric(found, "pvsgw_http_request_duration_seconds_count", route=dl) == 2
    assert metric(found, "pvsgw_cache_lookups_total", result="miss") == 1
    assert metric(found, "pvsgw_cache_lookups_total", result="hit") == 1
    assert metric(found, "pvsgw_upstream_requests_total", resource="DeviceList", status="200") == 1
    assert metric(found, "pvsgw_upstream_request_duration_seconds_count", resource="DeviceList") == 1
    assert metric(found, "pvsgw_upstream_consecutive_failures") == 0
    assert metric(found, "pvsgw_upstream_last_success_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    assert metric(found, "pvsgw_pvs_reboots_noticed_total") == 0
    assert metric(found, "pvsgw_build_info", version=__import__("gateway").__version__) == 1
    assert metric(found, "pvsgw_tls_certificate_expiry_timestamp_seconds") is None  # tls = "off" here
    routes = {labels[1][1] for (name, labels) in found if name == "pvsgw_http_requests_total"}
    assert routes <= {dl, "other", "/api/v1/summary", "/metrics"}


def test_metrics_report_upstream_errors_and_no_solar_data_while_nothing_is_cached(fresh_simulator: Simulator, make_gateway) -> None:
    fresh_simulator.fault("down")
    gw = make_gateway(fresh_simulator.url, {"upstream": {"failure_threshold": 1, "backoff_initial": 30, "backoff_max": 60}})
    started = time.monotonic()
    found = scrape(gw)  # starts the one background fetch; answers at once
    assert time.monotonic() - started < 2
    assert not any(name.startswith(("pvsgw_production", "pvsgw_meter_", "pvsgw_inverter_")) for name, _ in found)

    def failure_counted() -> bool:
        found = scrape(gw)
        errors = {labels: v for (name, labels), v in found.items() if name == "pvsgw_upstream_errors_total"}
        return bool(errors) and metric(found, "pvsgw_upstream_consecutive_failures") == 1

    eventually(failure_counted, timeout=10)
    found = scrape(gw)
    assert metric(found, "pvsgw_upstream_backoff_seconds") > 0
    assert metric(found, "pvsgw_production_power_watts") is None


def test_metrics_served_over_tls_show_the_certificate_expiry(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed"}})
    found = scrape(gw)
    expiry = metric(found, "pvsgw_tls_certificate_expiry_timestamp_seconds")
    assert expiry is not None and 80 * 86400 < expiry - time.time() < 91 * 86400


def test_scraping_every_second_for_30_s_stays_within_the_cache_ttl(make_simulator, make_gateway) -> None:
    # DeviceList takes 2 s here: a scrape that waited for the PVS would show it.
    sim = make_simulator("--latency-scale", "0.2", "--clock", "12:00", "--seed", "3")
    ttl = 10
    gw = make_gateway(sim.url, {"cache": {"ttl": {"DeviceList": ttl}}})
    slowest = 0.0
    seen_solar = 0
    with gw.client("admin") as c:
        started = time.monotonic()
        for i in range(30):
            t0 = time.monotonic()
            r = c.get("/metrics")
            slowest = max(slowest, time.monotonic() - t0)
            assert r.status_code == 200
            seen_solar += "pvsgw_production_power_watts " in r.text
            time.sleep(max(0.0, started + i + 1 - time.monotonic()))
        elapsed = time.monotonic() - started
    by_request = sim.stats()["by_request"]
    device_lists = by_request.get("DeviceList", 0)
    allowed = int(elapsed // ttl) + 1  # one fill, then at most one refresh per TTL
    assert 1 <= device_lists <= allowed, by_request
    assert sim.stats()["total"] == device_lists, by_request  # nothing else reached the PVS
    assert slowest < 1.5, slowest  # a scrape that waited for the 2 s DeviceList would take longer
    assert seen_solar >= 25


@pytest.mark.parametrize(
    ("metrics_role", "expected"),
    [
        ("admin", {"admin": 200, "viewer": 403, None: 401}),
        ("viewer", {"admin": 200, "viewer": 200, None: 401}),
        ("anonymous", {"admin": 200, "viewer": 200, None: 200}),
    ],
)
def test_metrics_role_is_respected(fresh_simulator: Simulator, make_gateway, metrics_role: str, expected: dict[str | None, int]) -> None:
    gw = make_gateway(fresh_simulator.url, {"auth": {"metrics_role": metrics_role}})
    for key, status in expected.items():
        with gw.client(key) as c:
            r = c.get("/metrics")
            assert r.status_code == status, (metrics_role, key, r.text)
            assert c.get("/stats").status_code == (200 if key == "admin" else 403 if key else 401)


# ---------------------------------------------------------------- /api/v1


def test_data_api_needs_a_viewer_and_the_page_needs_nothing(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    with gw.client(None) as anon:
        for path in ("/api/v1/summary", "/api/v1/devices"):
            r = anon.get(path)
            assert r.status_code == 401
            assert "www-authenticate" in r.headers
        page = anon.get("/")
        assert page.status_code == 200
    assert fresh_simulator.stats()["total"] == 0  # refused callers and the page never reach the PVS
    with gw.client("viewer") as c:
        assert c.get("/api/v1/summary").status_code == 200
        assert c.get("/api/v1/devices").status_code == 200
    # The page holds no data: none of the site's serials or numbers are in it.
    site = fresh_simulator.site()
    for serial in [*site["meters"].values(), *(i["serial"] for i in site["inverters"])]:
        assert serial not in page.text
    assert str(site["production_kw"]) not in page.text


def _legacy_expected(device_list: dict[str, Any]) -> dict[str, Any]:
    """The summary computed independently from a raw DeviceList."""
    devices = device_list["devices"]
    prod = next(d for d in devices if d.get("TYPE") == "PVS5-METER-P")
    cons = next(d for d in devices if d.get("TYPE") == "PVS5-METER-C")
    assert cons["subtype"] == "NET_CONSUMPTION_LOADSIDE"
    p, net = float(prod["p_3phsum_kw"]), float(cons["p_3phsum_kw"])
    p_kwh, net_kwh = float(prod["net_ltea_3phsum_kwh"]), float(cons["net_ltea_3phsum_kwh"])
    return {
        "production_kw": p,
        "net_kw": net,
        "consumption_kw": p + net,
        "lifetime_production_kwh": p_kwh,
        "lifetime_net_kwh": net_kwh,
        "lifetime_consumption_kwh": p_kwh + net_kwh,
        "lifetime_import_kwh": float(cons["pos_ltea_3phsum_kwh"]),
        "lifetime_export_kwh": float(cons["neg_ltea_3phsum_kwh"]),
        "inverters": {d["SERIAL"]: float(d["p_3phsum_kw"]) for d in devices if d["DEVICE_TYPE"] == "Inverter"},
    }


def _localapi_expected(values: dict[str, Any]) -> dict[str, Any]:
    """The summary computed independently from raw /vars."""
    live = {k.rsplit("/", 1)[1]: float(v) for k, v in values.items() if k.startswith("/sys/livedata/")}
    cons = next(i for i in range(8) if values.get(f"/sys/devices/meter/{i}/prodMdlNm", "").endswith("c"))
    inverters = {}
    i = 0
    while f"/sys/devices/inverter/{i}/sn" in values:
        inverters[values[f"/sys/devices/inverter/{i}/sn"]] = float(values[f"/sys/devices/inverter/{i}/p3phsumKw"])
        i += 1
    return {
        "production_kw": live["pv_p"],
        "net_kw": live["net_p"],
        "consumption_kw": live["site_load_p"],
        "lifetime_production_kwh": live["pv_en"],
        "lifetime_net_kwh": live["net_en"],
        "lifetime_consumption_kwh": live["site_load_en"],
        "lifetime_import_kwh": float(values[f"/sys/devices/meter/{cons}/posLtea3phsumKwh"]),
        "lifetime_export_kwh": float(values[f"/sys/devices/meter/{cons}/negLtea3phsumKwh"]),
        "inverters": inverters,
    }


def _assert_matches(summary: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if key == "inverters":
            assert {i["serial"]: i["power_kw"] for i in summary["inverters"]} == pytest.approx(value, abs=KW)
        else:
            assert summary[key] == pytest.approx(value, abs=KW), key


def _read_both(gw: Gateway, raw_target: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The summary and the raw PVS answer from the same cache entry (same fetch)."""
    with gw.client("viewer") as c:
        for _ in range(5):
            summary = c.get("/api/v1/summary")
            raw = c.get(raw_target)
            again = c.get("/api/v1/summary")
            assert summary.status_code == raw.status_code == 200, (summary.text, raw.text)
            if summary.json()["fetched_at"] == again.json()["fetched_at"]:
                return summary.json(), raw.json()
            time.sleep(1)  # a refresh landed in between: read again
    raise AssertionError("could not read a consistent pair")


def test_summary_agrees_with_the_raw_device_list_and_the_simulator(foreign_zone: None, make_simulator, make_gateway) -> None:
    sim = make_simulator(*SITE)
    gw = make_gateway(sim.url)
    summary, device_list = _read_both(gw, "/cgi-bin/dl_cgi?Command=DeviceList")
    _assert_matches(summary, _legacy_expected(device_list))
    assert summary["firmware"] == "legacy"
    site = sim.site()
    # A fresh simulator starts at 12:00:00 and keeps its first values for 60 s: still the same interval.
    assert summary["measured_at"] == normalize.iso(site["data_epoch"])
    assert summary["production_kw"] == site["production_kw"]
    assert summary["consumption_kw"] == pytest.approx(site["consumption_kw"], abs=KW)
    assert summary["lifetime_consumption_kwh"] == pytest.approx(site["consumption_kwh"], abs=2 * KW)
    assert summary["inverters_working"] == summary["inverter_count"] == len(site["inverters"])
    assert summary["pvs"]["serial"] and summary["pvs"]["uptime_s"] > 0 and summary["pvs"]["cpu_load"] is not None
    assert summary["health"]["state"] == "ok"
    assert summary["cache"]["sources"][0]["resource"] == "/cgi-bin/dl_cgi?Command=DeviceList"
    assert summary["fetched_at"].endswith("Z") and summary["measured_at"].endswith("Z")


def test_summary_is_the_same_for_legacy_and_localapi_firmware(foreign_zone: None, make_simulator, make_gateway) -> None:
    legacy_sim = make_simulator(*SITE)
    local_sim = make_simulator("--firmware", "localapi", *SITE)
    legacy = make_gateway(legacy_sim.url)
    local = make_gateway(local_sim.url, {"upstream": {"firmware": "auto"}})

    local_summary, values = _read_both(local, "/vars?match=/sys/&fmt=obj")
    _assert_matches(local_summary, _localapi_expected(values))
    assert local_summary["firmware"] == "localapi"
    assert local_summary["pvs"]["cpu_usage_percent"] is not None and local_summary["pvs"]["cpu_load"] is None

    legacy_summary, device_list = _read_both(legacy, "/cgi-bin/dl_cgi?Command=DeviceList")
    _assert_matches(legacy_summary, _legacy_expected(device_list))

    # Same seed, same clock (both start at 12:00:00 and hold their first values for 60 s):
    # both simulators describe the same site, so the normalized views agree.
    differ = {"firmware", "fetched_at", "age_s", "cache", "pvs", "health"}
    assert {k: v for k, v in legacy_summary.items() if k not in differ} == {
        k: v for k, v in local_summary.items() if k not in differ
    }
    with legacy.client("viewer") as a, local.client("viewer") as b:
        devices_a, devices_b = a.get("/api/v1/devices").json(), b.get("/api/v1/devices").json()
    assert devices_a["meters"] == devices_b["meters"]
    assert devices_a["inverters"] == devices_b["inverters"]
    assert set(devices_a["pvs"]) == set(devices_b["pvs"])  # same fields; each firmware fills its own


def test_cold_summary_requests_coalesce_into_one_pvs_request(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)

    def get(_: int) -> tuple[int, str]:
        with gw.client("viewer") as c:
            r = c.get("/api/v1/summary")
            return r.status_code, r.headers["cache-status"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(get, range(8)))
    assert all(status == 200 for status, _ in results), results
    assert fresh_simulator.stats()["by_request"] == {"DeviceList": 1}
    with gw.client("viewer") as c:
        r = c.get("/api/v1/summary")
        body = r.json()
    assert r.headers["cache-status"].startswith("pvs-gateway; hit")
    assert body["cache"]["status"] == "hit"
    assert int(r.headers["age"]) == body["age_s"]
    assert 15 <= body["cache"]["refresh_after_s"] <= 61
    assert fresh_simulator.stats()["by_request"] == {"DeviceList": 1}


def test_summary_serves_stale_data_with_honest_freshness_while_the_pvs_fails(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url, {"cache": {"ttl": {"DeviceList": 1}, "stale_while_revalidate": 0}})
    with gw.client("viewer") as c:
        fresh = c.get("/api/v1/summary").json()
        fresh_simulator.fault("down")
        time.sleep(1.5)
        r = c.get("/api/v1/summary")
    assert r.status_code == 200, r.text
    stale = r.json()
    assert stale["cache"]["status"] == "stale"
    assert "proxy-status" in r.headers
    assert stale["age_s"] >= 1 and stale["fetched_at"] == fresh["fetched_at"]
    assert stale["production_kw"] == fresh["production_kw"]
    assert stale["health"]["state"] in ("failing", "unreachable") and stale["health"]["consecutive_failures"] >= 1


def test_summary_without_any_data_is_a_problem_503(fresh_simulator: Simulator, make_gateway) -> None:
    fresh_simulator.fault("down")
    gw = make_gateway(fresh_simulator.url)
    with gw.client("viewer") as c:
        r = c.get("/api/v1/summary")
    assert r.status_code in (502, 503)
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"]


def test_stats_reports_upstream_timings(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    with gw.client("admin") as c:
        c.get("/api/v1/summary")
        upstream = c.get("/stats").json()["upstream"]
    assert upstream["timings"]["DeviceList"]["requests"] == 1
    assert upstream["timings"]["DeviceList"]["mean_seconds"] > 0


# ---------------------------------------------------------------- normalize (pure)


def test_night_inverters_without_measurements_are_errors_with_no_power() -> None:
    site = normalize.from_device_list(
        {
            "devices": [
                {"DEVICE_TYPE": "Inverter", "SERIAL": "E1", "STATE": "error", "MODEL": "AC_Module_Type_E"},
                {"DEVICE_TYPE": "Power Meter", "TYPE": "PVS5-METER-P", "SERIAL": "PVS6M1p", "p_3phsum_kw": "0",
                 "net_ltea_3phsum_kwh": "100.5", "DATATIME": "2025,09,12,21,21,15"},
            ]
        }
    )
    assert site.inverters[0].state == "error" and site.inverters[0].power_kw is None
    assert site.totals.production_kw == 0.0 and site.totals.consumption_kw is None
    assert site.measured_at == normalize.iso_time("2025-09-12T21:21:15Z")
    json.dumps(normalize.summary_json(site), allow_nan=False)


def test_a_line_side_consumption_meter_measures_the_house_not_the_grid() -> None:
    site = normalize.from_device_list(
        {
            "devices": [
                {"DEVICE_TYPE": "Power Meter", "TYPE": "PVS5-METER-P", "SERIAL": "Mp", "p_3phsum_kw": "3.0",
                 "net_ltea_3phsum_kwh": "1000"},
                {"DEVICE_TYPE": "Power Meter", "TYPE": "PVS5-METER-C", "SERIAL": "Mc", "subtype": "GROSS_CONSUMPTION_LINESIDE",
                 "p_3phsum_kw": "1.25", "net_ltea_3phsum_kwh": "4000"},
            ]
        }
    )
    t = site.totals
    assert (t.production_kw, t.consumption_kw, t.net_kw) == (3.0, 1.25, -1.75)
    assert (t.lifetime_consumption_kwh, t.lifetime_net_kwh) == (4000.0, 3000.0)
    assert t.lifetime_import_kwh is None


def test_garbage_values_become_none_never_nan() -> None:
    site = normalize.from_vars(
        {
            "/sys/livedata/pv_p": "nan",
            "/sys/devices/meter/0/prodMdlNm": "PVS6M0400p",
            "/sys/devices/meter/0/p3phsumKw": "oops",
            "/sys/devices/meter/0/msmtEps": "not a time",
            "/sys/info/uptime": "inf",
        }
    )
    assert site.totals.production_kw is None and site.meters[0].power_kw is None
    assert site.meters[0].measured_at is None and site.pvs.uptime_s is None
    json.dumps(normalize.devices_json(site), allow_nan=False)
