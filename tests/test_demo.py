"""The README's demo: `pvs-gateway demo` prints a curl line that works as printed."""

from __future__ import annotations

import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_demo_prints_a_working_curl_line_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    out_path = tmp_path / "demo.out"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--state-dir", str(tmp_path / "state")],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 30
        while "curl " not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.1)
        time.sleep(0.2)
        text = out_path.read_text()
        curl = next(line.strip() for line in text.splitlines() if line.strip().startswith("curl "))
        assert "--cacert" in curl and "https://localhost:" in curl
        result = subprocess.run(shlex.split(curl) + ["--silent", "--show-error", "--fail", "--max-time", "30"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert '"devices"' in result.stdout
        assert "plain HTTP" not in text  # the demo runs TLS and keys, so it need not warn
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the simulator runs as a child process"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=15) == 0
        finally:
            proc.kill()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists(), "Ctrl-C stops the simulator too"
