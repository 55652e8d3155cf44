"""The PVS clients people run today, replayed request for request against the gateway.

Each test sends exactly what one public client sends (scheme, port, method, path,
query, headers, credential form, timeout), read from the client's own code at the
commit named, and checks what that client needs: the status it accepts and the JSON
keys it reads. Then it checks what reached the simulator: what the client would have
sent the PVS, minus ``Command=Start``/``Stop`` (the gateway answers those itself).
The table in docs/clients.md names the test of each row.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import yaml

from tests.conftest import FAST
from tests.harness import Gateway, Simulator, start_simulator

# verify=False is what several of these clients do; their warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

SERIAL = "ZT000085000549A0001"  # the simulator's default serial; the LocalAPI password is its last 5
LAN = ["127.0.0.1/32"]  # the tests' "household LAN": the loopback address the clients connect from


def free_port() -> int:
    """A port free on 127.0.0.1 now (for the listeners the harness does not choose itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_443_or_free() -> int:
    """443 where this process may bind it (root, nothing on it): homebridge-pvs6 connects there only."""
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 443))
        return 443
    except OSError:
        return free_port()


def https_port(gw: Gateway) -> int:
    """The HTTPS listener's port, from its "listening on https://..." line (the LAN listener may log first)."""
    found = re.search(r"listening on https://[^\s:]+:(\d+)", gw.logs())
    return int(found.group(1)) if found else int(gw.url.rsplit(":", 1)[1].split("/")[0])


def upstream_log(sim: Simulator) -> list[tuple[str, str]]:
    """(method, target) of every request the simulator received, oldest first."""
    return [(r["method"], r["target"]) for r in sim.requests()]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def wait_polled(sim: Simulator, *names: str) -> None:
    """Until the gateway's poller has read ``names`` from the simulator and nothing is in flight."""

    def done() -> bool:
        stats = sim.stats()
        return all(stats["by_request"].get(n, 0) >= 1 for n in names) and stats["in_flight"] == 0

    wait_for(done, f"the gateway's first reads of {names}")


def check_device_list(body: dict[str, Any]) -> None:
    """The DeviceList keys the legacy clients read (hass-sunpower, esphome, exporter)."""
    devices = body["devices"]
    kinds = {d["DEVICE_TYPE"] for d in devices}
    assert {"PVS", "Power Meter", "Inverter"} <= kinds
    for d in devices:
        assert d["SERIAL"] and d["MODEL"] and "STATE" in d and "SWVER" in d
    meters = [d for d in devices if d["DEVICE_TYPE"] == "Power Meter"]
    assert all("p_3phsum_kw" in m and "net_ltea_3phsum_kwh" in m for m in meters)


@pytest.fixture(scope="module")
def localapi_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = start_simulator(tmp_path_factory.mktemp("sim-localapi"), *FAST, "--firmware", "localapi", "--serial", SERIAL)
    yield sim
    sim.stop()


# -- hass-sunpower ------------------------------------------------------------------------


