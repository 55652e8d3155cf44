"""Where the time of a cached hit goes: py-spy sampling the gateway under wrk load.

The busy samples of the event loop's thread are split by component and grouped
into the framework's (uvicorn, h11, Starlette, asyncio, ssl/OpenSSL, socket
calls) and ours (gateway.edge, middleware, auth, rate limit, routes, proxy, cache).

Two recordings, each while wrk holds 16 connections on the gateway:
- ``--native --format raw`` (Python and C frames) -> ``profile-raw.txt``,
  summarised here: busy share, top functions (self and inclusive), and an
  exclusive split by component;
- a flame graph of the Python frames -> ``profile.svg``.

py-spy counts an executor thread blocked on its queue as active; samples of
threads other than the event loop's are therefore split off and reported
apart, and the event loop's own wait in epoll counts as idle.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import servers, wrk
from bench.common import LOAD_CPUS, Proc, taskset

RATE = 100

# (group, bucket, pattern): each busy sample goes to the first bucket whose pattern
# matches a frame, walking from the innermost frame outwards (exclusive split). The
# group says whose code it is: the framework's (uvicorn, h11, Starlette, asyncio, the
# ssl module and OpenSSL, the kernel's socket calls) or ours (gateway.*, and the
# libraries called only for our decisions: logging for the access log, limits).
FRAMEWORK = "framework"
OURS = "ours"
BUCKETS: list[tuple[str, str, re.Pattern[str]]] = [
    (OURS, "access log (gateway/middleware/accesslog.py, logbuffer, logging)",
     re.compile(r"\(logging/|gateway/middleware/accesslog|gateway/logbuffer")),
    (OURS, "rate limit (gateway/ratelimit.py + limits)", re.compile(r"\(limits/|gateway/ratelimit\.py")),
    (OURS, "authentication (gateway/auth/)", re.compile(r"\(gateway/auth/")),
    (OURS, "edge (gateway/edge.py)", re.compile(r"\(gateway/edge\.py")),
    (OURS, "middleware (gateway/middleware/: guard, forwarded, LAN)", re.compile(r"\(gateway/middleware/")),
    (OURS, "cache (gateway/cache.py)", re.compile(r"\(gateway/cache\.py")),
    (OURS, "routes + allowlist (gateway/routes.py, allowlist.py)", re.compile(r"\(gateway/(routes|allowlist|scopes)\.py")),
    (OURS, "proxy, responses, other gateway code", re.compile(r"\(gateway/")),
    (FRAMEWORK, "TLS (OpenSSL, ssl module, asyncio sslproto)",
     re.compile(r"SSLProtocol|\(ssl\.py|sslproto|_ssl|libssl|libcrypto|SSL_")),
    (FRAMEWORK, "socket I/O (send/recv syscalls, asyncio selector transport)", re.compile(
        r"^(send|recv|sendmsg|recvmsg|writev|readv) \(libc|sock_(send|recv|call)|selector_events")),
    (FRAMEWORK, "uvicorn + h11 (HTTP/1.1 protocol)", re.compile(r"uvicorn/|\(h11/")),
    (FRAMEWORK, "Starlette (router, request, response)", re.compile(r"\(starlette/")),
    (FRAMEWORK, "event loop, tasks, callbacks (asyncio)",
     re.compile(r"asyncio/|_asynciomodule|events\.py|TaskStep|task_step|\(contextvars|\(typing\.py")),
]
IDLE_LEAF = re.compile(r"EpollSelector\.select|epoll_wait|epoll_pwait|select\.epoll|_run_once \(asyncio/base_events\.py|poll \(")


def _clean(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def parse(raw: str) -> dict[str, Any]:
    main_busy: list[tuple[list[str], int]] = []
    idle = other_threads = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_clean(f) for f in stack.split(";")]
        if any("Thread._bootstrap" in f for f in frames):
            other_threads += count
            continue
        if IDLE_LEAF.search(frames[-1]) or (len(frames) > 1 and IDLE_LEAF.search(frames[-2]) and "0x" in frames[-1]):
            idle += count
            continue
        main_busy.append((frames, count))
    busy = sum(c for _, c in main_busy)
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    for frames, count in main_busy:
        py_frames = [f for f in frames if re.search(r"\(.*\.py\)|\(<", f)]
        if py_frames:
            self_t[py_frames[-1]] += count
        for f in set(py_frames):
            incl[f] += count
        for f in reversed(frames):
            hit = next(((group, name) for group, name, rx in BUCKETS if rx.search(f)), None)
            if hit:
                groups[hit[0]] += count
                buckets[hit[1]] += count
                break
        else:
            groups["other"] += count
            buckets["other"] += count

    def share(counter: collections.Counter[str], n: int, skip_outer: bool = False) -> list[dict[str, Any]]:
        rows = []
        for f, c in counter.most_common():
            if skip_outer and c >= 0.95 * busy:
                continue  # the frames every request sits under (runpy, asyncio.run, the loop)
            rows.append({"frame": f, "share": c / busy if busy else 0.0, "samples": c})
            if len(rows) >= n:
                break
        return rows

    return {
        "samples_main_busy": busy,
        "samples_main_idle": idle,
        "samples_other_threads": other_threads,
        "busy_share_of_main": busy / (busy + idle) if busy + idle else 0.0,
        "groups": {g: groups[g] / busy if busy else 0.0 for g in (FRAMEWORK, OURS, "other")},
        "components": [{"component": k, "group": next((g for g, n, _ in BUCKETS if n == k), "other"),
                        "share": v / busy if busy else 0.0} for k, v in buckets.most_common()],
        "top_self": share(self_t, 20),
        "top_inclusive": share(incl, 40, skip_outer=True),
    }


def _record(pyspy: str, pid: int, seconds: int, out: Path, fmt: str, native: bool) -> str:
    argv = taskset(LOAD_CPUS) + [pyspy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(RATE),
                                 "--format", fmt, "-o", str(out)] + (["--native"] if native else [])
    p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"py-spy failed ({p.returncode}): {p.stderr[-1500:]}")
    return (p.stdout + p.stderr).strip().splitlines()[-2] if p.stdout or p.stderr else ""


def run(work: Path, upstream: Proc, out_dir: Path, *, seconds: int, log: Any = print) -> dict[str, Any]:
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        return {"skipped": "py-spy is not installed (bench/deps.sh installs it into the venv)"}
    gw = servers.gateway(work / "profile-gateway", upstream.url, {"cache": {"ttl": {"DeviceList": 3600}}}, name="profile-gateway")
    from bench.throughput import warm

    warm("gateway", gw)
    lua = wrk.script(work / "profile.lua", servers.auth_headers(gw))
    result: dict[str, Any] = {"rate_hz": RATE, "seconds": seconds}
    try:
        for fmt, native, path in (("raw", True, work / "profile-raw.txt"), ("flamegraph", False, out_dir / "profile.svg")):
            load: dict[str, Any] = {}
            t = threading.Thread(target=lambda out=load: out.update(wrk.run(gw.url + servers.DEVICE_LIST, lua, connections=16, duration=seconds + 2)))
            t.start()
            time.sleep(1.0)
            result[f"pyspy_{fmt}"] = _record(pyspy, gw.pid, seconds, path, fmt, native)
            t.join()
            result[f"rps_while_recording_{fmt}"] = load.get("rps")
        raw = (work / "profile-raw.txt").read_text()
        (out_dir / "profile-raw.txt").write_text(raw)
        result.update(parse(raw))
    finally:
        gw.stop()
    g = result.get("groups", {})
    top = ", ".join(f"{c['component']} {c['share']:.0%}" for c in result.get("components", [])[:5])
    log(f"  profile: {result.get('samples_main_busy')} busy samples; framework {g.get(FRAMEWORK, 0):.0%}, ours {g.get(OURS, 0):.0%}, "
        f"other {g.get('other', 0):.0%}; {top}")
    return result
