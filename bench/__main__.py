"""``python -m bench``: every benchmark in one run, results in bench/RESULTS.md and bench/results.json.

    .venv/bin/python -m bench            # the full run (~8 min on 2 cores)
    .venv/bin/python -m bench --quick    # a smoke run (~1.5 min): short, single runs; numbers not comparable
    .venv/bin/python -m bench --only throughput,profile

Sections: footprint (start to ready; RSS idle and with 500 open
connections), throughput (cached hits vs the bare uvicorn + Starlette app,
Caddy, nginx; req per CPU-second; latency), profile (py-spy: framework vs
our layers), swr (steady state across refreshes), storm (what the PVS sees
under a storm of callers). Everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    common,
    footprint,
    profile,
    report,
    servers,
    storm,
    swr,
    throughput,
)
from bench.common import BENCH, LOAD_CPUS, ROOT, SUT_CPUS, run_capture

SECTIONS = ("footprint", "throughput", "profile", "swr", "storm")


def log(msg: str) -> None:
    print(msg, flush=True)


def ensure_deps() -> None:
    missing = [t for t in ("wrk", "caddy", "taskset") if shutil.which(t) is None]
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        missing.append("nginx")
    has_pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if missing or not has_pyspy:
        log(f"installing benchmark tools ({', '.join(missing + ([] if has_pyspy else ['py-spy']))}) with bench/deps.sh")
        subprocess.run(["bash", str(BENCH / "deps.sh"), sys.executable], check=True)
    if shutil.which("nginx") is None:
        os.environ["PATH"] += os.pathsep + "/usr/sbin"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def meta(argv: list[str]) -> dict[str, Any]:
    commit = run_capture(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run_capture(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench  (= .venv/bin/python -m bench" + (" " + " ".join(argv) if argv else "") + ")",
        "commit": commit + (" (with uncommitted changes)" if dirty and not dirty.startswith("unavailable") else ""),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram": _ram(),
        "kernel": platform.release(),
        "load_start": os.getloadavg()[0],
        "sut_cpus": SUT_CPUS,
        "load_cpus": LOAD_CPUS,
        "versions": {
            "Python": platform.python_version(),
            "uvicorn": _version("uvicorn"),
            "starlette": _version("starlette"),
            "h11": _version("h11"),
            "limits": _version("limits"),
            "OpenSSL": ssl.OPENSSL_VERSION.replace("OpenSSL ", ""),
            "Caddy": _first_line(run_capture(["caddy", "version"])).split(" ")[0],
            "nginx": run_capture(["nginx", "-v"]).replace("nginx version: nginx/", ""),
            "wrk": _first_line(run_capture(["wrk", "-v"])).split(" [")[0].replace("wrk ", ""),
            "py-spy": run_capture([shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy", "--version"]).replace("py-spy ", ""),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 short run each; does not overwrite RESULTS.md unless --out is given")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--runs", type=int, help="wrk runs per target and connection count (default 3)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 6)")
    ap.add_argument("--out", help="folder for RESULTS.md, results.json and the profile (default bench/)")
    ap.add_argument("--keep-work", action="store_true", help="keep bench/work/ (logs, configs) afterwards")
    args = ap.parse_args()
    argv = sys.argv[1:]

    q = args.quick
    runs = args.runs or (1 if q else 3)
    duration = args.duration or (2.0 if q else 6.0)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    out_dir = Path(args.out) if args.out else (BENCH / "quick" if q else BENCH)
    out_dir.mkdir(parents=True, exist_ok=True)

    ensure_deps()
    common.pin_self_to_load_cpus()
    work = BENCH / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    results: dict[str, Any] = {"meta": meta(argv), "errors": {}}
    log(f"bench: {results['meta']['nproc']} cores, load {results['meta']['load_start']:.2f}; server under test on CPU {SUT_CPUS or 'any'}")
    try:
        # The DeviceList bytes every target serves: the simulator's, taken once.
        sim = servers.simulator(work / "capture", "capture", "--latency-scale", "0", "--clock", "12:00", "--seed", "7")
        status, _, body = common.get(sim.url + servers.DEVICE_LIST)
        sim.stop()
        if status != 200:
            raise RuntimeError(f"simulator answered DeviceList with {status}")
        body_file = (work / "devicelist.json").resolve()
        body_file.write_bytes(body)
        upstream = servers.static_upstream(work / "upstream", body_file)

        def section(name: str, fn: Any) -> None:
            if name not in only:
                return
            log(f"[{time.monotonic() - started:5.0f} s] {name}")
            try:
                results[name] = fn()
            except Exception:
                results["errors"][name] = traceback.format_exc()
                log(f"  {name} FAILED:\n{traceback.format_exc()}")

        section("footprint", lambda: footprint.run(work / "footprint", upstream, body_file, starts=2 if q else 5, log=log))
        section("throughput", lambda: throughput.run(
            work / "throughput", upstream, body_file, connections=[16, 64], runs=runs, duration=duration,
            warmup=1.0 if q else 2.0, paced_delay_ms=20, retry_budget=0 if q else 6, log=log))
        section("profile", lambda: profile.run(work / "profile", upstream, out_dir, seconds=3 if q else 8, log=log))
        section("swr", lambda: swr.run(work / "swr", duration=5.0 if q else 10.0, connections=8, delay_ms=20, log=log))
        section("storm", lambda: storm.run(work / "storm", callers=24, duration=6.0 if q else 15.0, ttl=2.0, min_interval=0.2, log=log))
    finally:
        common.stop_all()
        results["meta"]["elapsed_s"] = time.monotonic() - started
        results["meta"]["load_end"] = os.getloadavg()[0]
        raw = out_dir / "profile-raw.txt"
        if raw.exists():
            with raw.open("rb") as src, gzip.GzipFile(out_dir / "profile-raw.txt.gz", "wb", mtime=0) as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out_dir / "RESULTS.md").write_text(report.render(results))
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    log(f"bench: done in {results['meta']['elapsed_s'] / 60:.1f} min; wrote {out_dir / 'RESULTS.md'} and {out_dir / 'results.json'}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
