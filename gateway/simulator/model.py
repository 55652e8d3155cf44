"""The simulated site: a PV array, a household and two meters, in simulated time.

Everything a reader sees comes from one ``Snapshot`` per data interval: the
real PVS refreshes its measurements every few minutes, so within an interval
every reader (DeviceList, /vars, /__sim/site) gets identical numbers. Powers
are a deterministic function of (seed, interval); lifetime counters are the
integral of those powers since the model started, so they only grow.
Values are rounded once here, to what the device reports, so the truth in
/__sim/site equals what a client parses out of a response.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

SUNRISE_H = 6.0
SUNSET_H = 18.0
_CLOUD_KNOT_S = 1200.0  # cloud cover drifts between knots 20 simulated minutes apart


class SimClock:
    """Simulated wall clock: real time, optionally shifted to start at a given time of day."""

    def __init__(self, start_minutes: int | None, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._offset = 0.0
        if start_minutes is not None:
            now = dt.datetime.fromtimestamp(wall())
            start = now.replace(hour=start_minutes // 60, minute=start_minutes % 60, second=0, microsecond=0)
            self._offset = start.timestamp() - now.timestamp()

    def now(self) -> float:
        return self._wall() + self._offset


def unit(*parts: object) -> float:
    """A deterministic pseudo-random number in [0, 1) for the given key."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def r4(x: float) -> float:
    """Round the way the device reports (4 decimals), without negative zero."""
    return round(x, 4) or 0.0  # -0.0 is falsy


def daylight_fraction(hour: float) -> float:
    """Clear-sky output as a fraction of peak: a smooth arch from sunrise to sunset."""
    if not SUNRISE_H < hour < SUNSET_H:
        return 0.0
    return math.pow(math.sin(math.pi * (hour - SUNRISE_H) / (SUNSET_H - SUNRISE_H)), 1.3)


def household_kw(hour: float, scale: float) -> float:
    """Typical load: a base, a breakfast bump, a midday plateau and an evening peak."""
    bumps = (
        1.1 * math.exp(-(((hour - 7.5) / 1.0) ** 2))
        + 0.4 * math.exp(-(((hour - 13.0) / 3.0) ** 2))
        + 1.9 * math.exp(-(((hour - 19.0) / 1.6) ** 2))
    )
    return scale * (0.35 + bumps)


@dataclass(frozen=True)
class InverterReading:
    serial: str
    working: bool
    p_kw: float
    lifetime_kwh: float
    vln_v: float
    i_a: float
    p_mppt_kw: float
    v_mppt_v: float
    i_mppt_a: float
    t_htsnk_degc: int
    freq_hz: float


@dataclass(frozen=True)
class MeterReading:
    serial: str
    model: str
    p_kw: float
    q_kvar: float
    s_kva: float
    pf: float
    freq_hz: float
    v12_v: float
    i_a: float  # production meter
    i1_a: float  # consumption meter: per leg
    i2_a: float
    v1n_v: float
    v2n_v: float
    p1_kw: float
    p2_kw: float
    net_kwh: float
    pos_kwh: float
    neg_kwh: float
    ct_scl_fctr: int


@dataclass(frozen=True)
class Snapshot:
    data_time: float  # epoch of the interval start (simulated)
    daylight: bool
    production_kw: float
    consumption_kw: float  # site load
    net_kw: float  # grid import (+) / export (-) = the consumption meter's reading
    production_kwh: float
    consumption_kwh: float
    net_kwh: float
    import_kwh: float
    export_kwh: float
    production_meter: MeterReading
    consumption_meter: MeterReading
    inverters: tuple[InverterReading, ...]


@dataclass
class _Energy:
    production: float
    load: float
    imported: float
    exported: float
    inverters: list[float]


@dataclass(frozen=True)
class _Powers:
    hour: float
    inverters: tuple[float, ...]
    production: float
    load: float
    net: float


