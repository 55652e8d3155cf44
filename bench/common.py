"""Processes, ports, CPU pinning and /proc readings shared by the benchmarks.

Everything listens on 127.0.0.1. On a machine with two or more cores the
server under test runs on one core (``SUT_CPUS``) and the load generator, the
simulators and the static upstream on the other (``LOAD_CPUS``), so the
numbers compare servers on equal hardware (one core, as on a Pi Zero W) and
the client does not steal the server's CPU.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

_ncpu = os.cpu_count() or 1
SUT_CPUS = "1" if _ncpu >= 2 else ""
LOAD_CPUS = "0" if _ncpu >= 2 else ""


def pin_self_to_load_cpus() -> None:
    """The bench process (and its in-process load generators) stays off the server's core."""
    if LOAD_CPUS:
        os.sched_setaffinity(0, {int(c) for c in LOAD_CPUS.split(",")})


def taskset(cpus: str) -> list[str]:
    return ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ------------------------------------------------------------------ /proc


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            out += [int(c) for c in text.split()]
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx: master + workers)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int, tree: bool = True) -> float:
    pids = process_tree(pid) if tree else [pid]
    return sum(status_kb(p, "VmRSS") for p in pids) / 1024


def hwm_mb(pid: int, tree: bool = True) -> float:
    """Peak RSS since start (VmHWM), summed over the process tree."""
    pids = process_tree(pid) if tree else [pid]
    return sum(status_kb(p, "VmHWM") for p in pids) / 1024


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU time of the process (and its descendants)."""
    total = 0.0
    for p in process_tree(pid) if tree else [pid]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_busy_seconds(cpus: str) -> float:
    """Busy time (all processes) of the given CPUs so far, from /proc/stat."""
    if not cpus:
        return float("nan")
    wanted = {f"cpu{c}" for c in cpus.split(",")}
    total = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in wanted:
            v = [int(x) for x in parts[1:]]
            total += (sum(v[:8]) - v[3] - v[4]) / CLK_TCK  # all but idle and iowait (guest is inside user)
    return total


class Sampler:
    """Samples RSS of a process tree every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.max_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_rss_mb = max(self.max_rss_mb, rss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.max_rss_mb = max(self.max_rss_mb, rss_mb(self.pid))


# ------------------------------------------------------------------ processes


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self in _STARTED:
            _STARTED.remove(self)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Every process a benchmark starts, so that ``stop_all`` ends them (and only them) whatever happens.
_STARTED: list[Proc] = []


def stop_all() -> None:
    while _STARTED:
        _STARTED.pop().stop()


def spawn(name: str, argv: list[str], workdir: Path, *, cpus: str = "", env: dict[str, str] | None = None) -> Proc:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    full = taskset(cpus) + argv
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            full,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env={**os.environ, **(env or {})},
        )
    p = Proc(name, full, log_path, proc)
    _STARTED.append(p)
    return p


def wait_for_log(p: Proc, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rx.search(p.log())
        if m:
            return m
        if not p.alive():
            raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.log()[-3000:]}")
        time.sleep(0.02)
    raise RuntimeError(f"{p.name}: {pattern!r} not seen within {timeout} s:\n{p.log()[-3000:]}")


_UNVERIFIED = ssl.create_default_context()
_UNVERIFIED.check_hostname = False
_UNVERIFIED.verify_mode = ssl.CERT_NONE


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One GET with the standard library (no certificate check: our servers use self-signed certs)."""
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    kw: dict[str, Any] = {"context": _UNVERIFIED} if scheme == "https" else {}
    conn = cls(host, int(port), timeout=timeout, **kw)
    try:
        conn.request("GET", "/" + path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def wait_http(url: str, timeout: float = 30.0, proc: Proc | None = None, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log()[-3000:]}")
        try:
            status, _, _ = get(url, headers, timeout=2)
            if status < 500:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{url} not answering within {timeout} s (last: {last})")


def run_capture(argv: list[str], timeout: float = 30.0) -> str:
    try:
        out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"


def python() -> str:
    return sys.executable
