"""One data model for the site, whichever firmware the PVS runs.

Legacy firmware describes everything in one DeviceList (strings, legacy field
names, ``DATATIME`` stamps); LocalAPI firmware answers ``/vars`` with
``/sys/livedata/*`` site totals, ``/sys/devices/<kind>/<i>/<field>``
camelCase device fields and ``/sys/info/*``. Both become a ``SiteReading``: numbers
as numbers, units in the names, times as Unix seconds (rendered ISO 8601 UTC).

Decisions that make the two agree:
- SiteReading totals on legacy come from the meters. A consumption meter on the load
  side (``NET_CONSUMPTION_LOADSIDE``, the usual install) measures the grid:
  consumption = production + net. A line-side one measures the house:
  net = consumption - production. LocalAPI's livedata already holds the
  PVS's own totals and is used as is (meters only when livedata is missing).
- kW and kWh are rounded to 4 decimals, the device's precision: LocalAPI
  prints float32 noise in 6 (``27867.650391``).
- ``DATATIME`` has no zone; the PVS clock runs UTC (ha-esunpower writes it
  from ``utcnow()`` when it converts LocalAPI data back to DeviceList).
- LocalAPI reports no device state: an inverter counts as working while it
  is synchronised to the grid (frequency above 0), which is what legacy
  firmware calls "working" (at night both report it stopped).
- What one firmware does not report is ``None``, never invented:
  legacy has a load average and free flash in KiB, LocalAPI percentages.

Pure functions over parsed JSON; no I/O, no gateway imports.
"""

from __future__ import annotations

import calendar
import datetime as dt
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

# A device's flat LocalAPI variable: /sys/devices/meter/0/p3phsumKw
_DEVICE_VAR = re.compile(r"/sys/devices/(meter|inverter)/(\d+)/(\w+)")


@dataclass(frozen=True, slots=True)
class Meter:
    serial: str
    model: str
    role: str  # "production" | "consumption" | "unknown"
    placement: str | None  # e.g. "NET_CONSUMPTION_LOADSIDE"
    state: str
    power_kw: float | None
    reactive_power_kvar: float | None
    apparent_power_kva: float | None
    power_factor: float | None
    frequency_hz: float | None
    voltage_v: float | None
    lifetime_net_kwh: float | None
    lifetime_import_kwh: float | None
    lifetime_export_kwh: float | None
    measured_at: float | None


@dataclass(frozen=True, slots=True)
class Inverter:
    serial: str
    model: str
    state: str  # "working" | "error"
    power_kw: float | None
    lifetime_production_kwh: float | None
    voltage_v: float | None
    current_a: float | None
    mppt_power_kw: float | None
    mppt_voltage_v: float | None
    mppt_current_a: float | None
    temperature_c: float | None
    frequency_hz: float | None
    measured_at: float | None


@dataclass(frozen=True, slots=True)
class PVS:
    serial: str | None = None
    model: str | None = None
    software_version: str | None = None
    uptime_s: float | None = None
    cpu_load: float | None = None  # legacy: load average
    cpu_usage_percent: float | None = None  # LocalAPI
    memory_used_kib: float | None = None  # legacy
    ram_usage_percent: float | None = None  # LocalAPI
    flash_available_kib: float | None = None  # legacy
    flash_usage_percent: float | None = None  # LocalAPI


@dataclass(frozen=True, slots=True)
class Totals:
    production_kw: float | None = None
    consumption_kw: float | None = None
    net_kw: float | None = None  # grid: + importing, - exporting
    lifetime_production_kwh: float | None = None
    lifetime_consumption_kwh: float | None = None
    lifetime_net_kwh: float | None = None  # imported - exported
    lifetime_import_kwh: float | None = None
    lifetime_export_kwh: float | None = None


@dataclass(frozen=True, slots=True)
class SiteReading:
    firmware: str
    totals: Totals
    measured_at: float | None
    pvs: PVS
    meters: tuple[Meter, ...] = ()
    inverters: tuple[Inverter, ...] = field(default=())

    def meter(self, role: str) -> Meter | None:
        return next((m for m in self.meters if m.role == role), None)


# ---------------------------------------------------------------- legacy


