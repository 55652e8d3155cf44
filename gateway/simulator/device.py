"""The device's own state: identity, boot time, and what writes have changed.

Power loss (a reboot) forgets everything held in RAM: sessions, /vars query
caches, the installer "config session". Writes that real firmware persists
(power production, written variables) survive it.
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass
from typing import Any

from .localapi import SessionStore
from .model import SimClock, SiteModel, unit
from .options import SimOptions
from .stats import Stats
from .vartree import VarStore


@dataclass(frozen=True)
class Firmware:
    swver: str  # as in DeviceList / supervisor info
    build: int
    sw_rev: str  # as in /sys/info/sw_rev


FIRMWARE = {
    "legacy": Firmware("2025.06, Build 61839", 61839, "2025.06.24.61839"),
    "localapi": Firmware("2025.09, Build 61845", 61845, "2025.09.04.61845"),
}
WRITE_LOG_SIZE = 200


class Device:
    def __init__(self, options: SimOptions, stats: Stats) -> None:
        self.options = options
        self.stats = stats
        self.firmware = FIRMWARE[options.firmware]
        self.clock = SimClock(options.clock_minutes)
        self.model = SiteModel(
            serial=options.serial,
            inverters=options.inverters,
            seed=options.seed,
            interval=options.data_interval,
            clock=self.clock,
        )
        self.rng = random.Random(options.seed)  # latency jitter, 503-or-hang choices
        self.panid = 100_000_000 + int(unit(options.seed, "panid") * 900_000_000)
        # A device found running for a while (hours to days), so a reboot shows as a drop.
        self._booted = time.monotonic() - (3600 + unit(options.seed, "uptime") * 6 * 86400)
        self.sessions = SessionStore(options.session_ttl)
        self.vars = VarStore(options, self.firmware.sw_rev)
        self.config_session = False  # dl_cgi Command=Start .. Stop
        self.dhcp_renewals: collections.Counter[str] = collections.Counter()
        self.grid_profile_refreshes = 0
        self.write_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=WRITE_LOG_SIZE)

    def uptime(self) -> float:
        return time.monotonic() - self._booted

    def record_write(self, what: str) -> None:
        """Count a request that changed the device's state (a gateway should never cause one)."""
        self.stats.writes += 1
        self.write_log.append({"what": what, "time": time.time()})

    def power_lost(self) -> None:
        self.sessions.clear()
        self.vars.clear_caches()
        self.config_session = False

    def booted(self) -> None:
        self._booted = time.monotonic()

    def state_json(self) -> dict[str, Any]:
        return {
            "firmware": self.options.firmware,
            "serial": self.options.serial,
            "uptime": round(self.uptime(), 2),
            "config_session": self.config_session,
            "power_production": "On" if self.model.production_enabled else "Off",
            "dhcp_renewals": dict(self.dhcp_renewals),
            "grid_profile_refreshes": self.grid_profile_refreshes,
            "sessions": len(self.sessions),
            "writes": list(self.write_log),
        }
