"""Start to ready, and what a start costs.

Time from spawning ``python -m gateway serve`` to the first 200 on
``/healthz`` over HTTPS (polled every 5 ms with a new connection), on the
server's core. The first start in a fresh folder also makes the household CA
and the leaf; the later ones find them (a normal restart). Also: the
interpreter alone, and the import of the gateway's modules, to show where a
start goes; ``python -X importtime`` lists the heaviest imports.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from bench import servers
from bench.common import SUT_CPUS, free_port, get, median, python, spawn, taskset


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
    rows = sorted(({"package": k, "self_ms": v} for k, v in per_package.items()), key=lambda r: -r["self_ms"])
    return {"total_ms": total, "top": rows[:top]}


def run(work: Path, upstream_url: str, *, starts: int, log: Any = print) -> dict[str, Any]:
    port = free_port()
    cfg = servers.gateway_config(upstream_url, {"cache": {"ttl": {"DeviceList": 3600}}}, port=port)
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
    return result
