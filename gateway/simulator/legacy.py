"""The legacy ``/cgi-bin/dl_cgi`` API: ``?Command=`` and path-style requests.

Shapes come from the samples in ``data/``; ``GetDiscoveryProgress``,
``network/interfaces`` and ``energy-storage-system/status`` have no public
sample, so their bodies follow the shapes described in PVS-API.md and the
sungazer client's models. Commands that change state (``Start``/``Stop``,
``GridProfileRefresh``, DHCP renewals, any POST) are recorded as writes.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from . import data
from .httpio import Request, Response
from .model import Snapshot

if TYPE_CHECKING:
    from .device import Device

# Base latency (seconds, before latency_scale and jitter) of each kind of request.
DEVICE_LIST_SECONDS = 10.0
LATENCY = {"DeviceList": DEVICE_LIST_SECONDS, "dl_cgi/devices/list": DEVICE_LIST_SECONDS, "Get_Comm": 1.0}
DEFAULT_LATENCY = 0.2

READ_PATHS = (
    "supervisor/info",
    "communication/interfaces",
    "network/interfaces",
    "devices/list",
    "network/powerProduction",
    "energy-storage-system/status",
)
DHCP_PREFIX = "network/interfaceConfig/dhcp/"
DHCP_TYPES = ("eth", "wifi", "plc")


def device_json(value: Any) -> bytes:
    """JSON as the PVS's own encoder (cJSON) prints it: a tab per level, a tab after each
    colon, the items of an array on one line (``}, {``); raw captures in the public
    samples (DeviceList build 61410 and 61839, Start) look like this. Clients rely on it:
    sungazer keeps only the body lines starting with ``{``, a tab or ``}``."""
    return (_cjson(value, 0) + "\n").encode()


def _cjson(value: Any, depth: int) -> str:
    if isinstance(value, dict):
        if not value:
            return "{\n" + "\t" * depth + "}"
        items = (
            "\t" * (depth + 1) + json.dumps(str(k), ensure_ascii=False) + ":\t" + _cjson(v, depth + 1)
            for k, v in value.items()
        )
        return "{\n" + ",\n".join(items) + "\n" + "\t" * depth + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_cjson(v, depth + 1) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def device_response(status: int, value: Any) -> Response:
    return Response(status, device_json(value))


def num(x: float) -> str:
    """A measurement as the device prints it: up to 4 decimals, no trailing zeros."""
    text = f"{x:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def stamp(epoch: float) -> str:
    """``DATATIME``/``CURTIME``: no zone in the text; the PVS's clock runs UTC (PVS-API.md, gateway.normalize)."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y,%m,%d,%H,%M,%S")


def command_of(request: Request) -> str | None:
    for key, value in request.params():
        if key == "Command":
            return value
    return None


def handle_command(device: Device, request: Request, command: str | None) -> Response:
    params = dict(request.params())
    if command == "DeviceList":
        return device_response(200, device_list(device))
    if command == "Get_Comm":
        return device_response(200, _get_comm(device))
    if command == "GridProfileGet":
        return device_response(200, data.sample(data.GRID_PROFILE_GET))
    if command == "CheckFW":
        return device_response(200, data.sample(data.CHECK_FW))
    if command == "DeviceDetails":
        serial = params.get("SerialNumber", "")
        found = [d for d in device_list(device)["devices"] if d.get("SERIAL") == serial]
        if not found:
            return device_response(400, {"result": "error", "error": f"unknown SerialNumber {serial!r}"})
        return device_response(200, {"devices": found, "result": "succeed"})
    if command == "GetDiscoveryProgress":
        return device_response(200, _discovery_progress(device))
    if command == "Start":
        device.config_session = True
        device.record_write("Command=Start")
        return device_response(200, {"result": "succeed", "supervisor": _supervisor(device)})
    if command == "Stop":
        device.config_session = False
        device.record_write("Command=Stop")
        return device_response(200, data.sample(data.STOP))
    if command == "GridProfileRefresh":
        device.grid_profile_refreshes += 1
        device.record_write("Command=GridProfileRefresh")
        return device_response(200, data.sample(data.GRID_PROFILE_REFRESH))
    return device_response(400, {"result": "error", "error": f"unsupported Command {command!r}"})


