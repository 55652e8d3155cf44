"""Memory retained by TLS connections that the client closes before reading the answer.

A client (no API key needed) connects, sends one request and closes at once,
as a killed app, a timed-out poller, wrk at the end of a run, or an attacker
would. With the standard library's asyncio TLS transport (Python 3.11) each
such connection leaves memory behind that is never given back; a Pi Zero W
has 512 MB. This measures the RSS growth per 1000 such connections for each
server. Clients that read their whole answer before closing leave nothing.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from bench.common import Proc, rss_mb

_CTX = ssl.create_default_context()
_CTX.check_hostname = False
_CTX.verify_mode = ssl.CERT_NONE
REQUEST = b"GET /cgi-bin/dl_cgi?Command=DeviceList HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def abort_connections(url: str, count: int) -> int:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    done = 0
    for _ in range(count):
        try:
            with socket.create_connection((host, int(port)), timeout=5) as raw, _CTX.wrap_socket(raw, server_hostname=host) as s:
                s.sendall(REQUEST)
            done += 1
        except OSError:
            pass
    return done


def run(targets: dict[str, Proc], count: int, log: Any = print) -> dict[str, Any]:
    out: dict[str, Any] = {"connections": count, "request": "anonymous GET DeviceList, closed without reading the answer"}
    for name, p in targets.items():
        before = rss_mb(p.pid)
        done = abort_connections(p.url, count)
        time.sleep(1.0)
        after = rss_mb(p.pid)
        per_1000 = (after - before) / done * 1000 if done else float("nan")
        out[name] = {"rss_before_mb": before, "rss_after_mb": after, "completed": done, "mb_per_1000": per_1000}
        log(f"  {name:14} {done} aborted TLS connections: RSS {before:6.1f} -> {after:6.1f} MB ({per_1000:+.0f} MB per 1000)")
    return out
