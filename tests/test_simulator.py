"""The PVS simulator as a black box: real sockets on 127.0.0.1, httpx as the client.

Most tests run the simulator in-process (``start()`` in a background event
loop, so each test gets its own device in milliseconds); one runs it as the
user does, ``python -m gateway.simulator``, and parses its ready line.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import concurrent.futures
import datetime as dt
import itertools
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.simulator import RunningSimulator, SimOptions, start
from gateway.simulator import data as sim_data
from gateway.simulator.cli import add_arguments, options_from_args

SERIAL = "ZT000085000549A0001"
PASSWORD = SERIAL[-5:]
DEVICE_LIST = "/cgi-bin/dl_cgi?Command=DeviceList"
SIM_DIR = Path(__file__).resolve().parent.parent / "gateway" / "simulator"


class Sim:
    """A simulator in its own event loop thread."""

    def __init__(self, options: SimOptions) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningSimulator = self._call(start(options))
        self.url = self.running.url
        self.port = self.running.port

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def close(self) -> None:
        self._call(self.running.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def verify(self) -> ssl.SSLContext | bool:
        pem = self.running.cert_pem
        return ssl.create_default_context(cadata=pem.decode()) if pem else True

    def client(self, timeout: float = 5.0, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.verify(), timeout=timeout, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        with self.client() as c:
            return c.get(path, **kw)

    def stats(self) -> dict[str, Any]:
        return self.get("/__sim/stats").json()

    def site(self) -> dict[str, Any]:
        return self.get("/__sim/site").json()

    def state(self) -> dict[str, Any]:
        return self.get("/__sim/state").json()

    def var(self, name: str) -> Any:
        return self.get("/__sim/vars", params={"name": name}).json()["value"]

    def fault(self, mode: str, **kw: Any) -> httpx.Response:
        with self.client() as c:
            return c.post("/__sim/fault", json={"mode": mode, **kw})

    def login(self, client: httpx.Client) -> str:
        r = client.get("/auth?login", auth=("ssm_owner", PASSWORD))
        assert r.status_code == 200, r.text
        return str(r.json()["session"])


@pytest.fixture
def make_sim() -> Iterator[Callable[..., Sim]]:
    started: list[Sim] = []

    def make(**kw: Any) -> Sim:
        kw.setdefault("port", 0)
        kw.setdefault("latency_scale", 0.01)
        kw.setdefault("clock", "12:00")
        sim = Sim(SimOptions(**kw))
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.close()


def parallel(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) at the same time; exceptions are returned, not raised."""

    def wrapped(i: int) -> Any:
        try:
            return fn(i)
        except Exception as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(wrapped, range(n)))


