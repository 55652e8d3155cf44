"""Counters of what reached the device, for tests and benchmarks (never /__sim/*)."""

from __future__ import annotations

import collections
import time
from typing import Any

REQUEST_LOG_SIZE = 1000
# A client can invent any number of paths; past this many keys the rest are
# counted under one, so the counters stay bounded.
MAX_KEYS = 500
OTHER_KEY = "(other)"
MAX_LOGGED_TARGET = 8192  # keeps the log's memory bounded; real targets are far shorter


class Stats:
    def __init__(self) -> None:
        self.ws_clients = 0  # telemetry sockets open now (never reset)
        self.reset(in_flight=0)

    def reset(self, *, in_flight: int | None = None) -> None:
        """Zero the counters; requests still open stay counted as in flight."""
        self.total = 0
        self.by_request: collections.Counter[str] = collections.Counter()
        self.by_method: collections.Counter[str] = collections.Counter()
        if in_flight is not None:
            self.in_flight = in_flight
        self.max_in_flight = self.in_flight
        self.rejected = 0
        self.dropped = 0  # answered by closing the connection (reboot, down)
        self.reboots = 0
        self.malformed = 0
        self.writes = 0  # state-changing requests that took effect
        self.ws_connections = 0  # telemetry sockets opened
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=REQUEST_LOG_SIZE)

    def begin(self, method: str, target: str, keys: list[str]) -> None:
        self.total += 1
        self.by_method[_bounded(self.by_method, method)] += 1
        for key in keys:
            self.by_request[_bounded(self.by_request, key)] += 1
        self.log.append({"method": method, "target": target[:MAX_LOGGED_TARGET], "time": time.time()})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def end(self) -> None:
        self.in_flight -= 1

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_request": dict(self.by_request),
            "by_method": dict(self.by_method),
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight,
            "reboots": self.reboots,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "malformed": self.malformed,
            "writes": self.writes,
            "ws_clients": self.ws_clients,
            "ws_connections": self.ws_connections,
        }


def _bounded(counter: collections.Counter[str], key: str) -> str:
    key = key[:200]
    if key in counter or len(counter) < MAX_KEYS:
        return key
    return OTHER_KEY