def from_device_list(body: dict[str, Any]) -> SiteReading:
    """A legacy ``DeviceList`` answer -> SiteReading."""
    devices = [d for d in body.get("devices", ()) if isinstance(d, dict)]
    pvs = PVS()
    pvs_time = None
    meters: list[Meter] = []
    inverters: list[Inverter] = []
    for d in devices:
        kind = d.get("DEVICE_TYPE")
        if kind == "PVS":
            pvs = PVS(
                serial=_str(d.get("SERIAL")),
                model=_str(d.get("MODEL")),
                software_version=_str(d.get("SWVER")),
                uptime_s=num(d.get("dl_uptime")),
                cpu_load=num(d.get("dl_cpu_load")),
                memory_used_kib=num(d.get("dl_mem_used")),
                flash_available_kib=num(d.get("dl_flash_avail")),
            )
            pvs_time = datatime(d.get("DATATIME"))
        elif kind == "Power Meter":
            meters.append(
                Meter(
                    serial=str(d.get("SERIAL", "")),
                    model=str(d.get("MODEL", "")),
                    role=_meter_role(d.get("TYPE"), d.get("MODEL"), d.get("SERIAL")),
                    placement=_str(d.get("subtype")),
                    state=str(d.get("STATE", "unknown")).lower(),
                    power_kw=kw(d.get("p_3phsum_kw")),
                    reactive_power_kvar=kw(d.get("q_3phsum_kvar")),
                    apparent_power_kva=kw(d.get("s_3phsum_kva")),
                    power_factor=kw(d.get("tot_pf_rto")),
                    frequency_hz=num(d.get("freq_hz")),
                    voltage_v=num(d.get("v12_v")),
                    lifetime_net_kwh=kw(d.get("net_ltea_3phsum_kwh")),
                    lifetime_import_kwh=kw(d.get("pos_ltea_3phsum_kwh")),
                    lifetime_export_kwh=kw(d.get("neg_ltea_3phsum_kwh")),
                    measured_at=datatime(d.get("DATATIME")),
                )
            )
        elif kind == "Inverter":
            inverters.append(
                Inverter(
                    serial=str(d.get("SERIAL", "")),
                    model=str(d.get("MODEL", "")),
                    state="working" if str(d.get("STATE", "")).lower() == "working" else "error",
                    power_kw=kw(d.get("p_3phsum_kw")),
                    lifetime_production_kwh=kw(d.get("ltea_3phsum_kwh")),
                    voltage_v=num(d.get("vln_3phavg_v")),
                    current_a=num(d.get("i_3phsum_a")),
                    mppt_power_kw=kw(d.get("p_mppt1_kw", d.get("p_mpptsum_kw"))),
                    mppt_voltage_v=num(d.get("v_mppt1_v")),
                    mppt_current_a=num(d.get("i_mppt1_a")),
                    temperature_c=num(d.get("t_htsnk_degc")),
                    frequency_hz=num(d.get("freq_hz")),
                    measured_at=datatime(d.get("DATATIME")),
                )
            )
    totals = totals_from_meters(meters, inverters)
    production = next((m for m in meters if m.role == "production"), None)
    measured = production.measured_at if production is not None else pvs_time
    return SiteReading("legacy", totals, measured, pvs, tuple(meters), tuple(inverters))


# ---------------------------------------------------------------- LocalAPI


