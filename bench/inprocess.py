"""``python -m bench.inprocess``: what a cache hit costs in Python, without TLS, sockets or wrk.

    .venv/bin/python -m bench.inprocess                      # gateway vs gateway without rate limits
    .venv/bin/python -m bench.inprocess gateway,nolimit,nolog --reps 20

On the wire, runs on this shared host move by ±10%, more than the few
percent issue 7 is about. Here the gateway's own connection protocol (the
class uvicorn would use, on uvloop, with the real parser and hot path) is fed
the same keep-alive request over and over through a transport that only
counts what it is given; each request also gets one pass of the event loop
(its answer is written on the next pass). The figure is the best of
``--reps`` batches of 20,000 requests, in µs per request, with the loop pass
alone reported for reference. Variants differ only in settings:
``gateway`` (as benchmarked), ``nolimit`` (rate limits off), ``nolog``
(access log off). The upstream is the PVS simulator (in ``python -m bench``,
the bench's static upstream); only the first request of each variant
reaches it. Everything here stays in the CPU's caches; on the wire, between
TLS and the kernel, the same code runs cache-cold, so a difference found
here is a lower bound of the one there (see ``bench.limitcost``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import servers
from bench.common import pin_self_to_load_cpus

VARIANTS: dict[str, dict[str, Any]] = {
    "gateway": {},
    "nolimit": {"ratelimit": {"per_caller": "off", "per_ip": "off", "auth_failures": "off"}},
    "nolog": {"server": {"access_log": "off"}},
}
BATCH = 20_000


class CountingTransport(asyncio.Transport):
    """Takes the protocol's writes and keeps the last; a TLS connection from 127.0.0.1 for the protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.last = b""
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        self.last = bytes(data[:64])

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8443), "peername": ("127.0.0.1", 50000), "sslcontext": True}.get(name, default)


async def _connection(work: Path, upstream: str, name: str) -> tuple[Any, CountingTransport, bytes, Any]:
    from uvicorn.server import ServerState

    from gateway.app import create_app
    from gateway.server import _uvicorn_config
    from gateway.settings import load_or_raise

    overrides = servers.merge({"cache": {"ttl": {"DeviceList": 3600}}, "server": {"tls": "off"}}, VARIANTS[name])
    config_path, secret = servers.write_gateway_files(work / name, servers.gateway_config(upstream, overrides))
    settings = load_or_raise(config_path)
    app = create_app(settings, access_stream=open(work / name / "access.log", "w"))  # noqa: SIM115 - lives as long as the run
    config = _uvicorn_config(app, "127.0.0.1", 0, settings)
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())
    transport = CountingTransport()
    protocol.connection_made(transport)
    request = (
        f"GET {servers.DEVICE_LIST} HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nAuthorization: Bearer {secret}\r\n\r\n"
    ).encode()
    protocol.data_received(request)  # the miss, through the app, fills the cache
    deadline = time.monotonic() + 30
    while not transport.writes:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: no answer to the first request")
        await asyncio.sleep(0.01)
    if not transport.last.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"{name}: first answer was {transport.last!r}")
    return protocol, transport, request, app


async def measure(names: list[str], reps: int, upstream: str, work: Path) -> dict[str, float]:
    connections = {name: await _connection(work, upstream, name) for name in names}
    best = dict.fromkeys(names, float("inf"))
    for _ in range(reps):
        for name, (protocol, transport, request, app) in connections.items():
            feed = protocol.data_received
            writes, answered = transport.writes, app.hot.answered
            gc.collect()
            start = time.perf_counter()
            for _ in range(BATCH):
                feed(request)
                await asyncio.sleep(0)  # the pass on which the answer is written
            took = time.perf_counter() - start
            if transport.writes - writes != BATCH or app.hot.answered - answered != BATCH:
                raise SystemExit(f"{name}: not every request was a hot cache hit")
            best[name] = min(best[name], took / BATCH * 1e6)
    start = time.perf_counter()
    for _ in range(BATCH):
        await asyncio.sleep(0)
    best["(loop pass alone)"] = (time.perf_counter() - start) / BATCH * 1e6
    return best


def run(work: Path, upstream: str, *, reps: int, log: Any = print) -> dict[str, Any]:
    """The ``inprocess`` section of ``python -m bench``: the gateway with and without rate limits."""
    import uvloop

    names = ["gateway", "nolimit"]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        best = runner.run(measure(names, reps, upstream, work))
    for name, us in best.items():
        log(f"  {name:20s} {us:7.2f} µs per request")
    return {"us_per_request": best, "reps": reps, "batch": BATCH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="?", default="gateway,nolimit", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    import uvloop

    pin_self_to_load_cpus()
    work = Path(tempfile.mkdtemp(prefix="pvsgw-inprocess-"))
    sim = servers.simulator(work / "sim", "simulator", "--latency-scale", "0", "--seed", "7")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            best = runner.run(measure(names, args.reps, sim.url, work))
    finally:
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = best.get("gateway")
    for name, us in best.items():
        ratio = f"  ({us / base:.3f} × gateway)" if base and name in VARIANTS else ""
        print(f"{name:20s} {us:7.2f} µs per request{ratio}")


if __name__ == "__main__":
    main()