def raw_exchange(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send bytes on a fresh socket and read until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def measurements(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DeviceList entries without the fields that change every second."""
    skip = {"CURTIME", "dl_uptime", "dl_cpu_load", "dl_mem_used", "dl_flash_avail"}
    return [{k: v for k, v in d.items() if k not in skip} for d in devices]


# -- legacy firmware: DeviceList ----------------------------------------------


def test_devicelist_has_the_real_shape_and_the_models_values(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(inverters=5)
    body = sim.get(DEVICE_LIST).json()
    site = sim.site()
    assert body["result"] == "succeed"
    pvs, prod, cons, *invs = body["devices"]
    assert pvs["DEVICE_TYPE"] == "PVS" and pvs["SERIAL"] == SERIAL
    assert isinstance(pvs["panid"], int) and pvs["dl_uptime"].isdigit() and int(pvs["dl_uptime"]) > 3600
    for key in ("dl_cpu_load", "dl_flash_avail", "dl_mem_used", "dl_err_count"):
        assert isinstance(pvs[key], str)
    assert re.fullmatch(r"PVS6M\d{4}0001p", prod["SERIAL"]) and prod["subtype"] == "GROSS_PRODUCTION_SITE"
    assert cons["SERIAL"] == prod["SERIAL"][:-1] + "c" and cons["subtype"] == "NET_CONSUMPTION_LOADSIDE"
    assert len(invs) == 5 and [d["slave"] for d in invs] == list(range(5))
    for dev in body["devices"]:
        assert re.fullmatch(r"\d{4},\d\d,\d\d,\d\d,\d\d,\d\d", dev["CURTIME"])
        for key, value in dev.items():
            if key == "ISDETAIL":
                assert value is True
            elif key not in ("panid", "slave"):
                assert isinstance(value, str), (key, value)
    for inv in invs:
        assert inv["STATE"] == "working" and float(inv["p_3phsum_kw"]) > 0
        # The data interval's start (12:00 local on the simulated clock), written in UTC like the PVS's clock.
        assert inv["DATATIME"] == dt.datetime.fromtimestamp(site["data_epoch"], dt.UTC).strftime("%Y,%m,%d,%H,%M,%S")
        assert dt.datetime.fromtimestamp(site["data_epoch"]).strftime("%H:%M:%S") == "12:00:00"
    # DeviceList tells the same truth as /__sim/site, to the last printed digit.
    assert float(prod["p_3phsum_kw"]) == site["production_kw"] > 0.5
    assert float(cons["p_3phsum_kw"]) == site["net_kw"] == round(site["consumption_kw"] - site["production_kw"], 4)
    assert float(prod["net_ltea_3phsum_kwh"]) == site["production_kwh"]
    assert float(cons["pos_ltea_3phsum_kwh"]) == site["import_kwh"]
    assert [float(d["p_3phsum_kw"]) for d in invs] == [i["p_kw"] for i in site["inverters"]]
    assert round(sum(float(d["p_3phsum_kw"]) for d in invs), 4) == site["production_kw"]


def test_devicelist_latency_scales(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(latency_scale=0.05)  # DeviceList 10 s x 0.05 = 0.5 s +-10%
    with sim.client() as c:
        t0 = time.monotonic()
        assert c.get(DEVICE_LIST).status_code == 200
        slow = time.monotonic() - t0
        t0 = time.monotonic()
        assert c.get("/cgi-bin/dl_cgi?Command=GridProfileGet").status_code == 200
        quick = time.monotonic() - t0
    assert 0.44 <= slow < 1.2 and quick < 0.25
    fast = make_sim(latency_scale=0.0)
    t0 = time.monotonic()
    assert fast.get(DEVICE_LIST).status_code == 200
    assert time.monotonic() - t0 < 0.3


def test_at_night_inverters_report_error_without_measurements(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(clock="23:30")
    _, prod, cons, *invs = sim.get(DEVICE_LIST).json()["devices"]
    site = sim.site()
    assert invs and all(d["STATE"] == "error" and d["STATEDESCR"] == "Error" for d in invs)
    assert not any("p_3phsum_kw" in d or "ltea_3phsum_kwh" in d for d in invs)
    assert site["daylight"] is False and site["production_kw"] == 0 == float(prod["p_3phsum_kw"])
    assert site["consumption_kw"] > 0 and site["net_kw"] == site["consumption_kw"] == float(cons["p_3phsum_kw"])


def test_values_are_constant_per_interval_and_counters_only_grow(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(data_interval=60.0)
    a, b = parallel(2, lambda _: sim.get(DEVICE_LIST).json()["devices"])
    assert measurements(a) == measurements(b)  # two readers, one interval: identical numbers

    quick = make_sim(data_interval=0.3, clock="11:00")
    seen = []
    for _ in range(4):
        seen.append(quick.site())
        time.sleep(0.35)
    kwh = [s["production_kwh"] for s in seen]
    assert kwh == sorted(kwh) and kwh[-1] > kwh[0]
    assert [s["import_kwh"] + s["export_kwh"] for s in seen] == sorted(s["import_kwh"] + s["export_kwh"] for s in seen)
    assert len({s["production_kw"] for s in seen}) > 1  # power moves from one interval to the next
    lifetimes = [[i["lifetime_kwh"] for i in s["inverters"]] for s in seen]
    for before, after in itertools.pairwise(lifetimes):
        assert all(x <= y for x, y in zip(before, after, strict=True))


def test_power_follows_the_sun(make_sim: Callable[..., Sim]) -> None:
    by_hour = {h: make_sim(clock=f"{h:02d}:00", seed=3).site()["production_kw"] for h in (5, 8, 12, 16, 19)}
    assert by_hour[5] == by_hour[19] == 0
    assert 0 < by_hour[8] < by_hour[12] and 0 < by_hour[16] < by_hour[12]


# -- legacy firmware: the other endpoints ---------------------------------------


def test_legacy_read_commands_and_paths(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(inverters=3)
    with sim.client() as c:
        comm = c.get("/cgi-bin/dl_cgi?Command=Get_Comm&SerialNumber=" + SERIAL).json()
        assert comm["result"] == "succeed" and comm["networkstatus"]["interfaces"]
        assert c.get("/cgi-bin/dl_cgi?Command=GridProfileGet").json()["active_id"]
        assert c.get("/cgi-bin/dl_cgi?Command=CheckFW").json() == {"url": "none"}
        serial = c.get(DEVICE_LIST).json()["devices"][3]["SERIAL"]
        details = c.get(f"/cgi-bin/dl_cgi?Command=DeviceDetails&SerialNumber={serial}").json()
        assert [d["SERIAL"] for d in details["devices"]] == [serial]
        assert c.get("/cgi-bin/dl_cgi?Command=DeviceDetails&SerialNumber=nope").status_code == 400
        assert c.get("/cgi-bin/dl_cgi?Command=GetDiscoveryProgress").json()["complete"] is True
        assert c.get("/cgi-bin/dl_cgi/supervisor/info").json()["supervisor"]["SERIAL"] == SERIAL
        assert c.get("/cgi-bin/dl_cgi/communication/interfaces").json()["networkstatus"]
        assert c.get("/cgi-bin/dl_cgi/network/interfaces").json()["interfaces"]
        assert len(c.get("/cgi-bin/dl_cgi/devices/list").json()["devices"]) == 6
        assert c.get("/cgi-bin/dl_cgi/network/powerProduction").json() == {"powerProduction": "On"}
        assert "ess_report" in c.get("/cgi-bin/dl_cgi/energy-storage-system/status").json()
        bad = c.get("/cgi-bin/dl_cgi?Command=SetCellPurchased")
        assert bad.status_code == 400 and bad.headers["content-type"] == "application/json" and bad.json()
        assert c.get("/").status_code == 403
        assert c.get("/cgi-bin/dl_cgi/no/such/thing").status_code == 404
        assert c.get("/nothing").status_code == 404
        assert c.get("/vars?name=/sys/info/serialnum").status_code == 404  # no varserver on legacy firmware
    assert sim.stats()["writes"] == 0  # none of that changed anything


def test_legacy_state_changing_requests_really_change_state(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    with sim.client() as c:
        assert c.get("/cgi-bin/dl_cgi?Command=Start").json()["supervisor"]["SERIAL"] == SERIAL
        assert sim.state()["config_session"] is True
        assert c.get("/cgi-bin/dl_cgi?Command=Stop").json()["result"] == "success"
        assert sim.state()["config_session"] is False
        assert len(c.get("/cgi-bin/dl_cgi?Command=GridProfileRefresh").json()["profiles"]) > 10
        for kind in ("eth", "wifi", "eth"):
            assert c.get(f"/cgi-bin/dl_cgi/network/interfaceConfig/dhcp/{kind}").status_code == 200
        r = c.post("/cgi-bin/dl_cgi/network/powerProduction", json={"powerProduction": "Off"})
        assert r.status_code == 200
        assert c.get("/cgi-bin/dl_cgi/network/powerProduction").json() == {"powerProduction": "Off"}
    state = sim.state()
    assert state["dhcp_renewals"] == {"eth": 2, "wifi": 1} and state["grid_profile_refreshes"] == 1
    assert sim.site()["production_kw"] == 0  # the inverters really stopped
    stats = sim.stats()
    assert stats["writes"] == 7
    assert stats["by_request"]["dl_cgi/network/interfaceConfig/dhcp/eth"] == 2
    assert stats["by_request"]["Start"] == stats["by_request"]["Stop"] == 1


# -- LocalAPI firmware -------------------------------------------------------------


def test_localapi_login_and_what_needs_a_session(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(firmware="localapi")
    assert sim.url.startswith("https://127.0.0.1:")
    with sim.client() as c:  # verifies against the served self-signed cert
        r = c.get("/vars", params={"name": "/sys/info/serialnum,/sys/info/sw_rev,/sys/info/lmac,/sys/info/ssid"})
        assert r.status_code == 200 and r.json()["values"][0] == {"name": "/sys/info/serialnum", "value": SERIAL}
        for query in ("name=/sys/info/uptime", "match=livedata", "name=/sys/info/wpa_key", "cache=x"):
            r = c.get(f"/vars?{query}")
            assert r.status_code == 401 and r.json()["status"] == 401 and r.json()["errorcode"].startswith("0x")
        denied = c.get(DEVICE_LIST)
        assert denied.status_code == 403
        assert denied.content == b'{ "status":403, "error" : "Unauthorized", "path":"" }'
        assert c.get("/cgi-bin/dl_cgi/supervisor/info").status_code == 200  # open on new firmware
        assert c.get("/cgi-bin/dl_cgi/devices/list").status_code == 403

        for auth in (("ssm_owner", "wrong"), ("admin", PASSWORD), None):
            assert c.get("/auth?login", auth=auth).status_code == 401
        for header in ("Basic !!!notbase64", "Bearer " + PASSWORD, "basic"):
            assert c.get("/auth?login", headers={"Authorization": header}).status_code == 401

        creds = base64.b64encode(f"ssm_owner:{PASSWORD}".encode()).decode()
        r = c.get("/auth?login", headers={"Authorization": f"BASIC {creds}"})  # scheme is case-insensitive
        assert r.status_code == 200
        session = r.json()["session"]
        assert re.fullmatch(r"[A-Za-z0-9]{64}", session)
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"session={session}") and "Secure" in cookie and "HttpOnly" in cookie
        assert c.get("/vars?name=/sys/info/uptime").status_code == 200  # the cookie jar sends it
        assert c.get(DEVICE_LIST).json()["result"] == "succeed"
        assert c.get("/cgi-bin/dl_cgi/devices/list").status_code == 200
        assert c.get("/auth?logout").status_code == 204
        assert c.get("/vars?name=/sys/info/uptime").status_code == 401
    stats = sim.stats()
    assert stats["by_request"]["auth.login"] == 7 and stats["by_request"]["auth.logout"] == 1


def test_localapi_sessions_expire_after_inactivity(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(firmware="localapi", session_ttl=0.6)
    with sim.client() as c:
        sim.login(c)
        for _ in range(3):  # each use restarts the timeout
            time.sleep(0.35)
            assert c.get("/vars?name=/sys/info/uptime").status_code == 200
        time.sleep(0.7)
        assert c.get("/vars?name=/sys/info/uptime").status_code == 401
        sim.login(c)
        assert c.get("/vars?name=/sys/info/uptime").status_code == 200
        assert sim.fault("expire-sessions").status_code == 200
        assert c.get("/vars?name=/sys/info/uptime").status_code == 401


def test_vars_name_match_fmt_and_cache(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(firmware="localapi", inverters=4)
    with sim.client() as c:
        sim.login(c)
        r = c.get("/vars?name=/sys/info/sw_rev,/sys/info/model").json()
        assert r == {
            "values": [
                {"name": "/sys/info/sw_rev", "value": "2025.09.04.61845"},
                {"name": "/sys/info/model", "value": "PVS6"},
            ],
            "count": 2,
        }
        assert c.get("/vars?name=/sys/info/model&fmt=obj").json() == {"/sys/info/model": "PVS6"}
        assert c.get("/vars?name=/sys/info/model&fmt=o").json() == {"/sys/info/model": "PVS6"}
        assert "values" in c.get("/vars?name=/sys/info/model&fmt=list").json()
        assert c.post("/vars", content=b"name=/sys/info/model&fmt=obj").json() == {"/sys/info/model": "PVS6"}
        assert c.get("/vars?name=/sys/info/nope").status_code == 400
        assert c.get("/vars?match=nothing-matches-this").status_code == 400
        assert c.post("/vars", content=b"x" * 2000).status_code == 413

        live = c.get("/vars?match=/sys/livedata/&fmt=obj").json()
        site = sim.site()
        assert float(live["/sys/livedata/pv_p"]) == site["production_kw"]
        assert float(live["/sys/livedata/net_p"]) == site["net_kw"]
        assert float(live["/sys/livedata/site_load_en"]) == site["consumption_kwh"]
        meters = c.get("/vars?match=meter/data&fmt=obj").json()
        assert meters["/sys/devices/11/meter/data"]["p3phsumKw"] == site["production_kw"]  # a nested object
        assert meters["/sys/devices/12/meter/data"]["sn"].endswith("c")
        inverters = c.get("/vars?match=/sys/devices/inverter/&fmt=obj").json()
        assert len(inverters) == 4 * 12
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00Z", inverters["/sys/devices/inverter/0/msmtEps"])
        assert float(inverters["/sys/devices/inverter/1/p3phsumKw"]) == site["inverters"][1]["p_kw"]
        assert c.get("/vars?match=/sys/devices/ess/").status_code == 400  # a PV-only site

        everything = c.get("/vars?match=/&fmt=obj").json()
        assert everything["/sys/info/wpa_key"] == sim.var("/sys/info/wpa_key") and len(everything) > 100

        created = c.get("/vars?match=livedata&fmt=obj&cache=ld").json()
        assert set(created) == set(live)
        assert set(c.get("/vars?cache=ld&fmt=obj").json()) == set(live)  # re-runs the stored query
        c.get("/vars?cache=ld&name=/sys/info/model")  # adds to the stored query
        assert "/sys/info/model" in c.get("/vars?cache=ld&fmt=obj").json()
        assert c.get("/vars?clearcache=ld").json() == {"values": [], "count": 0}
        assert c.get("/vars?cache=ld&fmt=obj").json() == {}
    by_request = sim.stats()["by_request"]
    assert by_request["vars.clearcache"] == 1 and "vars.set" not in by_request and by_request["vars"] > 15


def test_vars_set_writes_only_writable_variables(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(firmware="localapi")
    with sim.client() as c:
        assert c.get("/vars?set=/sys/telemetryws/enable=1").status_code == 401  # no session
        assert sim.var("/sys/telemetryws/enable") == "0"
        sim.login(c)
        r = c.get("/vars?set=/sys/telemetryws/enable=1")
        assert r.json() == {"values": [{"name": "/sys/telemetryws/enable", "value": "1"}], "count": 1}
        assert sim.var("/sys/telemetryws/enable") == "1"
        assert c.post("/vars", content=b"set=/network/report/send=1").status_code == 200
        assert sim.var("/network/report/send") == "1"
        ssid = sim.var("/sys/info/ssid")
        denied = c.get("/vars?set=/sys/telemetryws/enable=0,/sys/info/ssid=evil")
        assert denied.status_code == 403 and denied.json()["status"] == 403
        assert sim.var("/sys/info/ssid") == ssid and sim.var("/sys/telemetryws/enable") == "1"  # nothing written
        assert c.get("/vars?set=/no/such/var=1").status_code == 400
    stats = sim.stats()
    assert stats["by_request"]["vars.set"] == 5 and stats["writes"] == 2


# -- fragility ---------------------------------------------------------------------


def test_requests_over_capacity_get_503_or_hang(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(capacity=1, latency_scale=0.05, overload_limit=100, seed=1)

    def fetch(i: int) -> int:
        time.sleep(0.05 * (i > 0))  # the first one is surely in the slot first
        with sim.client(timeout=1.2) as c:
            return c.get(DEVICE_LIST).status_code

    results = parallel(6, fetch)
    assert results[0] == 200
    rest = results[1:]
    assert all(r == 503 or isinstance(r, httpx.ReadTimeout) for r in rest), rest
    assert 503 in rest and any(isinstance(r, httpx.ReadTimeout) for r in rest)  # seed 1 draws both
    stats = sim.stats()
    hung = sum(isinstance(r, httpx.ReadTimeout) for r in rest)
    assert stats["rejected"] == 5 and stats["reboots"] == 0
    assert 1 + hung <= stats["max_in_flight"] <= 6  # hung requests stay open beside the one in the slot
    deadline = time.monotonic() + 3
    while sim.stats()["in_flight"] and time.monotonic() < deadline:  # hung requests end with their clients
        time.sleep(0.05)
    assert sim.stats()["in_flight"] == 0
    assert sim.get(DEVICE_LIST).status_code == 200  # capacity is free again


def test_sustained_overload_reboots_and_it_recovers(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(capacity=1, latency_scale=0.05, overload_limit=3, overload_window=10, reboot_seconds=1.0)
    uptime_before = int(sim.get(DEVICE_LIST).json()["devices"][0]["dl_uptime"])

    def fetch(i: int) -> Any:
        time.sleep(0.05 * (i > 0))
        with sim.client(timeout=1.0) as c:
            return c.get(DEVICE_LIST).status_code

    results = parallel(5, fetch)
    assert not any(r == 200 for r in results), results  # even the one in the slot died with the device
    stats = sim.stats()
    assert stats["rebooting"] is True and stats["rejected"] >= 3
    with sim.client() as c, pytest.raises(httpx.RemoteProtocolError):
        c.get("/cgi-bin/dl_cgi?Command=CheckFW")  # read, then the connection closes unanswered
    time.sleep(1.1)
    stats = sim.stats()
    assert stats["rebooting"] is False and stats["reboots"] == 1
    uptime_after = int(sim.get(DEVICE_LIST).json()["devices"][0]["dl_uptime"])
    assert uptime_before > 3600 and uptime_after < 5


# -- injected faults ---------------------------------------------------------------


def test_fault_down_drops_device_requests_but_not_sim_endpoints(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    assert sim.fault("down").json()["mode"] == "down"
    with sim.client() as c, pytest.raises(httpx.RemoteProtocolError):
        c.get(DEVICE_LIST)
    assert sim.get("/__sim/fault").json()["mode"] == "down"
    assert sim.stats()["dropped"] == 1
    sim.fault("ok")
    assert sim.get(DEVICE_LIST).status_code == 200


def test_fault_ok_ends_a_reboot_at_once(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    assert sim.fault("reboot", seconds=60).json()["reboot_remaining"] > 50
    with sim.client() as c, pytest.raises(httpx.RemoteProtocolError):
        c.get(DEVICE_LIST)
    assert sim.fault("ok").json()["rebooting"] is False
    assert sim.stats()["reboots"] == 1
    assert int(sim.get(DEVICE_LIST).json()["devices"][0]["dl_uptime"]) < 5


def test_fault_slow_error_garbage_and_expiry(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    sim.fault("slow", seconds=0.4)
    t0 = time.monotonic()
    assert sim.get("/cgi-bin/dl_cgi?Command=CheckFW").status_code == 200
    assert time.monotonic() - t0 >= 0.4

    sim.fault("error")
    r = sim.get(DEVICE_LIST)
    assert r.status_code == 500 and r.json()["status"] == 500

    sim.fault("garbage", seconds=0.5)  # reverts to ok after 0.5 s
    r = sim.get(DEVICE_LIST)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        json.loads(r.content)
    time.sleep(0.55)
    assert sim.get("/__sim/fault").json()["mode"] == "ok"
    assert sim.get(DEVICE_LIST).json()["result"] == "succeed"

    assert sim.fault("nonsense").status_code == 400
    with sim.client() as c:
        assert c.post("/__sim/fault", content=b"not json").status_code == 400
        assert c.post("/__sim/fault", json={"mode": "down", "seconds": -1}).status_code == 400
    assert sim.fault("rotate-cert").status_code == 400  # no TLS here


def test_fault_hang_and_truncated(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    sim.fault("hang")
    with sim.client(timeout=0.4) as c, pytest.raises(httpx.ReadTimeout):
        c.get(DEVICE_LIST)

    sim.fault("truncated")
    with sim.client() as c, pytest.raises(httpx.RemoteProtocolError):
        c.get(DEVICE_LIST)
    raw = raw_exchange(sim.port, b"GET /cgi-bin/dl_cgi?Command=CheckFW HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    declared = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    assert head.startswith(b"HTTP/1.1 200") and 0 < len(body) < declared


def test_fault_headers_in_body(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    sim.fault("headers-in-body")
    r = sim.get("/cgi-bin/dl_cgi?Command=CheckFW")
    assert r.status_code == 200 and r.text.startswith("HTTP/1.1 200 OK\r\n")
    inner_head, _, inner_body = r.text.partition("\r\n\r\n")
    assert "Content-Type: application/json" in inner_head and json.loads(inner_body) == {"url": "none"}


def test_fault_reboot_drops_sessions_and_restarts_uptime(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(firmware="localapi")
    with sim.client() as c:
        sim.login(c)
        before = float(c.get("/vars?name=/sys/info/uptime&fmt=obj").json()["/sys/info/uptime"])
        assert sim.fault("reboot", seconds=0.5).json()["rebooting"] is True
        with pytest.raises(httpx.RemoteProtocolError):
            c.get("/vars?name=/sys/info/uptime")
        time.sleep(0.6)
        assert sim.stats()["reboots"] == 1
        assert c.get("/vars?name=/sys/info/uptime").status_code == 401  # the session died with it
        sim.login(c)
        after = float(c.get("/vars?name=/sys/info/uptime&fmt=obj").json()["/sys/info/uptime"])
    assert before > 3600 and after < 5


def _peer_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


def test_fault_rotate_cert_changes_it_for_new_connections(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(firmware="localapi")
    old = _peer_cert(sim.port)
    with sim.client() as c:  # pinned to the first cert, connection kept alive
        assert c.get("/cgi-bin/dl_cgi/supervisor/info").status_code == 200
        assert sim.fault("rotate-cert").status_code == 200
        assert c.get("/cgi-bin/dl_cgi/supervisor/info").status_code == 200  # existing connection unaffected
    assert _peer_cert(sim.port) != old
    pinned_to_old = ssl.create_default_context(cadata=ssl.DER_cert_to_PEM_cert(old))
    with httpx.Client(base_url=sim.url, verify=pinned_to_old) as c, pytest.raises(httpx.ConnectError):
        c.get("/cgi-bin/dl_cgi/supervisor/info")


def test_cert_dir_keeps_the_certificate(make_sim: Callable[..., Sim], tmp_path: Path) -> None:
    first = make_sim(firmware="localapi", cert_dir=str(tmp_path))
    pem = first.running.cert_pem
    second = make_sim(firmware="localapi", cert_dir=str(tmp_path))
    assert pem and second.running.cert_pem == pem
    keys = list(tmp_path.glob("*key*.pem"))
    assert len(keys) == 1 and keys[0].stat().st_mode & 0o077 == 0


# -- counters and the HTTP layer ---------------------------------------------------


def test_stats_requests_and_reset(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()
    with sim.client() as c:
        c.get(DEVICE_LIST)
        c.get("/cgi-bin/dl_cgi?Command=DeviceList&extra=%41")
        c.head("/cgi-bin/dl_cgi/supervisor/info")
        c.post("/cgi-bin/dl_cgi/network/powerProduction", json={"powerProduction": "On"})
        c.get("/favicon.ico")
    stats = sim.stats()
    assert stats["total"] == 5 and stats["in_flight"] == 0 and stats["max_in_flight"] == 1
    assert stats["by_request"] == {
        "DeviceList": 2,
        "dl_cgi/supervisor/info": 1,
        "dl_cgi/network/powerProduction": 1,
        "/favicon.ico": 1,
    }
    assert stats["by_method"] == {"GET": 3, "HEAD": 1, "POST": 1}
    assert stats["firmware"] == "legacy" and stats["reboots"] == 0 and stats["rejected"] == 0
    log = sim.get("/__sim/requests").json()
    assert [e["target"] for e in log][:2] == [DEVICE_LIST, DEVICE_LIST + "&extra=%41"]  # raw, as received
    assert log[2]["method"] == "HEAD" and abs(log[0]["time"] - time.time()) < 10
    with sim.client() as c:
        assert c.post("/__sim/reset").status_code == 200
        assert c.get("/__sim/nothing").status_code == 404
        assert c.get("/__sim/reset").status_code == 405
    stats = sim.stats()
    assert stats["total"] == 0 and stats["by_request"] == {} and sim.get("/__sim/requests").json() == []


def test_http_keep_alive_head_and_chunked_bodies(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(firmware="localapi", latency_scale=0)
    ctx = ssl.create_default_context(cadata=sim.running.cert_pem.decode())
    pipelined = (
        b"HEAD /cgi-bin/dl_cgi/supervisor/info HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /vars HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"9\r\nname=/sys\r\nf\r\n/info/serialnum\r\n0\r\n\r\n"
        b"GET /cgi-bin/dl_cgi/supervisor/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", sim.port), timeout=3) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(pipelined)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    responses = data.split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 3  # three answers on one connection
    head = responses[0]
    assert head.startswith(b"200") and head.endswith(b"\r\n\r\n") and b"Content-Length: " in head
    assert b"Connection: keep-alive" in head and b"Content-Type: application/json" in head
    assert responses[1].startswith(b"200") and SERIAL.encode() in responses[1]
    assert responses[2].startswith(b"200") and b"Connection: close" in responses[2]


@pytest.mark.parametrize(
    "data",
    [
        b"NONSENSE\r\n\r\n",
        b"GET /x HTTP/9.9\r\n\r\n",
        b"GET x HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_requests_get_400_and_close(make_sim: Callable[..., Sim], data: bytes) -> None:
    sim = make_sim()
    reply = raw_exchange(sim.port, data)
    assert reply.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in reply
    stats = sim.stats()
    assert stats["malformed"] == 1 and stats["total"] == 0


def test_bad_connections_never_affect_others(make_sim: Callable[..., Sim], caplog: pytest.LogCaptureFixture) -> None:
    sim = make_sim(latency_scale=0.02)
    with socket.create_connection(("127.0.0.1", sim.port)) as half:
        half.sendall(b"GET /cgi-bin/dl_cgi?Command=Devi")  # never finished
        with socket.create_connection(("127.0.0.1", sim.port)) as rude:
            rude.sendall(b"GET " + DEVICE_LIST.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        # ... the rude client left before its answer; a binary blob follows on another socket
        raw_exchange(sim.port, os.urandom(4096), timeout=0.5)
        assert sim.get(DEVICE_LIST).json()["result"] == "succeed"
        assert sim.stats()["total"] == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- packaging: CLI, subprocess, isolation -----------------------------------------


def test_cli_arguments_build_options() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = "--port 0 --firmware localapi --serial ZT123456789012345 --latency-scale 0.1 --seed 4 --clock 06:30"
    argv += " --inverters 3 --capacity 1 --session-ttl 9 --reboot-seconds 2 --cert-dir /tmp/x"
    opts = options_from_args(parser.parse_args(argv.split()))
    expected = SimOptions(
        port=0, firmware="localapi", serial="ZT123456789012345", latency_scale=0.1, seed=4, clock="06:30",
        inverters=3, capacity=1, session_ttl=9.0, reboot_seconds=2.0, cert_dir="/tmp/x", ws_port=9002,
    )  # fmt: skip
    assert opts == expected
    assert opts.uses_tls and not opts.tls and opts.effective_reboot_seconds == 2.0
    defaults = options_from_args(parser.parse_args([]))
    # The command line serves telemetry on the PVS's port; in-process simulators only when asked.
    assert defaults == SimOptions(ws_port=9002) and defaults.effective_reboot_seconds == 480.0
    assert SimOptions(latency_scale=0.001).effective_reboot_seconds == 1.0
    assert SimOptions(latency_scale=0.1).effective_overload_window == 3.0
    for bad in (["--clock", "25:00"], ["--capacity", "0"], ["--port", "70000"], ["--latency-scale", "-1"]):
        with pytest.raises(SystemExit) as exc:  # a usage error, not a traceback
            parser.parse_args(bad)
        assert exc.value.code == 2
    with pytest.raises(ValueError, match="clock"):
        SimOptions(clock="7 pm")


def test_runs_as_a_process_and_stops_cleanly_on_signals() -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway.simulator", "--port", "0", "--latency-scale", "0.01", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for extra in ([], ["--firmware", "localapi", "--serial", "ZT0000000000000XYZ12", "--ws-port", "0"])
    ]
    try:
        cases = zip(procs, (signal.SIGTERM, signal.SIGINT), ("http", "https"), ("legacy", "localapi"), strict=True)
        for proc, sig, scheme, fw in cases:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            match = re.fullmatch(
                rf"pvs-simulator ready url=({scheme}://127\.0\.0\.1:(\d+)) firmware={fw} serial=\S+\n", line
            )
            assert match, line
            with httpx.Client(verify=False, timeout=5) as c:
                assert c.get(match.group(1) + "/__sim/stats").json()["firmware"] == fw
                # Stopped with that keep-alive connection still open and idle, as Ctrl-C in the demo.
                proc.send_signal(sig)
                assert proc.wait(timeout=10) == 0
            assert proc.stdout.read() == b"" and b"Traceback" not in (proc.stderr.read() if proc.stderr else b"")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()


def test_the_simulator_imports_nothing_else_from_gateway() -> None:
    offenders = []
    for path in SIM_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 1:
                names = ["<relative import above gateway.simulator>"]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("gateway") or n.startswith("<")]
    offenders = [o for o in offenders if ": gateway.simulator" not in o]
    assert not offenders
    assert (SIM_DIR / "__init__.py").exists() and len(list(SIM_DIR.rglob("*.py"))) > 5


# ---------------------------------------------------------------- telemetry WebSocket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _enable_telemetry(sim: Sim, value: str = "1") -> None:
    with sim.client() as c:
        sim.login(c)
        assert c.get(f"/vars?set=/sys/telemetryws/enable={value}").status_code == 200


def _frames(url: str, seconds: float, *, limit: int = 1000) -> tuple[list[tuple[float, dict[str, Any]]], Any]:
    """Frames received in ``seconds`` (with arrival times), and the close frame if the device closed."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    got: list[tuple[float, dict[str, Any]]] = []
    closed = None
    deadline = time.monotonic() + seconds
    with connect(url, open_timeout=5) as ws:
        try:
            while len(got) < limit and (left := deadline - time.monotonic()) > 0:
                try:
                    got.append((time.monotonic(), json.loads(ws.recv(timeout=left))))
                except TimeoutError:
                    break
        except ConnectionClosed as exc:
            closed = exc.rcvd
    return got, closed


def test_telemetry_socket_sends_a_frame_on_connect_then_on_change(make_sim: Callable[..., Sim]) -> None:
    scale = 0.01  # value changes 0.02-0.6 s apart
    sim = make_sim(firmware="localapi", ws_port=_free_port(), latency_scale=scale)
    assert sim.running.ws_url == f"ws://127.0.0.1:{sim.running.ws_port}"
    _enable_telemetry(sim)
    start = time.monotonic()
    frames, closed = _frames(sim.running.ws_url, 4.0)
    assert closed is None
    assert frames[0][0] - start < 1.0  # one frame as soon as the client connects
    assert len(frames) >= 4
    first = frames[0][1]
    assert first["notification"] == "power"
    sample = sim_data.sample(sim_data.WS_POWER)
    assert list(first["params"])[: len(sample["params"])] == list(sample["params"])  # the device's fields, in order
    site = sim.site()
    for _, frame in frames:
        p = frame["params"]
        assert abs(p["net_p"] - (p["site_load_p"] - p["pv_p"])) < 1e-3  # load = pv + grid
        assert abs(p["pv_p"] - site["production_kw"]) <= 0.05 * site["production_kw"] + 1e-9
        assert p["pv_en"] == pytest.approx(site["production_kwh"], abs=1.0)
        assert abs(p["time"] - time.time()) < 86400
    # Only changes are sent: consecutive frames differ, and gaps stay within the quiet period.
    params = [json.dumps(f["params"], sort_keys=True) for _, f in frames]
    assert all(a != b for a, b in itertools.pairwise(params))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
    assert max(gaps) < 60 * scale + 0.5
    stats = sim.stats()
    assert stats["ws_connections"] == 1
    deadline = time.monotonic() + 3
    while sim.stats()["ws_clients"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.stats()["ws_clients"] == 0


def test_telemetry_socket_is_silent_while_disabled(make_sim: Callable[..., Sim]) -> None:
    from websockets.sync.client import connect

    sim = make_sim(firmware="localapi", ws_port=_free_port(), latency_scale=0.02)  # closed after 12 s
    assert sim.var("/sys/telemetryws/enable") == "0"
    with connect(sim.running.ws_url, open_timeout=5) as ws:
        with pytest.raises(TimeoutError):
            ws.recv(timeout=2.5)  # several value changes (<= 1.2 s apart) and nothing sent
        assert sim.stats()["ws_clients"] == 1
        _enable_telemetry(sim)
        frame = json.loads(ws.recv(timeout=4))
        assert frame["notification"] == "power"
        _enable_telemetry(sim, "0")
        time.sleep(0.2)
        with pytest.raises(TimeoutError):
            while True:  # what was already on its way may arrive; then silence
                ws.recv(timeout=2.5)


def test_the_device_closes_each_telemetry_socket_after_ten_scaled_minutes(make_sim: Callable[..., Sim]) -> None:
    scale = 0.002  # 600 s -> 1.2 s
    sim = make_sim(firmware="localapi", ws_port=_free_port(), latency_scale=scale)
    _enable_telemetry(sim)
    start = time.monotonic()
    frames, closed = _frames(sim.running.ws_url, 10.0)
    lasted = time.monotonic() - start
    assert closed is not None and closed.code == 1000
    assert 1.0 < lasted < 5.0, lasted
    assert frames  # it did stream before closing
    frames, closed = _frames(sim.running.ws_url, 10.0)  # a client simply reconnects
    assert closed is not None and frames
    assert sim.stats()["ws_connections"] == 2


def test_a_reboot_drops_telemetry_sockets_and_refuses_new_ones_until_back(make_sim: Callable[..., Sim]) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidMessage
    from websockets.sync.client import connect

    sim = make_sim(firmware="localapi", ws_port=_free_port(), latency_scale=0.005)
    _enable_telemetry(sim)
    with connect(sim.running.ws_url, open_timeout=5) as ws:
        ws.recv(timeout=3)
        assert sim.fault("reboot", seconds=1.5).status_code == 200
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=3)
    with pytest.raises((ConnectionClosed, InvalidMessage, OSError, EOFError)), connect(
        sim.running.ws_url, open_timeout=2
    ) as ws:
        ws.recv(timeout=2)
    deadline = time.monotonic() + 10
    while sim.stats()["rebooting"] and time.monotonic() < deadline:
        time.sleep(0.1)
    frames, _ = _frames(sim.running.ws_url, 2.0, limit=1)  # back: the setting survived the reboot
    assert frames and frames[0][1]["notification"] == "power"


def test_telemetry_socket_is_localapi_only_and_announced_in_the_ready_line() -> None:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway.simulator", "--port", "0", "--ws-port", str(port), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for extra in (["--firmware", "localapi"], [])
    ]
    try:
        lines = [p.stdout.readline().decode() for p in procs if p.stdout]
        assert lines[0].rstrip().endswith(f" ws=ws://127.0.0.1:{port}"), lines[0]
        assert " ws=" not in lines[1]  # legacy firmware has no telemetry socket
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()