def from_vars(values: dict[str, Any]) -> SiteReading:
    """``/vars`` answers (obj form, merged) -> SiteReading."""
    groups: dict[tuple[str, int], dict[str, Any]] = {}
    for name, value in values.items():
        match = _DEVICE_VAR.fullmatch(name)
        if match:
            groups.setdefault((match.group(1), int(match.group(2))), {})[match.group(3)] = value
    meters: list[Meter] = []
    inverters: list[Inverter] = []
    for (kind, _), d in sorted(groups.items()):
        eps = iso_time(d.get("msmtEps"))
        if kind == "meter":
            meters.append(
                Meter(
                    serial=str(d.get("sn", "")),
                    model=str(d.get("prodMdlNm", "")),
                    role=_meter_role(None, d.get("prodMdlNm"), d.get("sn")),
                    placement=None,
                    state="working",  # a meter whose readings are listed is reporting
                    power_kw=kw(d.get("p3phsumKw")),
                    reactive_power_kvar=kw(d.get("q3phsumKvar")),
                    apparent_power_kva=kw(d.get("s3phsumKva")),
                    power_factor=kw(d.get("totPfRto")),
                    frequency_hz=num(d.get("freqHz")),
                    voltage_v=num(d.get("v12V")),
                    lifetime_net_kwh=kw(d.get("netLtea3phsumKwh")),
                    lifetime_import_kwh=_grid_only(kw(d.get("posLtea3phsumKwh")), d.get("prodMdlNm")),
                    lifetime_export_kwh=_grid_only(kw(d.get("negLtea3phsumKwh")), d.get("prodMdlNm")),
                    measured_at=eps,
                )
            )
        else:
            freq = num(d.get("freqHz"))
            inverters.append(
                Inverter(
                    serial=str(d.get("sn", "")),
                    model=str(d.get("prodMdlNm", "")),
                    state="working" if freq else "error",
                    power_kw=kw(d.get("p3phsumKw")),
                    lifetime_production_kwh=kw(d.get("ltea3phsumKwh")),
                    voltage_v=num(d.get("vln3phavgV")),
                    current_a=num(d.get("i3phsumA")),
                    mppt_power_kw=kw(d.get("pMppt1Kw")),
                    mppt_voltage_v=num(d.get("vMppt1V")),
                    mppt_current_a=num(d.get("iMppt1A")),
                    temperature_c=num(d.get("tHtsnkDegc")),
                    frequency_hz=freq,
                    measured_at=eps,
                )
            )
    pvs = PVS(
        serial=_str(values.get("/sys/info/serialnum")),
        model=_str(values.get("/sys/info/model")),
        software_version=_str(values.get("/sys/info/sw_rev")),
        uptime_s=num(values.get("/sys/info/uptime")),
        cpu_usage_percent=num(values.get("/sys/info/cpu_usage")),
        ram_usage_percent=num(values.get("/sys/info/ram_usage")),
        flash_usage_percent=num(values.get("/sys/info/flash_usage")),
    )
    totals = totals_from_meters(meters, inverters)
    live = _livedata(values)
    if live.production_kw is not None:
        # The PVS's own site totals; grid import/export only the meter knows.
        totals = Totals(
            production_kw=live.production_kw,
            consumption_kw=live.consumption_kw,
            net_kw=live.net_kw,
            lifetime_production_kwh=live.lifetime_production_kwh,
            lifetime_consumption_kwh=live.lifetime_consumption_kwh,
            lifetime_net_kwh=live.lifetime_net_kwh,
            lifetime_import_kwh=totals.lifetime_import_kwh,
            lifetime_export_kwh=totals.lifetime_export_kwh,
        )
    measured = num(values.get("/sys/livedata/time"))
    if measured is None:
        production = next((m for m in meters if m.role == "production"), None)
        measured = production.measured_at if production is not None else None
    return SiteReading("localapi", totals, measured, pvs, tuple(meters), tuple(inverters))


def _livedata(values: dict[str, Any]) -> Totals:
    def get(name: str) -> float | None:
        return kw(values.get(f"/sys/livedata/{name}"))

    return Totals(
        production_kw=get("pv_p"),
        consumption_kw=get("site_load_p"),
        net_kw=get("net_p"),
        lifetime_production_kwh=get("pv_en"),
        lifetime_consumption_kwh=get("site_load_en"),
        lifetime_net_kwh=get("net_en"),
    )


# ---------------------------------------------------------------- shared


def totals_from_meters(meters: list[Meter], inverters: list[Inverter]) -> Totals:
    production = next((m for m in meters if m.role == "production"), None)
    consumption = next((m for m in meters if m.role == "consumption"), None)
    if production is not None:
        prod_kw, prod_kwh = production.power_kw, production.lifetime_net_kwh
    else:  # no production meter: the inverters are the best measure there is
        prod_kw = _sum(i.power_kw for i in inverters)
        prod_kwh = _sum(i.lifetime_production_kwh for i in inverters)
    cons_kw = net_kw = cons_kwh = net_kwh = imp = exp = None
    if consumption is not None:
        imp, exp = consumption.lifetime_import_kwh, consumption.lifetime_export_kwh
        if (consumption.placement or "").startswith("GROSS_CONSUMPTION"):
            cons_kw, cons_kwh = consumption.power_kw, consumption.lifetime_net_kwh
            net_kw, net_kwh = _minus(cons_kw, prod_kw), _minus(cons_kwh, prod_kwh)
            imp = exp = None  # a line-side meter does not see the grid
        else:
            net_kw, net_kwh = consumption.power_kw, consumption.lifetime_net_kwh
            cons_kw, cons_kwh = _plus(prod_kw, net_kw), _plus(prod_kwh, net_kwh)
    return Totals(prod_kw, cons_kw, net_kw, prod_kwh, cons_kwh, net_kwh, imp, exp)


