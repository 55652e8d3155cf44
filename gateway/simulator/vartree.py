"""The varserver's variables (LocalAPI firmware), built from a real ``match=/`` dump.

Static variables (info, network, flags) come from the sample with this
device's identity put in; live and per-device variables are rendered from
the site model's current snapshot, so /vars and DeviceList always agree.
"""

from __future__ import annotations

import datetime as dt
import string
from collections.abc import Iterator
from typing import Any

from . import data
from .model import InverterReading, MeterReading, Snapshot, unit
from .options import SimOptions

# Readable without a session (pypvs reads these before it knows the password).
PUBLIC_VARS = frozenset({"/sys/info/serialnum", "/sys/info/ssid", "/sys/info/lmac", "/sys/info/sw_rev"})
# The only variables ssm_owner may set (PVS-API.md section 4, CSV "write" column).
WRITABLE_VARS = frozenset(
    {
        "/ess/config/dcm/mode_param/control_mode",
        "/ess/config/dcm/control_param/min_customer_soc",
        "/sys/telemetryws/enable",
        "/network/report/send",
        "/metrics/network/interface_report_request",
    }
)
_EXTRA_STATIC = {
    "/ess/config/dcm/mode_param/control_mode": "0",
    "/ess/config/dcm/control_param/min_customer_soc": "0.200000",
}
_DYNAMIC_PREFIXES = ("/sys/livedata/", "/sys/devices/")
_UPTIME = "/sys/info/uptime"
MAX_CACHES = 100
_METER_DEVICE_IDS = (11, 12)  # ids in /sys/devices/<id>/meter/data (as in the samples)


def _f6(x: float) -> str:
    return f"{x:.6f}"


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class VarStore:
    def __init__(self, options: SimOptions, sw_rev: str) -> None:
        seed = options.seed
        alphabet = string.ascii_letters + string.digits
        static: dict[str, Any] = {}
        self._layout: list[str] = []  # sample order; "" marks where device variables go
        for name, value in data.sample(data.VARS_ROOT).items():
            if name.startswith("/sys/devices/"):
                if "" not in self._layout:
                    self._layout.append("")
                continue
            self._layout.append(name)
            if name != _UPTIME and not name.startswith(_DYNAMIC_PREFIXES):
                static[name] = value
        mac_tail = ":".join(f"{int(unit(seed, 'mac', i) * 256):02X}" for i in range(3))
        static.update(
            {
                "/sys/info/serialnum": options.serial,
                "/sys/info/sw_rev": sw_rev,
                "/sys/info/ssid": f"SunPower{int(unit(seed, 'ssid') * 100000):05d}",
                "/sys/info/wpa_key": "".join(alphabet[int(unit(seed, "wpa", i) * len(alphabet))] for i in range(10)),
                "/sys/info/lmac": f"00:22:F2:{mac_tail}",
                "/sys/info/active_interface_mac": f"00:22:F2:{mac_tail}",
            }
        )
        static.update(_EXTRA_STATIC)
        self._layout.extend(_EXTRA_STATIC)
        self._static = static
        self.caches: dict[str, list[str]] = {}

    def clear_caches(self) -> None:
        self.caches.clear()

    def set(self, name: str, value: str) -> None:
        self._static[name] = value

    def get(self, name: str) -> Any:
        """A static variable's value (None for live ones)."""
        return self._static.get(name)

    def tree(self, snapshot: Snapshot, uptime: float) -> dict[str, Any]:
        """Every variable and its current value, in the device's order."""
        out: dict[str, Any] = {}
        for name in self._layout:
            if name == "":
                out.update(_device_vars(snapshot))
            elif name == _UPTIME:
                out[name] = f"{uptime:.2f}"
            elif name.startswith("/sys/livedata/"):
                out[name] = _livedata(name, snapshot)
            else:
                out[name] = self._static[name]
        out.update(_device_objects(snapshot))
        return out