def hass_sunpower(host: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """krbaker/hass-sunpower @2195818, custom_components/sunpower/sunpower.py ``SunPowerMonitor``:
    ``requests.get("http://{host}/cgi-bin/dl_cgi?Command=" + command, timeout=120).json()``;
    no headers, no CA, no status check. config_flow.py ``validate_input`` reads ``Get_Comm``
    once at setup; __init__.py polls ``DeviceList`` (and ``dl_cgi/energy-storage-system/status``
    only when the DeviceList holds an ESS, which the simulated site does not)."""
    command_url = f"http://{host}/cgi-bin/dl_cgi?Command="
    setup = requests.get(command_url + "Get_Comm", timeout=120).json()
    data = requests.get(command_url + "DeviceList", timeout=120).json()
    return setup, data


def test_hass_sunpower_through_the_lan_listener(fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """hass-sunpower changes only its host: ``<gateway>:<server.http_port>`` (80 in production)."""
    port = free_port()
    make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed", "http_port": port}, "auth": {"allow_anonymous_from": LAN}})
    fresh_simulator.reset()
    setup, data = hass_sunpower(f"127.0.0.1:{port}")
    assert setup["networkstatus"]["interfaces"]
    check_device_list(data)
    # __init__.py: per device {DEVICE_TYPE: {SERIAL: device}}; inverters' STATE, freq_hz, vln_3phavg_v
    working = [d for d in data["devices"] if d["DEVICE_TYPE"] == "Inverter" and d["STATE"] == "working"]
    assert working and all("freq_hz" in d and "vln_3phavg_v" in d for d in working)
    assert upstream_log(fresh_simulator) == [
        ("GET", "/cgi-bin/dl_cgi?Command=Get_Comm"),
        ("GET", "/cgi-bin/dl_cgi?Command=DeviceList"),
    ]


def test_plain_http_refuses_credentials_and_redirects_strangers(fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """hass-sunpower's only credential form is ``user:pass@`` in its host, sent as Basic over plain
    HTTP: the LAN listener refuses it (403, never checked: the key is then known to the network)
    and other addresses get 308 to HTTPS on the configured name, never the request's Host."""
    port = free_port()
    gw = make_gateway(
        fresh_simulator.url,
        {"server": {"tls": "self-signed", "http_port": port, "hostnames": ["pvs-gateway.test"]}, "auth": {"allow_anonymous_from": LAN}},
    )
    key = gw.keys["viewer"]
    fresh_simulator.reset()
    for kwargs in ({"url": f"http://viewer:{key}@127.0.0.1:{port}/cgi-bin/dl_cgi?Command=DeviceList"},
                   {"url": f"http://127.0.0.1:{port}/cgi-bin/dl_cgi?Command=DeviceList", "headers": {"X-API-Key": key}}):
        r = requests.get(timeout=120, allow_redirects=False, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == 403, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
    assert fresh_simulator.stats()["total"] == 0

    other = make_gateway(
        fresh_simulator.url,
        {"server": {"tls": "self-signed", "http_port": (p2 := free_port()), "hostnames": ["pvs-gateway.test"]},
         "auth": {"allow_anonymous_from": ["192.0.2.0/24"]}},
    )
    r = requests.get(f"http://127.0.0.1:{p2}/cgi-bin/dl_cgi?Command=DeviceList", headers={"Host": "evil.example"}, timeout=120, allow_redirects=False)
    assert r.status_code == 308
    assert r.headers["location"] == f"https://pvs-gateway.test:{https_port(other)}/cgi-bin/dl_cgi?Command=DeviceList"


# -- esphome-sunpower -----------------------------------------------------------------------

ESPHOME_TIMEOUT = 4.5  # ESPHome http_request's default ``timeout``


def esphome(url: str, headers: dict[str, str]) -> requests.Response:
    """kpfleming/esphome-sunpower @09ce3d5, examples/minimal.yml: every minute
    ``http_request.get: url: http://<PVS>/cgi-bin/dl_cgi?Command=DeviceList`` with
    ``useragent: esphome/pvs``; ESPHome adds ``request_headers`` (an ``X-API-Key``) and over
    HTTPS checks only public CAs, so ``verify_ssl: false``. Default timeout 4.5 s.
    components/sunpower_solar/sunpower_solar.cpp reads ``devices[].SERIAL`` and the fields
    of the configured serials; it never looks at the status."""
    return requests.get(url, headers={"User-Agent": "esphome/pvs", **headers}, timeout=ESPHOME_TIMEOUT, verify=False)


def test_esphome_over_https_with_an_api_key(fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """With ``upstream.poll = ["DeviceList"]`` (needed: the PVS takes ~10 s, ESPHome waits 4.5 s)."""
    gw = make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed"}, "upstream": {"poll": ["DeviceList"]}})
    wait_polled(fresh_simulator, "DeviceList")
    before = upstream_log(fresh_simulator)
    r = esphome(f"{gw.url}/cgi-bin/dl_cgi?Command=DeviceList", {"X-API-Key": gw.keys["viewer"]})
    assert r.status_code == 200
    assert r.headers["cache-status"].startswith("pvs-gateway; hit")
    check_device_list(r.json())
    assert upstream_log(fresh_simulator) == before  # served from the poller's copy


def test_esphome_over_the_lan_listener(fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """The unchanged example: plain ``http://``, no header but its User-Agent."""
    port = free_port()
    make_gateway(
        fresh_simulator.url,
        {"server": {"tls": "self-signed", "http_port": port}, "auth": {"allow_anonymous_from": LAN}, "upstream": {"poll": ["DeviceList"]}},
    )
    wait_polled(fresh_simulator, "DeviceList")
    r = esphome(f"http://127.0.0.1:{port}/cgi-bin/dl_cgi?Command=DeviceList", {})
    assert r.status_code == 200
    check_device_list(r.json())


# -- sunpower-pvs-exporter ------------------------------------------------------------------

EXPORTER_SCRAPE = ("Start", "Get_Comm", "GridProfileGet", "DeviceList", "Stop")


def exporter_scrape(hostname: str, port: int, scheme: str = "https", timeout: int = 10) -> dict[str, Any]:
    """ginoledesma/sunpower-pvs-exporter @53fe464, sunpower_pvs_exporter/exporter.py
    ``SunPowerPVSupervisorCollector``: one ``requests.Session``; url
    ``{scheme}://{hostname}:{port}/cgi-bin/dl_cgi``; ``session.get(url, timeout=timeout,
    params={"Command": command}).json()``; ``collect()`` sends Start, Get_Comm,
    GridProfileGet, DeviceList, Stop on every scrape, and ``REGISTRY.register`` runs one at
    start (__main__.py: ``--timeout`` 10, ``--use-tls``, ``--hostname``, ``--port``). The
    hostname may carry ``user:key@`` (requests sends it as Basic); the CA comes from
    ``REQUESTS_CA_BUNDLE``. Reads ``supervisor``; ``networkstatus.interfaces[]``
    interface/internet/sms; ``active_id``, ``active_name``, ``percent``, ``status`` (a
    KeyError on any non-200 body); ``devices[]``."""
    session = requests.Session()
    url = f"{scheme}://{hostname}:{port}/cgi-bin/dl_cgi"
    answers: dict[str, Any] = {}
    for command in EXPORTER_SCRAPE:
        with session.get(url, timeout=timeout, params={"Command": command}) as response:
            assert response.status_code == 200, (command, response.text)
            answers[command] = response.json()
            answers[command + ".cache-status"] = response.headers.get("cache-status")
    return answers


def check_exporter(answers: dict[str, Any]) -> None:
    assert isinstance(answers["Start"].get("supervisor", {}), dict)
    for comm in answers["Get_Comm"]["networkstatus"]["interfaces"]:
        assert comm["interface"] and comm["internet"] and comm["sms"]
    grid = answers["GridProfileGet"]
    assert grid["active_id"] and grid["active_name"] and str(grid["percent"]) and grid["status"]
    check_device_list(answers["DeviceList"])
    assert answers["Stop"]["result"] in ("succeed", "success")


def test_sunpower_pvs_exporter_one_scrape(
    fresh_simulator: Simulator, make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--use-tls --hostname viewer:<key>@<gateway> --port 8443`` and ``REQUESTS_CA_BUNDLE``."""
    gw = make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed"}})
    assert gw.ca is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(gw.ca))  # the exporter has no CA flag; requests reads this
    fresh_simulator.reset()
    answers = exporter_scrape(f"viewer:{gw.keys['viewer']}@127.0.0.1", https_port(gw))
    check_exporter(answers)
    sent = [t for t in upstream_log(fresh_simulator) if t != ("GET", "/cgi-bin/dl_cgi/supervisor/info")]
    assert sent == [
        ("GET", "/cgi-bin/dl_cgi?Command=Get_Comm"),
        ("GET", "/cgi-bin/dl_cgi?Command=GridProfileGet"),
        ("GET", "/cgi-bin/dl_cgi?Command=DeviceList"),
    ]
    stats = fresh_simulator.stats()
    assert "Start" not in stats["by_request"] and "Stop" not in stats["by_request"] and stats["writes"] == 0


def test_sunpower_pvs_exporter_with_polling_is_served_from_memory(
    fresh_simulator: Simulator, make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``upstream.poll``, the gateway reads what the exporter asks for at start
    (supervisor/info, Get_Comm, GridProfileGet, then DeviceList), so no read of a scrape waits
    behind the ~10 s DeviceList: every answer is a hit, and Start carries ``supervisor``."""
    gw = make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed"}, "upstream": {"poll": ["DeviceList"]}})
    wait_polled(fresh_simulator, "dl_cgi/supervisor/info", "Get_Comm", "GridProfileGet", "DeviceList")
    log = upstream_log(fresh_simulator)
    assert log[:4] == [
        ("GET", "/cgi-bin/dl_cgi/supervisor/info"),
        ("GET", "/cgi-bin/dl_cgi?Command=Get_Comm"),
        ("GET", "/cgi-bin/dl_cgi?Command=GridProfileGet"),
        ("GET", "/cgi-bin/dl_cgi?Command=DeviceList"),
    ]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(gw.ca))
    started = time.monotonic()
    answers = exporter_scrape(f"viewer:{gw.keys['viewer']}@127.0.0.1", https_port(gw))
    assert time.monotonic() - started < 10  # the exporter's own timeout, for the whole scrape
    check_exporter(answers)
    assert answers["Start"]["supervisor"]["SERIAL"] == SERIAL
    for command in ("Get_Comm", "GridProfileGet", "DeviceList"):
        assert answers[command + ".cache-status"].startswith("pvs-gateway; hit"), command
    assert upstream_log(fresh_simulator)[: len(log)] == log


# -- sungazer ---------------------------------------------------------------------------------


def sungazer_body(response: httpx.Response) -> Any:
    """cmalek/sungazer @e13cab5, sungazer/client.py ``BaseClient._handle_response``:
    ``raise_for_status()``, then only the lines starting with ``{``, a tab or ``}`` are parsed
    (its guard against HTTP headers inside the body)."""
    response.raise_for_status()
    lines = [line for line in response.text.splitlines() if line.startswith(("{", "\t", "}"))]
    return json.loads("\n".join(lines))


def sungazer_client(gw: Gateway) -> httpx.Client:
    """``SungazerClient(base_url=..., timeout=30)``: ``httpx.Client(base_url=base_url,
    timeout=timeout, verify=False)``; its only place for a key is ``base_url``'s userinfo,
    which httpx sends as Basic."""
    base = gw.url.replace("https://", f"https://viewer:{gw.keys['viewer']}@") + "/cgi-bin"
    return httpx.Client(base_url=base, timeout=30, verify=False)


def test_sungazer_reads(fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """client.py: ``get("/dl_cgi", params={"Command": "Get_Comm", "SerialNumber": self.serial})``
    (no serial configured: httpx sends ``SerialNumber=`` empty), ``GridProfileGet``,
    ``CheckFW``, ``Stop`` through ``_handle_response``; ``DeviceList`` is ``json.loads(text)``."""
    gw = make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed"}})
    fresh_simulator.reset()
    with sungazer_client(gw) as c:
        comm = c.get("/dl_cgi", params={"Command": "Get_Comm", "SerialNumber": None})
        assert comm.request.url.query == b"Command=Get_Comm&SerialNumber="
        assert sungazer_body(comm)["networkstatus"]["interfaces"]
        assert sungazer_body(c.get("/dl_cgi", params={"Command": "GridProfileGet"}))["active_id"]
        assert sungazer_body(c.get("/dl_cgi", params={"Command": "CheckFW"}))["url"]
        check_device_list(json.loads(c.get("/dl_cgi", params={"Command": "DeviceList"}).text))
        assert sungazer_body(c.get("/dl_cgi", params={"Command": "Stop"}))["result"]
    assert upstream_log(fresh_simulator) == [
        ("GET", "/cgi-bin/dl_cgi?Command=Get_Comm"),
        ("GET", "/cgi-bin/dl_cgi?Command=GridProfileGet"),
        ("GET", "/cgi-bin/dl_cgi?Command=CheckFW"),
        ("GET", "/cgi-bin/dl_cgi?Command=DeviceList"),
    ]


def test_sungazer_start_on_a_cold_cache(fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """sungazer/models/session.py ``StartResponse``: ``supervisor`` is required (SERIAL, MODEL,
    SWVER, BUILD as an int...), so a Start without it fails validation; the gateway answers
    from a cached supervisor/info or DeviceList, else reads supervisor/info once (0.2 s)."""
    gw = make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed"}})
    fresh_simulator.reset()
    with sungazer_client(gw) as c:
        start = sungazer_body(c.get("/dl_cgi", params={"Command": "Start"}))
    assert start["result"] == "succeed"
    sup = start["supervisor"]
    assert sup["SERIAL"] == SERIAL and sup["MODEL"] == "PVS6" and isinstance(sup["BUILD"], int) and sup["SWVER"]
    assert upstream_log(fresh_simulator) == [("GET", "/cgi-bin/dl_cgi/supervisor/info")]
    assert fresh_simulator.stats()["writes"] == 0


# -- homebridge-pvs6 ------------------------------------------------------------------------

HOMEBRIDGE_TIMEOUT = 10.0  # src/pvs6Client.ts TIMEOUT_MS


def homebridge_request(port: int, path: str, headers: dict[str, str]) -> tuple[int, http.client.HTTPResponse, bytes]:
    """dacarson/homebridge-pvs6 @53bb576, src/pvs6Client.ts ``rawRequest``: Node
    ``https.request({hostname, path, method: "GET", headers, rejectUnauthorized: false})``,
    no port (so 443), 10 s timeout, only the headers given (Authorization or Cookie)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=HOMEBRIDGE_TIMEOUT, context=ctx)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def homebridge_poll(port: int, serial: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``authenticate()``: ``GET /auth?login`` with ``Authorization: Basic
    base64("ssm_owner:" + serial.slice(-5))``, keeps ``set-cookie[0].split(';')[0]``; ``poll()``:
    ``GET /vars?match=/sys/livedata/&fmt=obj`` then ``/vars?match=/sys/devices/meter/&fmt=obj``
    with ``Cookie`` (``cache=`` only if an answer holds a non-path key, which it does not)."""
    basic = base64.b64encode(f"ssm_owner:{serial[-5:]}".encode()).decode()
    status, response, body = homebridge_request(port, "/auth?login", {"Authorization": f"Basic {basic}"})
    assert status == 200, body
    cookie = response.headers.get_all("set-cookie")[0].split(";")[0].strip()
    assert cookie.startswith("session=")
    out = []
    for path in ("/vars?match=/sys/livedata/&fmt=obj", "/vars?match=/sys/devices/meter/&fmt=obj"):
        status, _, body = homebridge_request(port, path, {"Cookie": cookie})
        assert status == 200, body
        out.append(json.loads(body))
    return out[0], out[1]


def test_homebridge_pvs6_on_port_443(localapi_sim: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """Its configuration holds only a host and the PVS serial: the gateway listens on 443 (in
    production; here too when this process may bind it) and accepts ``ssm_owner`` with the
    serial's last 5 characters from ``auth.allow_anonymous_from``."""
    port = port_443_or_free()
    make_gateway(
        localapi_sim.url,
        {
            "server": {"tls": "self-signed", "port": port},
            "upstream": {"firmware": "localapi", "serial": SERIAL},
            "auth": {"allow_anonymous_from": LAN},
        },
    )
    localapi_sim.reset()
    livedata, meters = homebridge_poll(port, SERIAL)
    for name in ("pv_p", "pv_en", "net_p"):
        float(livedata[f"/sys/livedata/{name}"])
    consumption = [k.split("/")[4] for k, v in meters.items() if k.endswith("/prodMdlNm") and str(v).lower().endswith("c")]
    assert consumption, meters
    float(meters[f"/sys/devices/meter/{consumption[0]}/posLtea3phsumKwh"])
    float(meters[f"/sys/devices/meter/{consumption[0]}/negLtea3phsumKwh"])
    reads = [t for t in upstream_log(localapi_sim) if t[1].startswith("/vars")]
    assert reads == [
        ("GET", "/vars?match=/sys/livedata/&fmt=obj"),
        ("GET", "/vars?match=/sys/devices/meter/&fmt=obj"),
    ]


def test_wrong_password_retries_do_not_lock_out_a_good_client(localapi_sim: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """A homebridge configured with a wrong serial retries its login every 30 s for ever; the
    exporter on the same address, with its key, keeps working once the lock-out has begun."""
    gw = make_gateway(
        localapi_sim.url,
        {
            "server": {"tls": "self-signed"},
            "upstream": {"firmware": "localapi", "serial": SERIAL},
            "ratelimit": {"auth_failures": "3/10minutes"},
        },
    )
    port = https_port(gw)
    wrong = base64.b64encode(b"ssm_owner:WRONG").decode()
    statuses = [homebridge_request(port, "/auth?login", {"Authorization": f"Basic {wrong}"})[0] for _ in range(6)]
    assert set(statuses[:3]) == {401} and statuses[-1] == 429, statuses  # the retries are stopped
    r = requests.get(f"{gw.url}/cgi-bin/dl_cgi/supervisor/info", auth=("viewer", gw.keys["viewer"]), timeout=10, verify=str(gw.ca))
    assert r.status_code == 200, r.text
    assert r.json()["supervisor"]["SERIAL"] == SERIAL


# -- pypvs, pvs-hass, ha-esunpower ------------------------------------------------------------


def test_pypvs_post_vars_gets_405_with_the_get_form(fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """SunStrong-Management/pypvs @adb6a61, src/pypvs/pvs_fcgi.py ``_post_internal``:
    ``session.post(url, cookies=..., data=payload_str, ssl=False)`` to ``https://host/vars``,
    body ``name=<var>`` or ``match=<prefix>`` (smcneece/ha-esunpower @8916953,
    varserver_client.py ``_post_vars``: the same, 15 s timeout, plus ``set=`` for batteries).
    The gateway is GET-only: 405, ``Allow: GET, HEAD``, and the detail shows the GET form."""
    gw = make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed"}})
    fresh_simulator.reset()
    headers = {"Authorization": f"Bearer {gw.keys['viewer']}", "Content-Type": "application/x-www-form-urlencoded"}
    for body in ("name=/sys/info/serialnum", "match=/sys/devices/meter/", "set=/sys/telemetryws/enable=1"):
        r = requests.post(f"{gw.url}/vars", data=body, headers=headers, timeout=15, verify=False)
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD"
        assert "GET /vars?name=" in r.json()["detail"]
    assert fresh_simulator.stats()["total"] == 0


def test_ha_esunpower_setup_read_of_supervisor_info(fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """ha-esunpower config_flow.py: ``GET http://{host}/cgi-bin/dl_cgi/supervisor/info``
    (aiohttp, 30 s) reads ``supervisor.SERIAL``, ``MODEL``, ``BUILD`` or ``SWVER``. That read
    works (here over HTTPS with a key); its later ``POST /vars`` does not (test above)."""
    gw = make_gateway(fresh_simulator.url, {"server": {"tls": "self-signed"}})
    r = requests.get(f"{gw.url}/cgi-bin/dl_cgi/supervisor/info", headers={"X-API-Key": gw.keys["viewer"]}, timeout=30, verify=False)
    assert r.status_code == 200
    sup = r.json()["supervisor"]
    assert sup["SERIAL"] == SERIAL and sup["MODEL"] and (sup.get("BUILD") or sup.get("SWVER"))


# -- the deploy files that put the gateway on the bridge's ports ------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_low_ports_drop_in_grants_only_net_bind_service(tmp_path: Path) -> None:
    """The unit stays capability-free; its drop-in adds CAP_NET_BIND_SERVICE, and the two verify together."""
    unit = (DEPLOY / "pvs-gateway.service").read_text()
    drop_in = (DEPLOY / "pvs-gateway.service.d" / "low-ports.conf").read_text()
    settings = [line for line in drop_in.splitlines() if line and not line.startswith("#")]
    assert settings == [
        "[Service]",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ]
    assert "pvs-gateway.service.d/low-ports.conf" in (DEPLOY / "README.md").read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    exe = Path(sys.executable).parent / "pvs-gateway"
    combined = tmp_path / "pvs-gateway.service"  # a drop-in's lines apply after the unit's
    combined.write_text(unit.replace("/opt/pvs-gateway/bin/pvs-gateway", str(exe)) + "\n" + drop_in)
    result = subprocess.run([analyze, "verify", str(combined)], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "pvs-gateway" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_direct_compose_file_serves_443_and_80() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.direct.yml").read_text())
    (service,) = compose["services"].values()
    assert sorted(service["ports"]) == ["443:443", "80:80"]  # same ports inside: redirects name the right one
    env = service["environment"]
    assert env["PVSGW_SERVER__PORT"] == "443" and env["PVSGW_SERVER__HTTP_PORT"] == "80"
    assert json.loads(env["PVSGW_AUTH__ALLOW_ANONYMOUS_FROM"]) and json.loads(env["PVSGW_SERVER__HOSTNAMES"])
    assert str(service["sysctls"]["net.ipv4.ip_unprivileged_port_start"]) == "0"
    assert "privileged" not in service and "cap_add" not in service and "user" not in service  # the image's non-root user


def test_bridge_recipe_configuration_passes_check(tmp_path: Path) -> None:
    """The TOML of deploy/README.md's bridge recipe is a valid configuration."""
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("### Replace the Caddy bridge on the same Pi", 1)[1]
    recipe = section.split("```toml\n", 1)[1].split("```", 1)[0]
    assert "http_port = 80" in recipe and "port = 443" in recipe and "allow_anonymous_from" in recipe
    config = tmp_path / "pvs-gateway.toml"
    config.write_text(recipe)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
