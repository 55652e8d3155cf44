"""Injected faults (``POST /__sim/fault``), on top of the device's own fragility.

Body: ``{"mode": M, "seconds": S, "duration": D}``. Lasting modes apply to
every device request (never to /__sim/*) until changed; they revert to
``ok`` after ``seconds`` (or ``duration``), or last until changed when
neither is given.

=================  ==========================================================
ok                 normal service; also ends a reboot in progress at once
down               every request is read, then the connection is closed with
                   no answer (the PVS's web server is gone)
slow               every answer is delayed by ``seconds`` (default 5) on top
                   of its normal latency, while holding a capacity slot; this
                   is the one mode where ``seconds`` is the delay, so give
                   ``duration`` to make it revert
error              the request is processed, then answered 500 with a JSON
                   error (dl_cgi crashing)
garbage            200 with a body that is not JSON
hang               the request is read and never answered; the connection is
                   held until the client gives up (at most 60 s), then closed
truncated          200 with a Content-Length larger than what is sent, then
                   the connection is closed
headers-in-body    the body starts with an HTTP status line and headers,
                   then the real JSON (a quirk seen on real devices); the
                   Content-Length covers all of it
=================  ==========================================================

One-shot modes act at once and leave the lasting mode unchanged:
``reboot`` (unreachable for ``seconds``, default the configured reboot time;
then uptime restarts and sessions are gone), ``expire-sessions`` (every
LocalAPI session becomes invalid), ``rotate-cert`` (a new self-signed
certificate for TLS handshakes from now on; 400 without TLS).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

LASTING = ("ok", "down", "slow", "error", "garbage", "hang", "truncated", "headers-in-body")
ONE_SHOT = ("reboot", "expire-sessions", "rotate-cert")
DEFAULT_SLOW_SECONDS = 5.0
GARBAGE = b'\x1f\x8b<html><body>dl_cgi: Segmentation fault\x00\xff\xfe{"devices":[{"SERI'


class FaultError(ValueError):
    """The fault request is not understood (answered 400)."""


@dataclass(frozen=True)
class FaultRequest:
    mode: str
    seconds: float | None
    duration: float | None


@dataclass(frozen=True)
class Fault:
    mode: str = "ok"
    delay: float = 0.0  # slow: seconds added to every answer
    until: float | None = None  # monotonic time it reverts to ok


def parse(body: bytes) -> FaultRequest:
    try:
        value = json.loads(body or b"null")
    except ValueError:
        raise FaultError("body must be JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get("mode"), str):
        raise FaultError('body must be a JSON object with a "mode"')
    mode = value["mode"]
    if mode not in LASTING + ONE_SHOT:
        raise FaultError(f"unknown mode {mode!r}; one of {', '.join(LASTING + ONE_SHOT)}")
    return FaultRequest(mode, _seconds(value, "seconds"), _seconds(value, "duration"))


def _seconds(value: dict[str, Any], key: str) -> float | None:
    raw = value.get(key)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
        raise FaultError(f'"{key}" must be a number of seconds >= 0')
    return float(raw)


class Faults:
    def __init__(self) -> None:
        self._fault = Fault()

    def current(self) -> Fault:
        until = self._fault.until
        if until is not None and time.monotonic() >= until:
            self._fault = Fault()
        return self._fault

    def set_lasting(self, request: FaultRequest) -> None:
        if request.mode == "slow":
            delay = DEFAULT_SLOW_SECONDS if request.seconds is None else request.seconds
            lasting = request.duration
        else:
            delay = 0.0
            lasting = request.duration if request.duration is not None else request.seconds
        until = None if lasting is None else time.monotonic() + lasting
        self._fault = Fault(request.mode, delay, until)

    def as_json(self) -> dict[str, Any]:
        fault = self.current()
        remaining = None if fault.until is None else max(0.0, round(fault.until - time.monotonic(), 3))
        out: dict[str, Any] = {"mode": fault.mode, "remaining": remaining}
        if fault.mode == "slow":
            out["delay"] = fault.delay
        return out
