"""Private ``/__sim/*`` endpoints: counters, truth and fault injection.

They answer even while the device is down or rebooting and are never
counted as device requests. A gateway must never forward them.

GET  /__sim/stats     counters (see Stats.as_json), firmware, rebooting
GET  /__sim/requests  the last 1000 device requests: method, raw target, time
GET  /__sim/fault     the current fault; POST sets one (see faults.py)
POST /__sim/reset     zero the counters and the request log
GET  /__sim/site      the site model's current values (the truth)
GET  /__sim/vars      ?name=<var>: a variable's current value, session-free
GET  /__sim/state     device state changed by writes (config session, DHCP...)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import faults
from .httpio import Request, Response, json_response

if TYPE_CHECKING:
    from .server import Simulator


class Control:
    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    def handle(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        endpoints: dict[str, dict[str, Callable[[Request], Response]]] = {
            "/__sim/stats": {"GET": self._stats},
            "/__sim/requests": {"GET": self._requests},
            "/__sim/fault": {"GET": self._fault, "POST": self._set_fault},
            "/__sim/reset": {"POST": self._reset},
            "/__sim/site": {"GET": self._site},
            "/__sim/vars": {"GET": self._vars},
            "/__sim/state": {"GET": self._state},
        }
        methods = endpoints.get(request.path.rstrip("/"))
        if methods is None:
            return _error(404, f"no such endpoint {request.path}")
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(methods)
            return json_response(405, {"error": f"use {allow}"}, [("Allow", allow)])
        return handler(request)

    def _stats(self, _: Request) -> Response:
        sim = self._sim
        body: dict[str, Any] = sim.stats.as_json()
        body.update({"firmware": sim.options.firmware, "rebooting": sim.fragility.rebooting})
        return json_response(200, body)

    def _requests(self, _: Request) -> Response:
        return json_response(200, list(self._sim.stats.log))

    def _fault(self, _: Request) -> Response:
        sim = self._sim
        body = sim.faults.as_json()
        body.update({"rebooting": sim.fragility.rebooting, "reboot_remaining": sim.fragility.remaining()})
        return json_response(200, body)

    def _set_fault(self, request: Request) -> Response:
        sim = self._sim
        try:
            wanted = faults.parse(request.body)
        except faults.FaultError as exc:
            return _error(400, str(exc))
        if wanted.mode == "reboot":
            sim.fragility.reboot(wanted.seconds if wanted.seconds is not None else wanted.duration)
        elif wanted.mode == "expire-sessions":
            sim.device.sessions.clear()
        elif wanted.mode == "rotate-cert":
            if sim.cert is None:
                return _error(400, "rotate-cert needs TLS (--tls or --firmware localapi)")
            sim.cert.rotate()
        else:
            sim.faults.set_lasting(wanted)
            if wanted.mode == "ok":  # normal service now, even in the middle of a reboot
                sim.fragility.boot_now()
        return self._fault(request)

    def _reset(self, _: Request) -> Response:
        sim = self._sim
        sim.stats.reset()
        sim.fragility.reset_window()
        return json_response(200, sim.stats.as_json())

    def _site(self, _: Request) -> Response:
        sim = self._sim
        body = sim.device.model.site_json()
        body["uptime"] = round(sim.device.uptime(), 2)
        return json_response(200, body)

    def _vars(self, request: Request) -> Response:
        device = self._sim.device
        name = dict(request.params()).get("name")
        if not name:
            return _error(400, "give ?name=<variable>")
        tree = device.vars.tree(device.model.snapshot(), device.uptime())
        if name not in tree:
            return _error(404, f"no variable {name}")
        return json_response(200, {"name": name, "value": tree[name]})

    def _state(self, _: Request) -> Response:
        sim = self._sim
        body = sim.device.state_json()
        body.update({"rebooting": sim.fragility.rebooting, "fault": sim.faults.as_json()})
        return json_response(200, body)


def _error(status: int, message: str) -> Response:
    return json_response(status, {"status": status, "error": message})
