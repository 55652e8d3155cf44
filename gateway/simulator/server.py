"""The listener: connections, keep-alive, and what reaches the wire.

Every device request goes through one pipeline: counted, then dropped
(rebooting, ``down``), held (``hang``), rejected (no free slot: 503 or a
hang), or processed for its latency while holding a slot and answered,
possibly mangled by the current fault. ``/__sim/*`` bypasses all of it.
Each connection is its own task and every failure stays inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

from . import faults, routes
from .control import Control
from .device import Device
from .fragility import Fragility
from .httpio import MAX_HEAD, BadRequest, Request, Response, encode_head, json_response, read_request
from .options import SimOptions
from .stats import Stats
from .telemetry import ENABLE_VAR, Telemetry
from .tlscert import DeviceCert

log = logging.getLogger("gateway.simulator")

IDLE_TIMEOUT = 75.0  # keep-alive connections idle longer than this are closed
READ_TIMEOUT = 30.0  # a started request must be complete within this
HANG_CAP = 60.0  # a hung request is released (connection closed) after this
JITTER = 0.10  # +-10% on every latency


class Simulator:
    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.stats = Stats()
        self.device = Device(options, self.stats)
        self.faults = faults.Faults()
        self.fragility = Fragility(
            capacity=options.capacity,
            overload_limit=options.overload_limit,
            overload_window=options.effective_overload_window,
            reboot_seconds=options.effective_reboot_seconds,
            on_power_lost=self._power_lost,
            on_booted=self._booted,
        )
        self.cert: DeviceCert | None = None
        if options.uses_tls:
            self.cert = DeviceCert(
                common_name=f"pvs6-{options.serial.lower()}", hosts=[options.host], cert_dir=options.cert_dir
            )
        self.control = Control(self)
        self.telemetry: Telemetry | None = None
        if options.firmware == "localapi" and options.ws_port:
            self.telemetry = Telemetry(
                model=self.device.model,
                stats=self.stats,
                enabled=lambda: self.device.vars.get(ENABLE_VAR) == "1",
                unreachable=lambda: self.fragility.rebooting or self.faults.current().mode == "down",
                latency_scale=options.latency_scale,
                seed=options.seed,
            )
        self.ws_port: int | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._busy: set[asyncio.StreamWriter] = set()  # connections with a device request open

    @property
    def scheme(self) -> str:
        return "https" if self.cert else "http"

    async def listen(self) -> int:
        self._server = await asyncio.start_server(
            self._on_connection,
            self.options.host,
            self.options.port,
            ssl=self.cert.context if self.cert else None,
            limit=MAX_HEAD,
        )
        port = int(self._server.sockets[0].getsockname()[1])
        if self.telemetry is not None:
            try:
                self.ws_port = await self.telemetry.listen(self.options.host, self.options.ws_port)
            except OSError:
                self._server.close()
                raise
        return port

    async def close(self) -> None:
        self._closing = True
        if self.telemetry is not None:
            await self.telemetry.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.fragility.close()
        if self._server is not None:
            await self._server.wait_closed()

    # -- reboot hooks -------------------------------------------------------

    def _power_lost(self) -> None:
        self.device.power_lost()
        if self.telemetry is not None:
            self.telemetry.drop_all()
        for writer in list(self._busy):  # open requests die with the device
            writer.transport.abort()

    def _booted(self) -> None:
        self.device.booted()
        self.stats.reboots += 1

    # -- connections --------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # close() ends the connections still open: a normal end. (Left cancelled, the task
            # makes asyncio's start_server callback log a traceback on Python 3.11.)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or misbehaved: only this connection is affected
        except Exception:  # a bug must cost one connection, never the server
            log.exception("simulator: unexpected error on a connection")
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader, idle_timeout=IDLE_TIMEOUT, read_timeout=READ_TIMEOUT)
            except BadRequest as exc:
                self.stats.malformed += 1
                bad = json_response(400, {"status": 400, "error": "Bad Request", "description": str(exc)})
                await self._write(writer, bad, keep_alive=False, head_only=False)
                return
            if request is None:
                return
            if request.path.startswith("/__sim/"):
                keep = request.keep_alive
                await self._write(
                    writer, self.control.handle(request), keep_alive=keep, head_only=request.method == "HEAD"
                )
            else:
                keep = await self._device_request(request, reader, writer)
            if not keep:
                return

    async def _write(
        self, writer: asyncio.StreamWriter, response: Response, *, keep_alive: bool, head_only: bool
    ) -> None:
        head = encode_head(response, keep_alive=keep_alive)
        writer.write(head if head_only else head + response.body)
        await writer.drain()

    # -- the device pipeline ------------------------------------------------

    async def _device_request(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one device request; False when the connection must be closed."""
        route = routes.route(self.device, request)
        self.stats.begin(request.method, request.target, route.keys)
        self._busy.add(writer)
        try:
            return await self._pipeline(request, route, reader, writer)
        finally:
            self._busy.discard(writer)
            self.stats.end()

    async def _pipeline(
        self, request: Request, route: routes.Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        fault = self.faults.current()
        if self.fragility.rebooting or fault.mode == "down":
            self.stats.dropped += 1
            return False
        if fault.mode == "hang":
            await self._hang(reader)
            return False
        if not self.fragility.try_acquire():
            return await self._reject(request, reader, writer)
        epoch = self.fragility.epoch
        try:
            jitter = 1.0 + JITTER * (2 * self.device.rng.random() - 1)
            await asyncio.sleep(route.latency * self.options.latency_scale * jitter + fault.delay)
            if self.fragility.epoch != epoch:  # rebooted while working: nothing is sent
                return False
            response = route.handler()
        finally:
            self.fragility.release()
        return await self._answer(writer, request, response)

    async def _reject(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        self.stats.rejected += 1
        self.fragility.rejected()  # may start a reboot, which drops this connection too
        if self.fragility.rebooting:
            return False
        if self.device.rng.random() < 0.5:
            busy = json_response(503, {"status": 503, "error": "Service Unavailable"})
            await self._write(writer, busy, keep_alive=request.keep_alive, head_only=request.method == "HEAD")
            return request.keep_alive
        await self._hang(reader)
        return False

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        """Answer nothing until the client gives up (or HANG_CAP passes)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HANG_CAP):
                while await reader.read(65536):
                    pass

    async def _answer(self, writer: asyncio.StreamWriter, request: Request, response: Response) -> bool:
        mode = self.faults.current().mode
        keep = request.keep_alive
        head_only = request.method == "HEAD"
        if mode == "error":
            response = json_response(500, {"status": 500, "error": "Internal Server Error"})
        elif mode == "garbage":
            response = Response(200, faults.GARBAGE)
        elif mode == "headers-in-body":
            inner = encode_head(response, keep_alive=keep)
            response = Response(response.status, inner + response.body, response.headers)
        elif mode == "truncated":
            body = response.body
            head = encode_head(Response(200, body, response.headers), keep_alive=False, content_length=len(body) + 64)
            writer.write(head if head_only else head + body[: len(body) // 2])
            await writer.drain()
            return False
        await self._write(writer, response, keep_alive=keep, head_only=head_only)
        return keep


def announce(url: str, options: SimOptions, ws_url: str | None = None) -> None:
    """The one line tests and the demo wait for (``ws=`` only when the telemetry socket is served)."""
    ws = f" ws={ws_url}" if ws_url else ""
    sys.stdout.write(f"pvs-simulator ready url={url} firmware={options.firmware} serial={options.serial}{ws}\n")
    sys.stdout.flush()
