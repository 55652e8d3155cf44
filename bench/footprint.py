"""Footprint: start to ready, RSS idle, RSS with many open connections.

**Start to ready**: time from spawning ``python -m gateway serve`` to the first 200 on
``/healthz`` over HTTPS (polled every 5 ms with a new connection), on the
server's core. The first start in a fresh folder also makes the household CA
and the leaf; the later ones find them (a normal restart). Also: the
interpreter alone, and the import of the gateway's modules, to show where a
start goes; ``python -X importtime`` lists the heaviest imports.

**Memory**: RSS of the gateway idle (started, one request answered so the
cache is warm, 1 s settled), then with ``OPEN`` TLS connections held open at
once, each having sent one request with the API key and read its answer
(keep-alive, as a dashboard or poller holds its connection). All come from
127.0.0.1, so this gateway has ``server.max_connections_per_ip`` raised (as
every bench gateway, bench/servers.py) and ``server.keepalive_timeout`` at
60 s so that none is closed as idle while the others are opened. A second
request on every connection afterwards checks that they were all still
open when RSS was read. The bare reference app gets the same, for scale,
and once more with asyncio's per-connection TLS read buffer at 16 KiB
instead of 256 KiB (``bare-16k``, bench/bare_app.py ``--tls-read-buffer``): a
diagnostic of where the memory per connection goes, not a configuration.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import servers
from bench.common import SUT_CPUS, Proc, Sampler, free_port, get, median, python, rss_mb, spawn, taskset

OPEN = 500


def _time_to_ready(work: Path, config_path: Path, port: int, timeout: float = 30.0) -> float:
    url = f"https://127.0.0.1:{port}/healthz"
    t0 = time.perf_counter()
    p = spawn("start", [python(), "-m", "gateway", "serve", "--config", str(config_path)], work, cpus=SUT_CPUS)
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed > timeout or not p.alive():
                raise RuntimeError(f"gateway not ready after {elapsed:.1f} s:\n{p.log()[-2000:]}")
            try:
                status, _, _ = get(url, timeout=1)
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.005)
    finally:
        p.stop()


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def import_times(top: int = 12) -> dict[str, Any]:
    """Where the import of the gateway goes: self time summed per top-level package (from -X importtime)."""
    out = subprocess.run(
        [python(), "-X", "importtime", "-c", "import gateway.server, gateway.app, gateway.cli"],
        capture_output=True, text=True, check=True,
    )
    per_package: dict[str, float] = {}
    total = 0.0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, _cum_us, raw_name = line[len("import time:"):].split("|")
        root = raw_name.strip().split(".")[0]
        per_package[root] = per_package.get(root, 0.0) + int(self_us) / 1000
        total += int(self_us) / 1000
    ranked = sorted(per_package.items(), key=lambda kv: -kv[1])[:top]
    return {"total_ms": total, "top": [{"package": k, "self_ms": v} for k, v in ranked]}


_CTX = ssl.create_default_context()
_CTX.check_hostname = False
_CTX.verify_mode = ssl.CERT_NONE


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One request on an open connection; the status, after the whole answer is read."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _hold(url: str, headers: dict[str, str], count: int, on_open: Any) -> dict[str, Any]:
    """Open ``count`` TLS connections (50 handshakes at a time), one answered request each; call
    ``on_open()`` while all are open; then a second request on each to show they still were."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    request = ("GET /cgi-bin/dl_cgi?Command=DeviceList HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    gate = asyncio.Semaphore(50)
    failures: dict[str, int] = {}

    async def one() -> None:
        async with gate:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port), ssl=_CTX), 20)
                status = await asyncio.wait_for(_exchange(r, w, request), 20)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                return
            if status == 200:
                conns.append((r, w))
            else:
                failures[f"status {status}"] = failures.get(f"status {status}", 0) + 1
                w.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    opened_s = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    measured = on_open()

    async def again(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        try:
            return await asyncio.wait_for(_exchange(r, w, request), 20) == 200
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            return False

    still = sum(await asyncio.gather(*(again(r, w) for r, w in conns)))
    for _, w in conns:
        w.close()
    return {"opened": len(conns), "failures": failures, "open_s": opened_s, "still_open_after": still, **measured}


def hold_connections(p: Proc, headers: dict[str, str], count: int) -> dict[str, Any]:
    get(p.url + "/cgi-bin/dl_cgi?Command=DeviceList", headers)  # the cache warm, one connection's worth of buffers made
    time.sleep(1.0)
    idle = rss_mb(p.pid)
    with Sampler(p.pid) as s:
        out = asyncio.run(_hold(p.url, headers, count, lambda: {"rss_open_mb": rss_mb(p.pid)}))
    out.update(idle_rss_mb=idle, peak_rss_mb=s.max_rss_mb)
    time.sleep(1.0)
    out["rss_after_close_mb"] = rss_mb(p.pid)
    return out


def memory(work: Path, upstream: Proc, body_file: Path, *, count: int = OPEN, log: Any = print) -> dict[str, Any]:
    result: dict[str, Any] = {"connections": count}
    gw = servers.gateway(work / "mem-gateway", upstream.url,
                         {"cache": {"ttl": {"DeviceList": 3600}}, "server": {"keepalive_timeout": 60}}, name="mem-gateway")
    try:
        time.sleep(1.0)
        result["started_rss_mb"] = rss_mb(gw.pid)
        result["gateway"] = hold_connections(gw, servers.auth_headers(gw), count)
        for name, buffer in (("bare", 0), ("bare-16k", 16 * 1024)):
            bare = servers.bare(work / f"mem-{name}", body_file, gw.extra["cert"], gw.extra["keyfile"], keepalive=60, tls_read_buffer=buffer)
            try:
                result[name] = hold_connections(bare, {}, count)
            finally:
                bare.stop()
    finally:
        gw.stop()
    for name in ("gateway", "bare", "bare-16k"):
        x = result[name]
        log(f"  {name:8} RSS idle {x['idle_rss_mb']:.1f} MB, with {x['opened']}/{count} connections open {x['rss_open_mb']:.1f} MB "
            f"(peak {x['peak_rss_mb']:.1f}, {x['still_open_after']} still open after; failures {x['failures'] or 'none'}; "
            f"opened in {x['open_s']:.1f} s), after closing {x['rss_after_close_mb']:.1f} MB")
    return result


def run(work: Path, upstream: Proc, body_file: Path, *, starts: int, log: Any = print) -> dict[str, Any]:
    port = free_port()
    cfg = servers.gateway_config(upstream.url, {"cache": {"ttl": {"DeviceList": 3600}}}, port=port)
    config_path, _ = servers.write_gateway_files(work, cfg)
    first = _time_to_ready(work, config_path, port)
    times = [_time_to_ready(work, config_path, port) for _ in range(starts)]
    pin = taskset(SUT_CPUS)
    interp = median([_wall(pin + [python(), "-c", "pass"]) for _ in range(3)])
    imports = median([_wall(pin + [python(), "-c", "import gateway.server, gateway.app, gateway.cli"]) for _ in range(3)])
    result = {
        "first_start_s": first,
        "starts_s": times,
        "median_s": median(times),
        "interpreter_s": interp,
        "interpreter_and_imports_s": imports,
        "top_imports": import_times(),
    }
    log(f"  start to ready: first {first:.3f} s (makes CA + leaf), then median {result['median_s']:.3f} s of {times and len(times)} "
        f"(interpreter {interp:.3f} s, + imports {imports:.3f} s)")
    result["memory"] = memory(work, upstream, body_file, log=log)
    return result
