"""The telemetry WebSocket of LocalAPI firmware (``ws://<pvs>:9002``), as the public facts describe it.

- Plain ``ws://``, no authentication, any path.
- Silent while ``/sys/telemetryws/enable`` is not ``1``; pypvs writes it before
  every connect (PVS-API.md section 4).
- A frame ``{"notification": "power", "params": {...}}`` when a client
  connects (if enabled), then only when the values change. The live values
  change at irregular moments, 2 to 60 s apart (x ``latency_scale``), so a
  client sees quiet gaps of up to about a minute.
- The device closes every connection 10 minutes (x ``latency_scale``) after
  it was opened; clients reconnect.
- Power loss (a reboot) drops every connection; while rebooting, or while the
  ``down`` fault is on, a new connection is dropped at once.

Live powers are the site model's current values with a small ripple per
change, so consecutive frames differ as the real ones do; energies are the
model's lifetime counters. No battery is simulated: ``ess_p``, ``ess_en`` and
``soc`` are ``"nan"``, as ``/sys/livedata`` reports them without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import data
from .model import SiteModel, r4
from .stats import Stats

log = logging.getLogger("gateway.simulator")

ENABLE_VAR = "/sys/telemetryws/enable"
QUIET_MIN = 2.0  # seconds between value changes, before latency_scale
QUIET_MAX = 60.0
SESSION_SECONDS = 600.0  # the device closes each socket this long after it opened
FLOOR = 0.02  # scaled delays never go below this (a zero scale would spin)
SESSION_FLOOR = 0.5


class Telemetry:
    """The stream's current values and the open sockets."""

    def __init__(
        self,
        *,
        model: SiteModel,
        stats: Stats,
        enabled: Callable[[], bool],
        unreachable: Callable[[], bool],
        latency_scale: float,
        seed: int,
    ) -> None:
        self._model = model
        self._stats = stats
        self._enabled = enabled
        self._unreachable = unreachable
        self._scale = latency_scale
        self._rng = random.Random(f"{seed}-telemetry")
        self._changed = asyncio.Event()
        self._tick = 0
        self.frame: dict[str, Any] = self._build()
        self._server: Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._connections: set[ServerConnection] = set()

    # -- values ---------------------------------------------------------------

    def _build(self) -> dict[str, Any]:
        s = self._model.snapshot()
        ripple = self._rng.random() - 0.5
        pv = r4(s.production_kw * (1.0 + 0.04 * ripple)) if s.production_kw > 0 else 0.0
        load = r4(max(0.05, s.consumption_kw + 0.08 * (self._rng.random() - 0.5)))
        frame = data.sample(data.WS_POWER)  # the device's field order
        frame["params"].update(
            {
                "time": int(self._model.clock.now()),
                "site_load_p": load,
                "net_p": r4(load - pv),
                "pv_p": pv,
                "site_load_en": s.consumption_kwh,
                "net_en": s.net_kwh,
                "pv_en": s.production_kwh,
                "ess_p": "nan",
                "ess_en": "nan",
                "soc": "nan",
            }
        )
        return frame

    def _delay(self, low: float, high: float) -> float:
        return max(FLOOR, self._rng.uniform(low, high) * self._scale)

    async def _run_ticker(self) -> None:
        while True:
            await asyncio.sleep(self._delay(QUIET_MIN, QUIET_MAX))
            self._tick += 1
            self.frame = self._build()
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    # -- sockets --------------------------------------------------------------

    async def listen(self, host: str, port: int) -> int:
        self._server = await serve(self._handle, host, port, max_size=4096, compression=None)
        self._ticker = asyncio.get_running_loop().create_task(self._run_ticker(), name="sim-telemetry")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    def drop_all(self) -> None:
        """Power lost: every socket dies without a closing handshake."""
        for conn in list(self._connections):
            conn.transport.abort()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, conn: ServerConnection) -> None:
        if self._unreachable():
            conn.transport.abort()
            return
        self._stats.ws_connections += 1
        self._stats.ws_clients += 1
        self._connections.add(conn)
        try:
            await self._stream(conn)
        except ConnectionClosed:
            pass  # the client left, or its socket died
        finally:
            self._connections.discard(conn)
            self._stats.ws_clients -= 1

    async def _stream(self, conn: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        close_at = loop.time() + max(SESSION_FLOOR, SESSION_SECONDS * self._scale)
        closed = loop.create_task(conn.wait_closed())
        sent: int | None = None  # the tick last sent on this socket
        try:
            while True:
                changed = self._changed  # taken before the check, so no change is missed
                if self._enabled() and sent != self._tick:
                    sent = self._tick
                    await conn.send(json.dumps(self.frame))
                left = close_at - loop.time()
                if left <= 0:
                    await conn.close(1000, "session time")
                    return
                waiter = loop.create_task(changed.wait())
                try:
                    await asyncio.wait({waiter, closed}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if closed.done():
                    return
        finally:
            closed.cancel()
