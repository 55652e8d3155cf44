"""Running wrk (Debian's package) and reading its results as JSON.

A generated Lua script sets the headers (the API key), optionally paces each
connection (``delay``), and prints one JSON line from ``done()`` with the
request count, errors and latency percentiles (microseconds).
"""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path
from typing import Any

from bench.common import LOAD_CPUS, taskset

_LUA = """
wrk.method = "GET"
{headers}
{delay}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


def script(path: Path, headers: dict[str, str], delay_ms: int = 0) -> Path:
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    delay = f"function delay() return {int(delay_ms)} end" if delay_ms else ""
    path.write_text(_LUA.format(headers=lines, delay=delay))
    return path


def run(url: str, lua: Path, *, connections: int, duration: float, threads: int = 1, timeout_s: int = 10) -> dict[str, Any]:
    """One wrk run; returns its numbers plus requests per second."""
    argv = taskset(LOAD_CPUS) + [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s}s",
        "--latency",
        "-s",
        str(lua),
        url,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data: dict[str, Any] = json.loads(line[len("BENCHJSON ") :])
            secs = data["duration_us"] / 1e6
            data["rps"] = data["requests"] / secs if secs else 0.0
            data["bytes_per_response"] = data["bytes"] / data["requests"] if data["requests"] else 0
            data["error_count"] = sum(data["errors"].values())
            data["connections"] = connections
            data["threads"] = threads
            # wrk's own CPU time ÷ wall time: near 1.0 × threads, the client (not the server) was the limit.
            data["wrk_cpu_util"] = wrk_cpu / secs if secs else 0.0
            return data
    raise RuntimeError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
