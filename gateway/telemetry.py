"""The one upstream subscription to the PVS's telemetry WebSocket (LocalAPI firmware).

``ws://<host of upstream.url>:<upstream.ws_port>``: plain, unauthenticated,
as the PVS serves it. The gateway holds at most one such socket, whatever
the number of listeners (``TelemetrySocket.run`` is started once), and hands
each frame to ``on_frame``. Reconnects:

- the device closes every socket after 10 minutes: after a socket that
  delivered frames, the next connect follows at once (``RECONNECT``);
- refused, timed out, reset, or dropped by a reboot: back-off from
  ``backoff_initial`` doubling to ``backoff_max``, reset by a frame;
- no frame for ``IDLE_TIMEOUT`` (the device sends at least once a minute
  while telemetry is on; a dead network shows nothing): closed and reopened.

Frames are parsed defensively: anything that is not a JSON object with
``"notification": "power"`` and a ``params`` object is counted and dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

log = logging.getLogger("gateway.telemetry")

RECONNECT = 1.0  # seconds before reopening a socket the device closed after streaming
IDLE_TIMEOUT = 180.0  # the device is quiet for up to ~70 s; three times that is a dead socket
OPEN_TIMEOUT = 10.0
MAX_FRAME = 64 * 1024  # real frames are ~300 bytes


def socket_url(upstream_url: str, port: int) -> str:
    host = urllib.parse.urlsplit(upstream_url).hostname or ""
    shown = f"[{host}]" if ":" in host else host
    return f"ws://{shown}:{port}/"


def power_params(message: str | bytes) -> dict[str, Any] | None:
    """A frame's ``params`` if it is a power notification, else None."""
    try:
        frame = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(frame, dict) or frame.get("notification") != "power":
        return None
    params = frame.get("params")
    return params if isinstance(params, dict) else None


class TelemetrySocket:
    def __init__(
        self,
        url: str,
        *,
        on_frame: Callable[[dict[str, Any]], None],
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.url = url
        self._on_frame = on_frame
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._idle_timeout = idle_timeout
        self.state = "idle"  # idle | connecting | open | waiting
        self.connects = 0  # sockets opened
        self.reconnects = 0  # connects after the first
        self.frames = 0
        self.rejected_frames = 0
        self.last_frame_at: float | None = None  # monotonic

    @property
    def open(self) -> bool:
        return self.state == "open"

    async def run(self) -> None:
        delay = self._backoff_initial
        problem = ""  # logged once per kind of failure, not at every retry
        while True:
            self.state = "connecting"
            streamed = False
            try:
                async with connect(
                    self.url,
                    open_timeout=OPEN_TIMEOUT,
                    close_timeout=2,
                    max_size=MAX_FRAME,
                    compression=None,
                    ping_interval=None,  # not known to be answered by the PVS; IDLE_TIMEOUT covers dead sockets
                    user_agent_header=None,
                ) as ws:
                    self.state = "open"
                    if self.connects:
                        self.reconnects += 1
                    self.connects += 1
                    if problem:
                        log.info("telemetry: connected to %s again", self.url)
                        problem = ""
                    else:
                        log.info("telemetry: connected to %s", self.url)
                    while True:
                        async with asyncio.timeout(self._idle_timeout):
                            message = await ws.recv()
                        self._frame(message)
                        streamed = True
                        delay = self._backoff_initial
            except ConnectionClosed as exc:
                why = f"closed by the PVS ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
            except TimeoutError:
                why = "no frame or no answer in time"
            except (OSError, InvalidHandshake, InvalidURI) as exc:
                why = str(exc) or type(exc).__name__
            self.state = "waiting"
            if streamed and why.startswith("closed"):
                wait = RECONNECT  # the device's 10-minute rotation: resubscribe now
                log.debug("telemetry: %s; reconnecting", why)
            else:
                wait = delay
                delay = min(delay * 2, self._backoff_max)
                kind = why.split(" (")[0]
                if kind != problem:
                    log.warning("telemetry: %s: %s; retrying with back-off", self.url, why)
                    problem = kind
            await asyncio.sleep(wait)

    def _frame(self, message: str | bytes) -> None:
        params = power_params(message)
        if params is None:
            self.rejected_frames += 1
            return
        self.frames += 1
        self.last_frame_at = time.monotonic()
        try:
            self._on_frame(params)
        except Exception:  # a bug in a consumer must not end the subscription
            log.exception("telemetry: a frame could not be handled")