class SiteModel:
    def __init__(self, *, serial: str, inverters: int, seed: int, interval: float, clock: SimClock) -> None:
        self.serial = serial
        self.seed = seed
        self.interval = interval
        self.clock = clock
        self.production_enabled = True  # dl_cgi network/powerProduction On/Off
        code = f"{1900 + int(unit(seed, 'meter') * 450):04d}"  # a plausible YYWW date code
        self.production_meter_serial = f"PVS6M{code}{serial[-4:]}p"
        self.consumption_meter_serial = f"PVS6M{code}{serial[-4:]}c"
        self.inverter_serials = tuple(f"E00{int(unit(seed, 'inv-sn', i) * 10**12):012d}" for i in range(inverters))
        self._ratings = tuple(0.30 + 0.06 * unit(seed, "rating", i) for i in range(inverters))
        self._load_scale = 0.8 + 0.4 * unit(seed, "load")
        base_inv = [1200.0 + 1500.0 * unit(seed, "inv-base", i) for i in range(inverters)]
        self._energy = _Energy(
            production=r4(sum(base_inv) * 1.02),
            load=r4(30000.0 + 20000.0 * unit(seed, "load-base")),
            imported=0.0,
            exported=0.0,
            inverters=[r4(x) for x in base_inv],
        )
        # Lifetime grid flows consistent with the above: load = production + import - export.
        self._energy.exported = r4(max(0.0, self._energy.production - 0.3 * self._energy.load))
        self._energy.imported = r4(self._energy.load - self._energy.production + self._energy.exported)
        self._integrated = self._bucket(clock.now())  # energy above is at this bucket's start
        self._cached: Snapshot | None = None

    def _bucket(self, t: float) -> int:
        return math.floor(t / self.interval)

    def _cloud(self, t: float) -> float:
        k = math.floor(t / _CLOUD_KNOT_S)
        s = t / _CLOUD_KNOT_S - k
        s = s * s * (3 - 2 * s)
        a = 1.0 - 0.45 * unit(self.seed, "cloud", k) ** 2
        b = 1.0 - 0.45 * unit(self.seed, "cloud", k + 1) ** 2
        return a + (b - a) * s

    def _powers(self, bucket: int) -> _Powers:
        t = bucket * self.interval
        local = dt.datetime.fromtimestamp(t)
        hour = local.hour + local.minute / 60 + local.second / 3600
        sun = daylight_fraction(hour) * self._cloud(t) if self.production_enabled else 0.0
        inverters = tuple(
            r4(rating * sun * (0.97 + 0.06 * unit(self.seed, "inv", i, bucket)))
            for i, rating in enumerate(self._ratings)
        )
        production = r4(sum(inverters))
        load = r4(household_kw(hour, self._load_scale) + 0.3 * unit(self.seed, "fridge", bucket))
        return _Powers(hour, inverters, production, load, r4(load - production))

    def _integrate_to(self, bucket: int) -> None:
        hours = self.interval / 3600.0
        e = self._energy
        for k in range(self._integrated, bucket):
            p = self._powers(k)
            e.production += p.production * hours
            e.load += p.load * hours
            if p.net >= 0:
                e.imported += p.net * hours
            else:
                e.exported -= p.net * hours
            for i, kw in enumerate(p.inverters):
                e.inverters[i] += kw * hours
        self._integrated = max(self._integrated, bucket)

    def set_production(self, enabled: bool) -> None:
        self.production_enabled = enabled
        self._cached = None

    def snapshot(self) -> Snapshot:
        bucket = self._bucket(self.clock.now())
        cached = self._cached
        if cached is not None and cached.data_time == bucket * self.interval:
            return cached
        self._integrate_to(bucket)
        self._cached = self._build(bucket)
        return self._cached

    def _build(self, bucket: int) -> Snapshot:
        p = self._powers(bucket)
        e = self._energy
        seed = self.seed
        daylight = daylight_fraction(p.hour) > 0

        def noise(*key: object) -> float:
            return unit(seed, *key, bucket) - 0.5

        v12 = r4(240.0 + 3.0 * noise("v12"))
        freq = r4(60.0 + 0.04 * noise("freq"))
        inverters = []
        for i, kw in enumerate(p.inverters):
            vln = round(240.0 + 3.0 * noise("vln", i), 2)
            mppt_kw = r4(kw / 0.965)
            v_mppt = round(55.0 + 4.0 * noise("vmppt", i), 2) if daylight else 0.0
            inverters.append(
                InverterReading(
                    serial=self.inverter_serials[i],
                    working=daylight,
                    p_kw=kw,
                    lifetime_kwh=r4(e.inverters[i]),
                    vln_v=vln,
                    i_a=round(kw * 1000 / vln, 2),
                    p_mppt_kw=mppt_kw,
                    v_mppt_v=v_mppt,
                    i_mppt_a=round(mppt_kw * 1000 / v_mppt, 2) if v_mppt else 0.0,
                    t_htsnk_degc=round(18 + 8 * daylight_fraction(p.hour) + 60 * kw),
                    freq_hz=round(60.0 + 0.02 * noise("ifreq", i), 2) if daylight else 0.0,
                )
            )
        q_prod = r4(0.05 + 0.15 * (noise("qp") + 0.5))
        s_prod = r4(math.hypot(p.production, q_prod))
        production_meter = MeterReading(
            serial=self.production_meter_serial,
            model="PVS6M0400p",
            p_kw=p.production,
            q_kvar=q_prod,
            s_kva=s_prod,
            pf=r4(p.production / s_prod) if s_prod else 0.0,
            freq_hz=freq,
            v12_v=v12,
            i_a=r4(s_prod * 1000 / v12),
            i1_a=0.0,
            i2_a=0.0,
            v1n_v=0.0,
            v2n_v=0.0,
            p1_kw=0.0,
            p2_kw=0.0,
            net_kwh=r4(e.production),
            pos_kwh=0.0,
            neg_kwh=0.0,
            ct_scl_fctr=50,
        )
        p1 = r4(p.net * (0.55 + 0.1 * noise("leg")))
        p2 = r4(p.net - p1)
        q_cons = r4(-0.3 - 0.4 * (noise("qc") + 0.5))
        s_cons = r4(math.hypot(p.net, q_cons))
        v1n = r4(v12 / 2 + 1.5 * noise("v1n"))
        v2n = r4(v12 - v1n)
        consumption_meter = MeterReading(
            serial=self.consumption_meter_serial,
            model="PVS6M0400c",
            p_kw=p.net,
            q_kvar=q_cons,
            s_kva=s_cons,
            pf=r4(p.net / s_cons) if s_cons else 0.0,
            freq_hz=freq,
            v12_v=v12,
            i_a=0.0,
            i1_a=r4(math.hypot(p1, q_cons / 2) * 1000 / v1n),
            i2_a=r4(math.hypot(p2, q_cons / 2) * 1000 / v2n),
            v1n_v=v1n,
            v2n_v=v2n,
            p1_kw=p1,
            p2_kw=p2,
            net_kwh=r4(e.imported - e.exported),
            pos_kwh=r4(e.imported),
            neg_kwh=r4(e.exported),
            ct_scl_fctr=100,
        )
        return Snapshot(
            data_time=bucket * self.interval,
            daylight=daylight,
            production_kw=p.production,
            consumption_kw=p.load,
            net_kw=p.net,
            production_kwh=r4(e.production),
            consumption_kwh=r4(e.load),
            net_kwh=consumption_meter.net_kwh,
            import_kwh=consumption_meter.pos_kwh,
            export_kwh=consumption_meter.neg_kwh,
            production_meter=production_meter,
            consumption_meter=consumption_meter,
            inverters=tuple(inverters),
        )

    def site_json(self) -> dict[str, object]:
        """The truth, for /__sim/site: what every reader is told during this interval."""
        s = self.snapshot()
        return {
            "time": dt.datetime.fromtimestamp(self.clock.now()).isoformat(timespec="seconds"),
            "data_time": dt.datetime.fromtimestamp(s.data_time).isoformat(timespec="seconds"),
            "data_epoch": s.data_time,
            "interval": self.interval,
            "daylight": s.daylight,
            "power_production": "On" if self.production_enabled else "Off",
            "production_kw": s.production_kw,
            "consumption_kw": s.consumption_kw,
            "net_kw": s.net_kw,
            "production_kwh": s.production_kwh,
            "consumption_kwh": s.consumption_kwh,
            "net_kwh": s.net_kwh,
            "import_kwh": s.import_kwh,
            "export_kwh": s.export_kwh,
            "meters": {
                "production": s.production_meter.serial,
                "consumption": s.consumption_meter.serial,
            },
            "inverters": [
                {
                    "serial": inv.serial,
                    "state": "working" if inv.working else "error",
                    "p_kw": inv.p_kw,
                    "lifetime_kwh": inv.lifetime_kwh,
                }
                for inv in s.inverters
            ],
        }
