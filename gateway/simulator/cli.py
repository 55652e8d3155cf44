"""Command-line options of the simulator, shared by ``pvs-gateway simulate`` and ``python -m gateway.simulator``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .options import CLOCK, FIRMWARES, SimOptions

_DEFAULTS = SimOptions()


def _ranged(kind: type[float] | type[int], low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse type that rejects out-of-range values at parse time (exit 2, no traceback)."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < low or (high is not None and value > high):
            limit = f">= {low}" if high is None else f"{low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {limit}, not {text}")
        return value

    return convert


def _clock(text: str) -> str:
    if not CLOCK.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be HH:MM, not {text!r}")
    return text


def _serial(text: str) -> str:
    if len(text) < 5 or not text.isalnum():
        raise argparse.ArgumentTypeError("must be at least 5 letters or digits")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default=_DEFAULTS.host, help="address to listen on (default %(default)s)")
    add(
        "--port",
        type=_ranged(int, 0, 65535),
        default=_DEFAULTS.port,
        help="port; 0 picks a free one (default %(default)s)",
    )
    add("--firmware", choices=FIRMWARES, default=_DEFAULTS.firmware, help="API generation (default %(default)s)")
    add("--tls", action="store_true", help="serve HTTPS (always on for localapi)")
    add(
        "--serial",
        type=_serial,
        default=_DEFAULTS.serial,
        help="PVS serial; its last 5 characters are the LocalAPI password",
    )
    add(
        "--latency-scale",
        type=_ranged(float, 0),
        default=_DEFAULTS.latency_scale,
        help="multiply every latency (DeviceList ~10 s)",
    )
    add("--seed", type=int, default=_DEFAULTS.seed, help="seed of the site model and of random choices")
    add(
        "--clock",
        type=_clock,
        default=None,
        metavar="HH:MM",
        help="simulated local time to start at (default: real time)",
    )
    add("--inverters", type=_ranged(int, 0, 200), default=_DEFAULTS.inverters, help="number of microinverters")
    add("--capacity", type=_ranged(int, 1), default=_DEFAULTS.capacity, help="device requests processed at once")
    add(
        "--session-ttl",
        type=_ranged(float, 0.001),
        default=_DEFAULTS.session_ttl,
        help="LocalAPI session inactivity timeout, s",
    )
    add(
        "--reboot-seconds", type=_ranged(float, 0), default=None, help="reboot duration (default 480 s x latency scale)"
    )
    add("--overload-window", type=_ranged(float, 0.001), default=None, help="window for counting rejections, s")
    add(
        "--overload-limit",
        type=_ranged(int, 1),
        default=_DEFAULTS.overload_limit,
        help="rejections in the window that cause a reboot",
    )
    add(
        "--data-interval",
        type=_ranged(float, 0.001),
        default=_DEFAULTS.data_interval,
        help="seconds each measurement stays constant",
    )
    add(
        "--ws-port",
        type=_ranged(int, 0, 65535),
        default=9002,
        help="LocalAPI telemetry WebSocket port; 0 = none (default %(default)s)",
    )
    add("--cert-dir", default=None, help="keep the TLS certificate and key here (else a new one each start)")


def options_from_args(ns: argparse.Namespace) -> SimOptions:
    """Options from parsed arguments; values were range-checked by ``add_arguments``' types."""
    return SimOptions(
        host=ns.host,
        port=ns.port,
        firmware=ns.firmware,
        tls=ns.tls,
        serial=ns.serial,
        latency_scale=ns.latency_scale,
        seed=ns.seed,
        clock=ns.clock,
        inverters=ns.inverters,
        capacity=ns.capacity,
        session_ttl=ns.session_ttl,
        reboot_seconds=ns.reboot_seconds,
        overload_window=getattr(ns, "overload_window", None),
        overload_limit=getattr(ns, "overload_limit", _DEFAULTS.overload_limit),
        data_interval=getattr(ns, "data_interval", _DEFAULTS.data_interval),
        cert_dir=ns.cert_dir,
        ws_port=getattr(ns, "ws_port", 0),
    )