def _livedata(name: str, s: Snapshot) -> str:
    values = {
        "time": str(int(s.data_time)),
        "pv_p": _f6(s.production_kw),
        "pv_en": _f6(s.production_kwh),
        "net_p": _f6(s.net_kw),
        "net_en": _f6(s.net_kwh),
        "site_load_p": _f6(s.consumption_kw),
        "site_load_en": _f6(s.consumption_kwh),
        "ess_en": "nan",
        "ess_p": "nan",
        "soc": "nan",
        "backupTimeRemaining": "0",
        "midstate": "0",
    }
    return values.get(name.rsplit("/", 1)[1], "0")


def _meter_fields(m: MeterReading, eps: str, full: bool) -> dict[str, Any]:
    """camelCase meter fields; the production meter has no per-leg data (zeros, as on a real PVS)."""
    fields: dict[str, Any] = {
        "ctSclFctr": m.ct_scl_fctr,
        "freqHz": m.freq_hz,
        "i1A": m.i1_a,
        "i2A": m.i2_a,
        "msmtEps": eps,
        "negLtea3phsumKwh": m.neg_kwh,
        "netLtea3phsumKwh": m.net_kwh,
        "p1Kw": m.p1_kw,
        "p2Kw": m.p2_kw,
        "p3phsumKw": m.p_kw,
        "posLtea3phsumKwh": m.pos_kwh,
        "prodMdlNm": m.model,
        "q3phsumKvar": m.q_kvar,
        "s3phsumKva": m.s_kva,
        "sn": m.serial,
        "totPfRto": m.pf,
        "v12V": m.v12_v,
        "v1nV": m.v1n_v,
        "v2nV": m.v2n_v,
    }
    if not full:
        for key in ("i1A", "i2A", "negLtea3phsumKwh", "p1Kw", "p2Kw", "posLtea3phsumKwh", "v1nV", "v2nV"):
            del fields[key]
    return fields


def _inverter_fields(inv: InverterReading, eps: str) -> dict[str, Any]:
    return {
        "freqHz": inv.freq_hz,
        "i3phsumA": inv.i_a,
        "iMppt1A": inv.i_mppt_a,
        "ltea3phsumKwh": inv.lifetime_kwh,
        "msmtEps": eps,
        "p3phsumKw": inv.p_kw,
        "pMppt1Kw": inv.p_mppt_kw,
        "prodMdlNm": "AC_Module_Type_E",
        "sn": inv.serial,
        "tHtsnkDegc": inv.t_htsnk_degc,
        "vMppt1V": inv.v_mppt_v,
        "vln3phavgV": inv.vln_v,
    }


def _flat(prefix: str, fields: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for key, value in fields.items():
        text = _f6(value) if isinstance(value, float) else str(value)
        yield f"{prefix}/{key}", text


def _device_vars(s: Snapshot) -> dict[str, str]:
    eps = _iso(s.data_time)
    out: dict[str, str] = {}
    for i, meter in enumerate((s.production_meter, s.consumption_meter)):
        out.update(_flat(f"/sys/devices/meter/{i}", _meter_fields(meter, eps, full=True)))
    for i, inv in enumerate(s.inverters):
        out.update(_flat(f"/sys/devices/inverter/{i}", _inverter_fields(inv, eps)))
    return out


def _device_objects(s: Snapshot) -> dict[str, dict[str, Any]]:
    """The JSON-valued variables (``/sys/devices/<id>/<kind>/data``), as nested objects."""
    eps = _iso(s.data_time)
    out: dict[str, dict[str, Any]] = {}
    masks = ("67174655", "70239999")
    for dev_id, meter, full, mask in zip(
        _METER_DEVICE_IDS, (s.production_meter, s.consumption_meter), (False, True), masks, strict=True
    ):
        out[f"/sys/devices/{dev_id}/meter/data"] = {**_meter_fields(meter, eps, full), "vldFldMsk": mask}
    for i, inv in enumerate(s.inverters):
        fields = _inverter_fields(inv, eps)
        del fields["i3phsumA"]
        out[f"/sys/devices/{21 + 10 * i}/inverter/data"] = {**fields, "vldFld2Msk": "1", "vldFldMsk": "8125"}
    return out
