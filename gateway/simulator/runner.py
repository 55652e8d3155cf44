"""Starting and stopping a simulator: in this event loop, or as the whole process."""

from __future__ import annotations

import asyncio
import signal

from .options import SimOptions
from .server import Simulator, announce


class RunningSimulator:
    """A listening simulator; ``stop()`` closes it and every connection."""

    def __init__(self, sim: Simulator, port: int) -> None:
        self._sim = sim
        self.port = port
        self.options = sim.options
        host = sim.options.host
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{sim.scheme}://{shown}:{port}"
        self.ws_port = sim.ws_port  # None without the telemetry socket
        self.ws_url = f"ws://{shown}:{sim.ws_port}" if sim.ws_port else None

    @property
    def cert_pem(self) -> bytes | None:
        """The certificate served to new TLS connections (None without TLS)."""
        return self._sim.cert.cert_pem if self._sim.cert else None

    async def stop(self) -> None:
        await self._sim.close()


async def start(options: SimOptions) -> RunningSimulator:
    """Listen in the running event loop; returns once connections are accepted."""
    sim = Simulator(options)
    port = await sim.listen()
    running = RunningSimulator(sim, port)
    announce(running.url, options, running.ws_url)
    return running


def run(options: SimOptions) -> None:
    """Serve until SIGINT or SIGTERM, then close cleanly."""
    asyncio.run(_run(options))


async def _run(options: SimOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = await start(options)
    try:
        await stop.wait()
    finally:
        await running.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