def handle_path(device: Device, request: Request, path: str) -> Response:
    """``path`` is what follows ``/cgi-bin/dl_cgi/``."""
    if request.method in ("POST", "PUT", "DELETE", "PATCH"):
        return _write_path(device, request, path)
    if request.method not in ("GET", "HEAD"):
        return device_response(405, {"result": "error", "error": "method not allowed"})
    if path == "supervisor/info":
        return device_response(200, {"supervisor": _supervisor(device)})
    if path == "communication/interfaces":
        return device_response(200, _get_comm(device))
    if path == "network/interfaces":
        return device_response(200, {"result": "succeed", "interfaces": _get_comm(device)["networkstatus"]["interfaces"]})
    if path == "devices/list":
        return device_response(200, device_list(device))
    if path == "network/powerProduction":
        return device_response(200, {"powerProduction": "On" if device.model.production_enabled else "Off"})
    if path == "energy-storage-system/status":
        return device_response(200, _ess_status())
    if path.startswith(DHCP_PREFIX) and path[len(DHCP_PREFIX) :] in DHCP_TYPES:
        # A GET that changes state: the lease is really renewed.
        kind = path[len(DHCP_PREFIX) :]
        device.dhcp_renewals[kind] += 1
        device.record_write(f"dhcp renew {kind}")
        return device_response(200, {"result": "succeed"})
    return device_response(404, {"result": "error", "error": "not found"})


def _write_path(device: Device, request: Request, path: str) -> Response:
    if path == "network/powerProduction":
        try:
            wanted = json.loads(request.body or b"null").get("powerProduction")
        except (ValueError, AttributeError):
            wanted = None
        if wanted not in ("On", "Off"):
            return device_response(400, {"result": "error", "error": "powerProduction must be On or Off"})
        device.model.set_production(wanted == "On")
        device.record_write(f"powerProduction {wanted}")
        return device_response(200, {"powerProduction": wanted})
    device.record_write(f"{request.method} dl_cgi/{path}")
    return device_response(200, {"result": "succeed"})


def device_list(device: Device) -> dict[str, Any]:
    snap = device.model.snapshot()
    now = device.clock.now()
    pvs_t, prod_t, cons_t, inv_t = data.sample(data.DEVICE_LIST)["devices"]
    devices = [
        _pvs_entry(device, pvs_t, snap, now),
        _meter_entry(prod_t, snap.production_meter, snap, now),
        _meter_entry(cons_t, snap.consumption_meter, snap, now),
    ]
    for i, inv in enumerate(snap.inverters):
        entry: dict[str, Any] = {
            "ISDETAIL": True,
            "SERIAL": inv.serial,
            "TYPE": "SOLARBRIDGE",
            "STATE": "working" if inv.working else "error",
            "STATEDESCR": "Working" if inv.working else "Error",
            "MODEL": inv_t["MODEL"],
            "DESCR": f"Inverter {inv.serial}",
            "DEVICE_TYPE": "Inverter",
            "hw_version": inv_t["hw_version"],
            "interface": "mime",
            "PANEL": "SPR-X22-360-E-AC",
            "slave": i,
            "SWVER": inv_t["SWVER"],
            "PORT": "",
            "MOD_SN": "",
            "NMPLT_SKU": "",
        }
        if inv.working:  # at night inverters report an error state and no measurements
            entry.update(
                {
                    "DATATIME": stamp(snap.data_time),
                    "ltea_3phsum_kwh": num(inv.lifetime_kwh),
                    "p_3phsum_kw": num(inv.p_kw),
                    "vln_3phavg_v": num(inv.vln_v),
                    "i_3phsum_a": num(inv.i_a),
                    "p_mppt1_kw": num(inv.p_mppt_kw),
                    "v_mppt1_v": num(inv.v_mppt_v),
                    "i_mppt1_a": num(inv.i_mppt_a),
                    "t_htsnk_degc": str(inv.t_htsnk_degc),
                    "freq_hz": num(inv.freq_hz),
                    "stat_ind": "0",
                }
            )
        entry.update({"origin": "data_logger", "OPERATION": "noop", "CURTIME": stamp(now)})
        devices.append(entry)
    return {"devices": devices, "result": "succeed"}


