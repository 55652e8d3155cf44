"""The simulator's legacy answers are printed as the PVS prints them (cJSON: tabs).

Clients depend on the layout, not only on the JSON: sungazer (cmalek/sungazer,
sungazer/client.py ``BaseClient._handle_response``) drops every body line that does
not start with ``{``, a tab or ``}`` (its guard against HTTP headers inside the
body), so a body indented with spaces loses its contents and fails to parse.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources

import httpx
import pytest

from gateway import normalize
from gateway.allowlist import Resource, classify
from gateway.cache import Lookup, ResponseCache
from gateway.errors import UpstreamUnavailable
from gateway.poller import start_supervisor
from gateway.settings import CacheSettings
from gateway.simulator import data
from gateway.simulator.legacy import device_json
from gateway.upstream import Fetched
from tests.harness import Simulator

# Cut from a raw capture (kpfleming/esphome-sunpower examples/pvs-data.json, build 61410;
# the full 31,195-byte file re-prints byte for byte): arrays stay on one line ("}, {").
DEVICE_LIST_EXCERPT = (
    '{\n\t"devices":\t[{\n\t\t\t"DETAIL":\t"detail",\n\t\t\t"panid":\t590287501,\n'
    '\t\t\t"CURTIME":\t"2023,08,23,11,37,16"\n\t\t}, {\n\t\t\t"ISDETAIL":\ttrue,\n'
    '\t\t\t"SERIAL":\t"PVS6M00000001p"\n\t\t}],\n\t"result":\t"succeed"\n}\n'
)


def sungazer_lines(text: str) -> str:
    """What sungazer parses of a body: only lines starting with '{', a tab or '}'."""
    return "\n".join(line for line in text.splitlines() if line.startswith(("{", "\t", "}")))


def test_device_json_reprints_raw_captures_byte_for_byte() -> None:
    start = resources.files("gateway.simulator").joinpath("data", "legacy_Start_pvs6_2025-06_build61839.json").read_bytes()
    assert b"\t" in start  # the sample is a raw capture, tabs kept
    assert device_json(json.loads(start)).rstrip() == start.rstrip()
    assert device_json(json.loads(DEVICE_LIST_EXCERPT)).decode() == DEVICE_LIST_EXCERPT


def test_device_json_edge_values() -> None:
    assert device_json({}) == b"{\n}\n"
    assert device_json({"a": [], "b": {}, "c": [1, 2], "d": "é/\t"}).decode() == (
        '{\n\t"a":\t[],\n\t"b":\t{\n\t},\n\t"c":\t[1, 2],\n\t"d":\t"é/\\t"\n}\n'
    )


@pytest.mark.parametrize(
    "target",
    [
        "/cgi-bin/dl_cgi?Command=DeviceList",
        "/cgi-bin/dl_cgi?Command=Start",
        "/cgi-bin/dl_cgi?Command=Stop",
        "/cgi-bin/dl_cgi?Command=Get_Comm",
        "/cgi-bin/dl_cgi?Command=GridProfileGet",
        "/cgi-bin/dl_cgi?Command=CheckFW",
        "/cgi-bin/dl_cgi/supervisor/info",
        "/cgi-bin/dl_cgi/energy-storage-system/status",
    ],
)
def test_simulator_legacy_answers_are_tab_indented(simulator: Simulator, target: str) -> None:
    with httpx.Client(base_url=simulator.url, timeout=30) as c:
        r = c.get(target)
    assert r.status_code == 200
    lines = r.text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert all(line.startswith("\t") for line in lines[1:-1]), r.text[:300]
    assert not any(line.startswith(" ") for line in lines)
    assert '":\t' in r.text  # a tab after each colon, like the device
    value = r.json()
    assert json.loads(sungazer_lines(r.text)) == value  # survives sungazer's header filter intact
    assert device_json(value) == r.content


# -- Command=Start: the supervisor object, whatever the cache holds ----------------------

START_SUPERVISOR = data.sample(data.START)["supervisor"]
PVS_ENTRY = data.sample(data.DEVICE_LIST)["devices"][0]


def test_supervisor_from_info_is_the_start_object() -> None:
    assert normalize.supervisor_from_info({"supervisor": START_SUPERVISOR}) == START_SUPERVISOR
    for bad in ({}, {"supervisor": []}, {"supervisor": {}}, [], "x", None):
        assert normalize.supervisor_from_info(bad) == {}


def test_supervisor_from_device_list_has_starts_names_and_types() -> None:
    sup = normalize.supervisor_from_device_list({"devices": [{"DEVICE_TYPE": "Inverter"}, PVS_ENTRY]})
    assert PVS_ENTRY["MODEL"] == "PV Supervisor PVS6" and sup["MODEL"] == "PVS6"
    assert sup["SERIAL"] == PVS_ENTRY["SERIAL"] and sup["SWVER"] == PVS_ENTRY["SWVER"]
    assert sup["BUILD"] == 61839 == START_SUPERVISOR["BUILD"]  # an int, as the PVS's Start sends it
    assert set(sup) <= set(START_SUPERVISOR) | {"HWVER"}
    assert normalize.supervisor_from_device_list({"devices": [{"DEVICE_TYPE": "PVS"}]}) == {}
    assert normalize.supervisor_from_device_list({"devices": "x"}) == {}


def _resource(path: str, query: str = "") -> Resource:
    return classify(path.encode(), query.encode())


def test_start_supervisor_prefers_info_then_device_list_then_reads_info() -> None:
    info = _resource("/cgi-bin/dl_cgi/supervisor/info")
    device_list = _resource("/cgi-bin/dl_cgi", "Command=DeviceList")
    bodies = {info.key: {"supervisor": START_SUPERVISOR}, device_list.key: {"devices": [PVS_ENTRY]}}

    async def run() -> None:
        cache = ResponseCache(CacheSettings())
        asked: list[str] = []

        async def lookup(resource: Resource) -> Lookup:
            asked.append(resource.key)
            return await cache.get(resource.key, 60, fetch_of(resource.key))

        def fetch_of(key: str):  # type: ignore[no-untyped-def]
            async def fetch() -> Fetched:
                return Fetched(200, json.dumps(bodies[key]).encode(), time.time())

            return fetch

        assert await start_supervisor(cache) == {}  # cold, nothing to read with
        await cache.get(device_list.key, 60, fetch_of(device_list.key))
        from_list = await start_supervisor(cache, lookup)
        assert from_list["SERIAL"] == PVS_ENTRY["SERIAL"] and asked == []  # no upstream read needed
        cold = ResponseCache(CacheSettings())
        cache = cold
        assert await start_supervisor(cold, lookup) == START_SUPERVISOR  # cold: one supervisor/info read
        assert asked == [info.key]
        assert await start_supervisor(cold, lookup) == START_SUPERVISOR and asked == [info.key]  # now cached

        async def failing(resource: Resource) -> Lookup:
            raise UpstreamUnavailable("the PVS is down")

        assert await start_supervisor(ResponseCache(CacheSettings()), failing) == {}

    asyncio.run(run())


def test_empty_serial_number_is_absent() -> None:
    empty = _resource("/cgi-bin/dl_cgi", "Command=Get_Comm&SerialNumber=")
    assert empty == _resource("/cgi-bin/dl_cgi", "Command=Get_Comm")
    assert empty.target == "/cgi-bin/dl_cgi?Command=Get_Comm"
    assert _resource("/cgi-bin/dl_cgi", "Command=Get_Comm&SerialNumber=ZT01").target.endswith("SerialNumber=ZT01")
