"""``pvs-gateway demo``: the simulator and the gateway, TLS and a key, in one go.

The simulator runs as a child process (as a real PVS would be another
machine); the gateway runs here. State (CA, keys) lives in ``state_dir`` so
a second run reuses the CA you may already trust. Ctrl-C stops both.
``pvs-gateway demo`` checks the port first, so a demo already running is
left alone: nothing is made and its key is not rotated.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from pathlib import Path

from gateway.auth import keys
from gateway.settings import load
from gateway.tls import CA_CERT, TLSSetupError

log = logging.getLogger("gateway.demo")


def _start_simulator(clock: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "gateway", "simulate", "--port", "0", "--latency-scale", "0.3"]
    if clock and clock != "real":
        cmd += ["--clock", clock]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("pvs-simulator ready"):
            url = next(part[4:] for part in line.split() if part.startswith("url="))
            return proc, url
    proc.wait()
    raise RuntimeError("the simulator exited before it was ready")


def run_demo(*, port: int, state_dir: Path, clock: str) -> int:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    try:
        sim, sim_url = _start_simulator(clock)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    try:
        overrides = {
            "server": {"host": "127.0.0.1", "port": port, "cert_dir": str(state_dir / "certs")},
            "upstream": {"url": sim_url, "firmware": "legacy", "min_interval": 1.0},
            "auth": {"keys_file": str(state_dir / "keys.json")},
            "ratelimit": {"per_caller": "600/minute"},
        }
        settings, problems = load(None, environ={}, overrides=overrides)
        if problems:
            for problem in problems:
                log.error("demo configuration: %s", problem)
            return 2
        keys_file = settings.path(settings.auth.keys_file)
        names = {row["name"] for row in keys.list_keys(keys_file)}
        _, secret = keys.rotate_key(keys_file, "demo") if "demo" in names else keys.add_key(keys_file, "demo", "admin")
        ca = (settings.path(settings.server.cert_dir) / CA_CERT).resolve()

        def announce(url: str) -> None:
            base = url.replace("127.0.0.1", "localhost")
            print(
                "\n".join(
                    [
                        "",
                        "pvs-gateway demo is running (Ctrl-C stops it)",
                        f"  simulated PVS : {sim_url}  (DeviceList takes ~3 s, like a real one at 1/3 speed)",
                        f"  gateway       : {base}/",
                        f"  CA to trust   : {ca}",
                        f"  demo API key  : {secret}",
                        "  try:",
                        f'    curl --cacert {ca} -H "Authorization: Bearer {secret}" "{base}/cgi-bin/dl_cgi?Command=DeviceList"',
                        "",
                    ]
                ),
                flush=True,
            )

        from gateway.server import run_async, serve

        with contextlib.suppress(KeyboardInterrupt):
            run_async(serve(settings, on_ready=announce, access_stream=sys.stderr))
        return 0
    except (TLSSetupError, keys.KeyStoreError) as exc:  # e.g. a damaged CA in the state dir
        print(f"pvs-gateway demo: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pvs-gateway demo: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        sim.terminate()
        try:
            sim.wait(timeout=5)
        except subprocess.TimeoutExpired:
            sim.kill()
