"""Which device endpoint a request reaches, how long it takes, and how it is counted.

Routing happens when the request arrives (so it is counted even if the
device then drops it); the handler runs only after the request's latency,
so answers reflect the device's state at the time it answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import legacy, localapi
from .httpio import Request, Response, json_response

if TYPE_CHECKING:
    from .device import Device

DL_CGI = "/cgi-bin/dl_cgi"
# dl_cgi paths new firmware still serves without a session.
OPEN_PATHS = frozenset({"supervisor/info", "communication/interfaces"})
VARS_LATENCY = 0.2
VARS_ROOT_LATENCY = 1.0  # match=/ walks every variable


@dataclass(frozen=True)
class Route:
    keys: list[str]  # by_request counters
    latency: float  # base seconds, before latency_scale and jitter
    handler: Callable[[], Response]


def route(device: Device, request: Request) -> Route:
    path = request.path
    localapi_fw = device.options.firmware == "localapi"

    if path in (DL_CGI, DL_CGI + "/"):
        command = legacy.command_of(request)

        def run_command() -> Response:
            if localapi_fw and not localapi.has_session(device, request):
                return _unauthorized_403()
            return legacy.handle_command(device, request, command)

        latency = legacy.LATENCY.get(command or "", legacy.DEFAULT_LATENCY)
        return Route([command if command is not None else "dl_cgi"], latency, run_command)

    if path.startswith(DL_CGI + "/"):
        sub = path[len(DL_CGI) + 1 :]
        key = f"dl_cgi/{sub}"

        def run_path() -> Response:
            is_open = sub in OPEN_PATHS and request.method in ("GET", "HEAD")
            if localapi_fw and not is_open and not localapi.has_session(device, request):
                return _unauthorized_403()
            return legacy.handle_path(device, request, sub)

        return Route([key], legacy.LATENCY.get(key, legacy.DEFAULT_LATENCY), run_path)

    if path == "/vars":
        heavy = any(k == "match" and v in ("", "/") for k, v in request.params())
        latency = VARS_ROOT_LATENCY if heavy else VARS_LATENCY

        def run_vars() -> Response:
            return localapi.handle_vars(device, request) if localapi_fw else _not_found(path)

        return Route(localapi.vars_keys(request), latency, run_vars)

    if path == "/auth":
        keys = [k for k, _ in request.params()]
        key = "auth.login" if "login" in keys else "auth.logout" if "logout" in keys else "auth"

        def run_auth() -> Response:
            return localapi.handle_auth(device, request) if localapi_fw else _not_found(path)

        return Route([key], VARS_LATENCY, run_auth)

    if path == "/":
        return Route([path], 0.0, lambda: json_response(403, {"status": 403, "error": "Forbidden", "path": "/"}))
    return Route([path], 0.0, lambda: _not_found(path))


def _unauthorized_403() -> Response:
    # Byte-for-byte what the PVS sends (spacing included): clients match on it.
    return Response(403, b'{ "status":403, "error" : "Unauthorized", "path":"" }')


def _not_found(path: str) -> Response:
    return json_response(404, {"status": 404, "error": "Not Found", "path": path})