def _pvs_entry(device: Device, t: dict[str, Any], snap: Snapshot, now: float) -> dict[str, Any]:
    stats = device.stats
    t.update(
        {
            "SERIAL": device.options.serial,
            "SWVER": device.firmware.swver,
            "DATATIME": stamp(snap.data_time),
            "dl_uptime": str(int(device.uptime())),
            "dl_cpu_load": f"{min(4.0, 0.25 + 0.45 * stats.in_flight):.2f}",
            "dl_mem_used": str(48000 + 2500 * stats.in_flight + len(device.sessions) * 16),
            # Every request used to cost flash on old firmware; a slow drain shows it.
            "dl_flash_avail": str(max(0, 59039 - stats.total // 50)),
            "panid": device.panid,
            "CURTIME": stamp(now),
        }
    )
    return t


def _meter_entry(t: dict[str, Any], m: Any, snap: Snapshot, now: float) -> dict[str, Any]:
    t.update({"SERIAL": m.serial, "DESCR": f"Power Meter {m.serial}", "DATATIME": stamp(snap.data_time)})
    values = {
        "ct_scl_fctr": str(m.ct_scl_fctr),
        "net_ltea_3phsum_kwh": num(m.net_kwh),
        "p_3phsum_kw": num(m.p_kw),
        "q_3phsum_kvar": num(m.q_kvar),
        "s_3phsum_kva": num(m.s_kva),
        "tot_pf_rto": num(m.pf),
        "freq_hz": num(m.freq_hz),
        "i_a": num(m.i_a),
        "i1_a": num(m.i1_a),
        "i2_a": num(m.i2_a),
        "v1n_v": num(m.v1n_v),
        "v2n_v": num(m.v2n_v),
        "v12_v": num(m.v12_v),
        "p1_kw": num(m.p1_kw),
        "p2_kw": num(m.p2_kw),
        "neg_ltea_3phsum_kwh": num(m.neg_kwh),
        "pos_ltea_3phsum_kwh": num(m.pos_kwh),
        "CAL0": str(m.ct_scl_fctr),
        "CURTIME": stamp(now),
    }
    for key in t.keys() & values.keys():  # only the fields this kind of meter has
        t[key] = values[key]
    return t


def _supervisor(device: Device) -> dict[str, Any]:
    sup: dict[str, Any] = data.sample(data.START)["supervisor"]
    sup.update({"SWVER": device.firmware.swver, "SERIAL": device.options.serial, "BUILD": device.firmware.build})
    return sup


def _get_comm(device: Device) -> dict[str, Any]:
    body: dict[str, Any] = data.sample(data.GET_COMM)
    body["networkstatus"]["ts"] = str(int(device.clock.now()))
    return body


def _discovery_progress(device: Device) -> dict[str, Any]:
    found = (("PVS5-METER-P", 1), ("PVS5-METER-C", 1), ("SOLARBRIDGE", device.options.inverters))
    return {
        "progress": [{"TYPE": kind, "PROGR": 100, "NFOUND": n} for kind, n in found],
        "complete": True,
        "result": "succeed",
    }


def _ess_status() -> dict[str, Any]:
    # A PV-only site: the report exists but lists no storage hardware.
    return {
        "ess_report": {
            "battery_status": [],
            "ess_status": [],
            "hub_plus_status": {},
            "ess_state": {"operational_mode": "n/a", "permission_to_operate": False},
        }
    }
