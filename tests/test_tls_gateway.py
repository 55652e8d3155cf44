"""HTTPS out of the box, through the real gateway process and its CLI."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    BASE_CONFIG,
    Gateway,
    Simulator,
    _merge,
    _wait_for_line,
    toml_dumps,
)

TLS = {"server": {"tls": "self-signed", "hostnames": ["pvs.home.test", "192.0.2.44"]}}


def _cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(gw.config_path)], capture_output=True, text=True, check=True)


def _peer_fingerprint(port: int, ca: str, server_hostname: str, *, version: ssl.TLSVersion | None = None) -> str:
    ctx = ssl.create_default_context(cafile=ca)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
        import hashlib

        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def test_a_client_trusting_only_the_exported_ca_connects_by_every_name(simulator: Simulator, make_gateway, tmp_path: Path) -> None:
    gw = make_gateway(simulator.url, TLS)
    ca = tmp_path / "exported-ca.pem"
    ca.write_text(_cli(gw, "certs", "export-ca").stdout)
    assert ca.read_text().startswith("-----BEGIN CERTIFICATE-----")
    port = int(gw.url.rsplit(":", 1)[1])
    for name in ("localhost", "127.0.0.1", "pvs.home.test"):
        _peer_fingerprint(port, str(ca), name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _peer_fingerprint(port, str(ca), "not-in-the-certificate.test")
    for url in (f"https://localhost:{port}", f"https://127.0.0.1:{port}"):
        r = httpx.get(url + "/cgi-bin/dl_cgi/supervisor/info", verify=ssl.create_default_context(cafile=str(ca)), headers={"Authorization": f"Bearer {gw.keys['viewer']}"})
        assert r.status_code == 200
        assert r.headers["strict-transport-security"].startswith("max-age=")


def test_tls_1_1_is_refused_and_1_2_and_1_3_work(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url, TLS)
    port = int(gw.url.rsplit(":", 1)[1])
    _peer_fingerprint(port, str(gw.ca), "localhost", version=ssl.TLSVersion.TLSv1_2)
    _peer_fingerprint(port, str(gw.ca), "localhost", version=ssl.TLSVersion.TLSv1_3)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # offering TLS 1.1 is the point of this client
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost").close()


def test_restart_keeps_the_ca_and_certs_renew_swaps_the_leaf_live(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url, TLS)
    shown = _cli(gw, "certs", "show").stdout
    assert "pvs.home.test" in shown and "192.0.2.44" in shown and "days_left" in shown
    port = int(gw.url.rsplit(":", 1)[1])
    ca_before = gw.ca.read_bytes()
    leaf_before = _peer_fingerprint(port, str(gw.ca), "localhost")
    fingerprint_line = next(line for line in gw.logs().splitlines() if "pvs-gateway listening on https://" in line)
    assert "certificate sha256" in fingerprint_line

    _cli(gw, "certs", "renew")
    deadline = time.monotonic() + 12  # the running gateway checks its files every 5 s
    while _peer_fingerprint(port, str(gw.ca), "localhost") == leaf_before:
        assert time.monotonic() < deadline, "the running gateway did not pick up the renewed leaf"
        time.sleep(0.5)
    assert gw.proc.poll() is None  # no restart

    gw.stop()
    # Same config and cert_dir, new process: the CA must be reused, not recreated.
    restarted = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(gw.config_path)], cwd=gw.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert restarted.stdout is not None
        for line in restarted.stdout:
            if "listening on" in line:
                break
        assert gw.ca.read_bytes() == ca_before
    finally:
        restarted.terminate()
        restarted.wait(timeout=10)
    for key in ("ca.key", "leaf.key"):
        assert oct((gw.ca.parent / key).stat().st_mode & 0o777) == "0o600"


def test_plain_http_port_redirects_others_to_https_by_the_configured_name(simulator: Simulator, make_gateway) -> None:
    """SPEC server.http_port: a client not in auth.allow_anonymous_from gets 308 to
    https://<first of hostnames>:<port>/<same path and query>, never built from its Host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    gw = make_gateway(simulator.url, {**TLS, "server": {**TLS["server"], "http_port": http_port}})
    https_port = gw.url.rsplit(":", 1)[1]
    r = httpx.get(f"http://127.0.0.1:{http_port}/cgi-bin/dl_cgi?Command=DeviceList", headers={"Host": "evil.example"})
    assert r.status_code == 308
    assert r.headers["location"] == f"https://pvs.home.test:{https_port}/cgi-bin/dl_cgi?Command=DeviceList"
    assert r.content == b""


def test_gateways_started_together_on_one_empty_cert_dir_serve_one_ca(simulator: Simulator, tmp_path: Path) -> None:
    """issue 22 item 5: the certificates in a shared cert_dir are made under a file lock."""
    for attempt in range(5):
        shared = tmp_path / f"round{attempt}" / "certs"
        procs = []
        for i in range(3):
            workdir = tmp_path / f"round{attempt}" / f"gw{i}"
            workdir.mkdir(parents=True)
            config = _merge(BASE_CONFIG, {"upstream": {"url": simulator.url}, "server": {"tls": "self-signed", "cert_dir": str(shared)}})
            (workdir / "pvs-gateway.toml").write_text(toml_dumps(config))
            log = workdir / "gateway.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gateway", "serve", "--config", str(workdir / "pvs-gateway.toml")],
                    cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                )
            procs.append((proc, log))
        try:
            ports = []
            for proc, log in procs:
                match = _wait_for_line(proc, log, re.compile(r"pvs-gateway listening on https://\S+:(\d+)"), "gateway")
                ports.append(int(match.group(1)))
            ca = shared / "ca.pem"
            leaves = {_peer_fingerprint(port, str(ca), "localhost") for port in ports}  # each verifies against the one CA
            assert len(leaves) == 1, (attempt, leaves)
            logs = "".join(log.read_text() for _, log in procs)
            assert logs.count("created local CA") == 1, logs
            assert sorted(p.name for p in shared.glob("*.pem")) == ["ca.pem", "leaf.pem"]
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, _ in procs:
                proc.wait(timeout=15)
