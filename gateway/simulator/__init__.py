"""A simulated SunPower PVS5/PVS6: the gateway's upstream in the demo, tests and benchmarks.

A real HTTP(S) server on asyncio streams that answers like the device (legacy
``dl_cgi`` or LocalAPI firmware), with data from a time-of-day site model and
the device's fragility: few concurrent requests, slow DeviceList, reboots
under overload, plus injectable faults and private ``/__sim/*`` endpoints.

It imports nothing from the rest of ``gateway``.

    running = await start(SimOptions(port=0, latency_scale=0.01))
    ... running.url ...
    await running.stop()
"""

from __future__ import annotations

from .options import SimOptions
from .runner import RunningSimulator, run, start

__all__ = ["RunningSimulator", "SimOptions", "run", "start"]