def num(value: Any) -> float | None:
    """A device value as a finite float, or None ("nan", "", missing, garbage)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        try:
            out = float(str(value).strip())
        except ValueError:
            return None
    return out if math.isfinite(out) else None


def kw(value: Any) -> float | None:
    """A power or energy: 4 decimals, the device's own precision."""
    out = num(value)
    return None if out is None else (round(out, 4) or 0.0)


def datatime(value: Any) -> float | None:
    """Legacy ``"YYYY,MM,DD,HH,MM,SS"`` (UTC) -> Unix seconds."""
    try:
        parts = [int(p) for p in str(value).split(",")]
        if len(parts) != 6:
            return None
        year, month, day, hour, minute, second = parts
        return float(calendar.timegm(dt.datetime(year, month, day, hour, minute, second).timetuple()))
    except (TypeError, ValueError):
        return None


def iso_time(value: Any) -> float | None:
    """``2025-09-30T15:50:00Z`` -> Unix seconds."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)  # 3.11+ reads the "Z"
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meter_role(kind: Any, model: Any, serial: Any) -> str:
    for text in (kind, model, serial):
        tail = str(text or "").strip().lower()[-1:]
        if tail == "p":
            return "production"
        if tail == "c":
            return "consumption"
    return "unknown"


def _grid_only(value: float | None, model: Any) -> float | None:
    # LocalAPI fills fields a production meter lacks with zeros; legacy omits them.
    return None if str(model or "").lower().endswith("p") else value


def _str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _sum(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 4) if known else None


def _plus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a + b, 4) or 0.0


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4) or 0.0


# ---------------------------------------------------------------- JSON


def meter_json(m: Meter) -> dict[str, Any]:
    out = asdict(m)
    del out["placement"]  # legacy-only detail; it already shaped the totals
    out["measured_at"] = iso(m.measured_at)
    return out


def inverter_json(i: Inverter) -> dict[str, Any]:
    out = asdict(i)
    out["measured_at"] = iso(i.measured_at)
    return out


def summary_json(site: SiteReading) -> dict[str, Any]:
    """The site at a glance: totals, the PVS, and each inverter's output (for bars)."""
    working = sum(1 for i in site.inverters if i.state == "working")
    return {
        "firmware": site.firmware,
        "measured_at": iso(site.measured_at),
        **asdict(site.totals),
        "inverter_count": len(site.inverters),
        "inverters_working": working,
        "inverters": [
            {"serial": i.serial, "state": i.state, "power_kw": i.power_kw, "temperature_c": i.temperature_c}
            for i in site.inverters
        ],
        "pvs": asdict(site.pvs),
    }


def devices_json(site: SiteReading) -> dict[str, Any]:
    return {
        "firmware": site.firmware,
        "measured_at": iso(site.measured_at),
        "pvs": asdict(site.pvs),
        "meters": [meter_json(m) for m in site.meters],
        "inverters": [inverter_json(i) for i in site.inverters],
    }


# -- the answer to Command=Start -------------------------------------------------------

_BUILD = re.compile(r"Build\s+(\d+)")


def supervisor_from_info(body: Any) -> dict[str, Any]:
    """The ``supervisor`` object of a ``dl_cgi/supervisor/info`` answer: the PVS puts the
    same object in its answer to ``Command=Start`` (samples: Start build 61839; PVS-API.md
    §2), so it is used as is. {} if the body holds none."""
    sup = body.get("supervisor") if isinstance(body, dict) else None
    return dict(sup) if isinstance(sup, dict) and sup else {}


def supervisor_from_device_list(body: Any) -> dict[str, Any]:
    """A ``supervisor`` object built from the PVS entry of a DeviceList, in Start's types.

    That entry names the model "PV Supervisor PVS6" where Start says "PVS6", and has no
    ``BUILD``: it is read from ``SWVER`` ("2025.06, Build 61839"), a number as in Start
    (sungazer's model types it int). Fields the entry lacks are left out, never invented.
    """
    devices = body.get("devices") if isinstance(body, dict) else None
    pvs = next((d for d in devices or () if isinstance(d, dict) and d.get("DEVICE_TYPE") == "PVS"), None)
    if pvs is None:
        return {}
    sup: dict[str, Any] = {k: str(pvs[k]) for k in ("SWVER", "SERIAL", "MODEL", "HWVER") if pvs.get(k) is not None}
    if "MODEL" in sup:
        sup["MODEL"] = sup["MODEL"].removeprefix("PV Supervisor ").strip()
    build = _BUILD.search(sup.get("SWVER", ""))
    if build:
        sup["BUILD"] = int(build.group(1))
    return sup
