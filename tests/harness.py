"""Real processes on 127.0.0.1 for tests: the simulator and the gateway.

Both are started as the user would start them (``python -m gateway ...``),
on port 0, and found through the line they print when ready. Logs go to
files so tests can read them (and grep them for secrets).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.auth import keys as keystore

READY_TIMEOUT = 20.0


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configs (tables, strings, numbers, bools, lists)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((f"{prefix}{key}", value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        out += f"\n[{name}]\n" + toml_dumps(table, f"{name}.")
    return out


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _wait_for_line(proc: subprocess.Popen[bytes], log_path: Path, pattern: re.Pattern[str], what: str) -> re.Match[str]:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.03)
    proc.kill()
    raise RuntimeError(f"{what} not ready after {READY_TIMEOUT} s:\n{log_path.read_text(errors='replace')[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process as Ctrl-C would; kill it if it is still there after 8 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Simulator:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str]
    ws_url: str | None = None  # the LocalAPI telemetry WebSocket, when served

    @property
    def ws_port(self) -> int | None:
        return int(self.ws_url.rsplit(":", 1)[1]) if self.ws_url else None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=False, timeout=30)

    def stats(self) -> dict[str, Any]:
        with self.client() as c:
            return c.get("/__sim/stats").json()

    def requests(self) -> list[dict[str, Any]]:
        with self.client() as c:
            return c.get("/__sim/requests").json()

    def site(self) -> dict[str, Any]:
        with self.client() as c:
            return c.get("/__sim/site").json()

    def reset(self) -> None:
        with self.client() as c:
            c.post("/__sim/fault", json={"mode": "ok"}).raise_for_status()
            c.post("/__sim/reset").raise_for_status()

    def fault(self, mode: str, seconds: float | None = None) -> None:
        body: dict[str, Any] = {"mode": mode}
        if seconds is not None:
            body["seconds"] = seconds
        with self.client() as c:
            c.post("/__sim/fault", json=body).raise_for_status()

    def stop(self) -> None:
        stop_process(self.proc)


def start_simulator(workdir: Path, *args: str) -> Simulator:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"simulator-{time.monotonic_ns()}.log"
    # The telemetry socket's default (9002) would collide between simulators: a free port instead.
    ws = [] if "--ws-port" in args else ["--ws-port", str(free_port())]
    argv = [sys.executable, "-m", "gateway", "simulate", "--port", "0", *ws, *args]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    match = _wait_for_line(proc, log_path, re.compile(r"pvs-simulator ready url=(\S+)(?:.* ws=(\S+))?"), "simulator")
    return Simulator(match.group(1), proc, log_path, list(args), match.group(2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0, "tls": "off", "log_level": "info"},
    "upstream": {"firmware": "legacy", "min_interval": 0.0, "timeout": 10.0, "backoff_initial": 0.5, "backoff_max": 2.0},
    "ratelimit": {"per_caller": "100000/minute", "per_ip": "100000/minute", "auth_failures": "1000/minute"},
}


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    config_path: Path
    ca: Path | None
    keys: dict[str, str] = field(default_factory=dict)  # name -> secret

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else False

    def client(self, key: str | None = "admin", **kw: Any) -> httpx.Client:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {self.keys[key]}"
        return httpx.Client(base_url=self.url, verify=self.verify, headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def async_client(self, key: str | None = "admin", **kw: Any) -> httpx.AsyncClient:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {self.keys[key]}"
        return httpx.AsyncClient(base_url=self.url, verify=self.verify, headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """The log once it contains ``text`` (access lines are written in batches, within half a second)."""
        deadline = time.monotonic() + timeout
        while text not in (logs := self.logs()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout} s:\n{logs[-2000:]}")
            time.sleep(0.05)
        return logs

    def add_key(self, name: str, role: str = "viewer", **kw: Any) -> str:
        _, secret = keystore.add_key(self.workdir / "keys.json", name, role, **kw)
        self.keys[name] = secret
        return secret

    def stop(self) -> None:
        stop_process(self.proc)


def start_gateway(workdir: Path, upstream_url: str, config: dict[str, Any] | None = None, *, key_roles: dict[str, str] | None = None, env: dict[str, str] | None = None) -> Gateway:
    """Start ``pvs-gateway serve`` with BASE_CONFIG + ``config``; keys "admin" and "viewer" exist."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = _merge(BASE_CONFIG, {"upstream": {"url": upstream_url}})
    cfg = _merge(cfg, config or {})
    config_path = workdir / "pvs-gateway.toml"
    config_path.write_text(toml_dumps(cfg))
    secrets: dict[str, str] = {}
    existing = {row["name"] for row in keystore.list_keys(workdir / "keys.json")}
    for name, role in (key_roles or {"admin": "admin", "viewer": "viewer"}).items():
        if name in existing:
            _, secrets[name] = keystore.rotate_key(workdir / "keys.json", name)
        else:
            _, secrets[name] = keystore.add_key(workdir / "keys.json", name, role)
    log_path = workdir / f"gateway-{time.monotonic_ns()}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
        )
    match = _wait_for_line(proc, log_path, re.compile(r"pvs-gateway listening on (\S+)"), "gateway")
    url = match.group(1).rstrip(",")
    ca = None
    if cfg["server"].get("tls", "self-signed") == "self-signed":
        ca = workdir / cfg["server"].get("cert_dir", "certs") / "ca.pem"
    return Gateway(url, proc, workdir, log_path, config_path, ca, secrets)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
