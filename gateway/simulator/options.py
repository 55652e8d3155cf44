"""What a simulated PVS looks like and how fragile it is."""

from __future__ import annotations

import re
from dataclasses import dataclass

FIRMWARES = ("legacy", "localapi")
CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)")


@dataclass(frozen=True)
class SimOptions:
    """Options of one simulated PVS.

    Latencies and the reboot duration scale with ``latency_scale``; the
    LocalAPI session timeout does not (clients time it in real seconds).
    """

    host: str = "127.0.0.1"
    port: int = 8080  # 0 = ephemeral
    firmware: str = "legacy"  # "legacy" | "localapi" (localapi always serves TLS)
    tls: bool = False
    serial: str = "ZT000085000549A0001"
    latency_scale: float = 1.0
    seed: int = 0
    clock: str | None = None  # "HH:MM": simulated local time starts there; None = real local time
    inverters: int = 12
    capacity: int = 2  # device requests processed at once
    session_ttl: float = 300.0  # LocalAPI inactivity timeout, real seconds
    reboot_seconds: float | None = None  # default max(1, 480 * latency_scale) s
    overload_window: float | None = None  # default max(1, 30 * latency_scale) s
    overload_limit: int = 5  # rejections within the window that make it reboot
    cert_dir: str | None = None  # keep the TLS cert/key here; else a fresh one per start
    data_interval: float = 60.0  # seconds each measurement stays the same (the PVS refreshes in steps)
    ws_port: int = 0  # LocalAPI telemetry WebSocket; 0 = none (the command line's default is 9002)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if self.firmware not in FIRMWARES:
            out.append(f"firmware must be one of {', '.join(FIRMWARES)}, not {self.firmware!r}")
        if not 0 <= self.port <= 65535:
            out.append(f"port must be 0..65535, not {self.port}")
        if not 0 <= self.ws_port <= 65535:
            out.append(f"ws_port must be 0..65535, not {self.ws_port}")
        if len(self.serial) < 5 or not self.serial.isalnum():
            out.append("serial must be at least 5 letters or digits")
        if self.latency_scale < 0:
            out.append("latency_scale must be >= 0")
        if self.clock is not None and not CLOCK.fullmatch(self.clock):
            out.append(f"clock must be HH:MM, not {self.clock!r}")
        if not 0 <= self.inverters <= 200:
            out.append("inverters must be 0..200")
        if self.capacity < 1:
            out.append("capacity must be >= 1")
        if self.session_ttl <= 0:
            out.append("session_ttl must be > 0")
        if self.reboot_seconds is not None and self.reboot_seconds < 0:
            out.append("reboot_seconds must be >= 0")
        if self.overload_window is not None and self.overload_window <= 0:
            out.append("overload_window must be > 0")
        if self.overload_limit < 1:
            out.append("overload_limit must be >= 1")
        if self.data_interval <= 0:
            out.append("data_interval must be > 0")
        return out

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.firmware == "localapi"

    @property
    def effective_reboot_seconds(self) -> float:
        if self.reboot_seconds is not None:
            return self.reboot_seconds
        return max(1.0, 480.0 * self.latency_scale)

    @property
    def effective_overload_window(self) -> float:
        if self.overload_window is not None:
            return self.overload_window
        return max(1.0, 30.0 * self.latency_scale)

    @property
    def clock_minutes(self) -> int | None:
        """Minutes after midnight the simulated clock starts at, or None for real time."""
        if self.clock is None:
            return None
        match = CLOCK.fullmatch(self.clock)
        assert match is not None  # checked in __post_init__
        return int(match.group(1)) * 60 + int(match.group(2))
