"""Files that never surprise (issue 20 "Files"): every file problem is one line naming the file.

Each test runs the real CLI (``python -m gateway ...``) on real files in a
temporary directory, and checks the exit code (SPEC §1: 2 configuration,
1 runtime), that the message names the right file, that there is no
traceback, and that nothing was created or replaced on the way out.
docs/faults.md is the table of these cases; each row names its test here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import tls
from gateway.auth import keys as keystore
from gateway.settings import ServerSettings
from tests.harness import BASE_CONFIG, Simulator, _merge, start_gateway, stop_process, toml_dumps

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = "http://127.0.0.1:9"  # upstream for tests that never reach it (loopback discard port)


def write_config(workdir: Path, config: dict[str, Any] | None = None) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "pvs-gateway.toml"
    path.write_text(toml_dumps(_merge(_merge(BASE_CONFIG, {"upstream": {"url": NOWHERE}}), config or {})))
    return path


def cli(*args: str, cwd: Path, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def one_line(stderr: str) -> str:
    """The single line a refused command printed (and that it is a single line, without a traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def listed(stderr: str) -> list[str]:
    """The problems ``check`` listed, one per line."""
    assert "Traceback" not in stderr, stderr
    return [line[4:] for line in stderr.splitlines() if line.startswith("  - ")]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()} if directory.exists() else {}


CERT_FILES = (tls.CA_CERT, tls.CA_KEY, tls.LEAF_CERT, tls.LEAF_KEY)


def cert_files(cert_dir: Path) -> dict[str, bytes]:
    """The CA and leaf files (cert_dir also holds the lock and the session key)."""
    return {name: data for name, data in snapshot(cert_dir).items() if name in CERT_FILES}


@pytest.fixture
def free_port() -> Iterator[socket.socket]:
    """A port another program is listening on."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy


# ---------------------------------------------------------------- the key file


def test_check_and_serve_refuse_a_keys_file_others_can_write(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    keys_file = tmp_path / "keys.json"
    keystore.add_key(keys_file, "phone")
    keys_file.chmod(0o664)
    expected = f"auth.keys_file: {keys_file} is writable by group or others, so anyone who can write it can add keys; run: chmod 600 {keys_file}"

    checked = cli("check", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 2 and listed(checked.stderr) == [expected]
    served = cli("serve", "--config", str(config), cwd=tmp_path)
    assert served.returncode == 2
    assert one_line(served.stderr) == f"pvs-gateway serve: {expected}"
    assert not (tmp_path / "certs").exists()  # refused before anything was made

    keys_file.chmod(0o600)  # the fix the line gives
    assert cli("check", "--config", str(config), cwd=tmp_path).returncode == 0


def test_check_and_serve_refuse_a_corrupt_keys_file(tmp_path: Path) -> None:
    """It used to pass `check`, and `serve` then started and refused every key."""
    config = write_config(tmp_path)
    keys_file = tmp_path / "keys.json"
    keystore.add_key(keys_file, "phone")
    keys_file.write_text(keys_file.read_text()[:-20])
    checked = cli("check", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 2
    (problem,) = listed(checked.stderr)
    assert problem.startswith(f"auth.keys_file: {keys_file} is corrupt (not valid JSON")
    served = cli("serve", "--config", str(config), cwd=tmp_path)
    assert served.returncode == 2 and one_line(served.stderr) == f"pvs-gateway serve: {problem}"


def test_keys_rotate_keeps_the_expiry_through_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    def expires(out: str) -> str:
        return next(part for part in out.split() if part.startswith("expires="))

    added = cli("keys", "add", "guest", "--expires-days", "3", "--config", str(config), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    rotated = cli("keys", "rotate", "guest", "--config", str(config), cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    assert expires(rotated.stdout) == expires(added.stdout) != "expires=never"
    assert rotated.stdout.splitlines()[-1] != added.stdout.splitlines()[-1]  # a new secret
    extended = cli("keys", "rotate", "guest", "--expires-days", "30", "--config", str(config), cwd=tmp_path)
    assert extended.returncode == 0 and expires(extended.stdout) > expires(added.stdout)


# ---------------------------------------------------------------- the CA and cert_dir


TLS_ON = {"server": {"tls": "self-signed"}}


def test_check_finds_a_cert_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "occupied").write_text("a file where a directory should go")
    config = write_config(tmp_path, {"server": {"cert_dir": "occupied/certs"}})
    checked = cli("check", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 2
    assert listed(checked.stderr) == [
        f"server.cert_dir: {tmp_path / 'occupied' / 'certs'} cannot be created: {tmp_path / 'occupied'} is not a directory"
    ]
    config = write_config(tmp_path, {"server": {"tls": "self-signed", "cert_dir": "occupied/certs"}})
    served = cli("serve", "--config", str(config), cwd=tmp_path)
    assert served.returncode == 1
    line = served.stderr.strip().splitlines()[-1]
    assert "Traceback" not in served.stderr and line.startswith("pvs-gateway serve: "), served.stderr
    assert str(tmp_path / "occupied" / "certs") in line and "Not a directory" in line


@pytest.mark.parametrize(
    "damage, blamed, fix",
    [
        ("lone-key", tls.CA_CERT, f"or delete {{d}}/{tls.CA_KEY} to make a new CA"),
        ("lost-key", tls.CA_KEY, "restore it from a backup"),
        ("corrupt-cert", tls.CA_CERT, "restore it from a backup"),
        ("corrupt-key", tls.CA_KEY, "restore it from a backup"),
        ("other-key", tls.CA_KEY, "restore the matching key"),
    ],
)
def test_a_ca_problem_is_one_line_naming_the_file_and_nothing_is_replaced(
    tmp_path: Path, damage: str, blamed: str, fix: str
) -> None:
    config = write_config(tmp_path, TLS_ON)
    cert_dir = tmp_path / "certs"
    paths = tls.ensure_certificates(cert_dir, ())
    if damage == "lone-key":
        paths.ca_cert.unlink()
    elif damage == "lost-key":
        paths.ca_key.unlink()
    elif damage == "corrupt-cert":
        paths.ca_cert.write_text(paths.ca_cert.read_text()[:200])
    elif damage == "corrupt-key":
        paths.ca_key.write_bytes(b"\x00" * 100)
    else:
        other = tls.ensure_certificates(tmp_path / "elsewhere", ())
        paths.ca_key.write_bytes(other.ca_key.read_bytes())
    before = cert_files(cert_dir)

    checked = cli("check", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 2
    (problem,) = listed(checked.stderr)
    assert problem.startswith(f"server.cert_dir: {cert_dir / blamed} "), problem
    assert fix.format(d=cert_dir) in problem

    served = cli("serve", "--config", str(config), cwd=tmp_path)
    assert served.returncode == 1
    line = served.stderr.strip().splitlines()[-1]
    assert "Traceback" not in served.stderr
    assert line == f"pvs-gateway serve: {problem.removeprefix('server.cert_dir: ')}", served.stderr
    assert cert_files(cert_dir) == before  # no new CA, no new leaf, nothing rewritten


def test_tls_files_that_cannot_be_read_are_one_line_naming_the_file(tmp_path: Path) -> None:
    issued = tls.ensure_certificates(tmp_path / "issued", ())
    key = tmp_path / "server.key"
    key.write_bytes(issued.leaf_key.read_bytes())
    missing = tmp_path / "server.pem"  # never written
    config = write_config(tmp_path, {"server": {"tls": "files", "cert_file": str(missing), "key_file": str(key)}})
    checked = cli("check", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 2
    assert listed(checked.stderr) == [f"server.cert_file: cannot read {missing}: No such file or directory"]
    served = cli("serve", "--config", str(config), cwd=tmp_path)
    assert served.returncode == 1 and "Traceback" not in served.stderr
    assert served.stderr.strip().splitlines()[-1] == f"pvs-gateway serve: cannot read {missing}: No such file or directory"
    missing.write_bytes(tls.ensure_certificates(tmp_path / "other", ()).leaf_cert.read_bytes())  # a cert whose key this is not
    checked = cli("check", "--config", str(config), cwd=tmp_path)
    (problem,) = listed(checked.stderr)
    assert checked.returncode == 2 and problem.startswith(f"server.cert_file: cannot use {missing} with {key}: ")


def test_an_upstream_ca_file_that_cannot_be_loaded_is_one_line(tmp_path: Path) -> None:
    ca = tmp_path / "pvs-ca.pem"
    config = write_config(tmp_path, {"upstream": {"url": "https://127.0.0.1:9", "verify_tls": "ca", "ca_file": str(ca)}})
    checked = cli("check", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 2
    assert listed(checked.stderr) == [f"upstream.ca_file: cannot load {ca}: No such file or directory"]
    served = cli("serve", "--config", str(config), cwd=tmp_path)
    assert served.returncode == 1 and "Traceback" not in served.stderr, served.stderr
    assert served.stderr.strip().splitlines()[-1] == f"pvs-gateway serve: upstream.ca_file: cannot load {ca}: No such file or directory"
    ca.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    (problem,) = listed(cli("check", "--config", str(config), cwd=tmp_path).stderr)
    assert problem.startswith(f"upstream.ca_file: cannot load {ca}: ")


# ---------------------------------------------------------------- ports


def test_a_port_in_use_exits_1_in_one_line_before_certificates_are_made(tmp_path: Path, free_port: socket.socket) -> None:
    port = free_port.getsockname()[1]
    config = write_config(tmp_path, {"server": {"tls": "self-signed", "port": port}})
    served = cli("serve", "--config", str(config), cwd=tmp_path)
    assert served.returncode == 1
    assert one_line(served.stderr) == f"pvs-gateway serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "certs").exists()


def test_a_plain_http_port_in_use_is_found_as_early(tmp_path: Path, free_port: socket.socket) -> None:
    port = free_port.getsockname()[1]
    # The plain-HTTP listener's setting (issue "simplify" renames http_redirect_port to http_port).
    name = "http_port" if "http_port" in {f.name for f in dataclasses.fields(ServerSettings)} else "http_redirect_port"
    config = write_config(tmp_path, {"server": {"tls": "self-signed", name: port}})
    served = cli("serve", "--config", str(config), cwd=tmp_path)
    assert served.returncode == 1
    assert one_line(served.stderr) == f"pvs-gateway serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "certs").exists()


def test_demo_on_a_port_in_use_makes_nothing_and_keeps_its_key(tmp_path: Path, free_port: socket.socket) -> None:
    port = free_port.getsockname()[1]
    state = tmp_path / "state"
    keystore.add_key(state / "keys.json", "demo", "admin")  # a demo that ran before (its key may be in use)
    before = snapshot(state)
    done = cli("demo", "--port", str(port), "--state-dir", str(state), cwd=tmp_path)
    assert done.returncode == 1
    assert one_line(done.stderr) == f"pvs-gateway demo: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert snapshot(state) == before and not (state / "certs").exists()
    fresh = cli("demo", "--port", str(port), "--state-dir", str(tmp_path / "fresh"), cwd=tmp_path)
    assert fresh.returncode == 1 and not (tmp_path / "fresh").exists()


# ---------------------------------------------------------------- closed pipes


@pytest.mark.parametrize(
    "args",
    [("keys", "list"), ("keys", "list", "--json"), ("certs", "export-ca"), ("certs", "show"), ("check",), ("keys", "add", "late")],
    ids=lambda a: " ".join(a),
)
def test_every_command_exits_quietly_on_a_closed_pipe(tmp_path: Path, args: tuple[str, ...]) -> None:
    """`pvs-gateway keys list --json | head`: the reader is gone before the output is written."""
    config = write_config(tmp_path, TLS_ON)
    keystore.add_key(tmp_path / "keys.json", "phone")
    control = cli(*args, "--config", str(config), cwd=tmp_path)
    assert control.returncode == 0 and control.stdout, control.stderr  # it has output to lose
    if args[:2] == ("keys", "add"):
        args = ("keys", "add", "later")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(config)],
            cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert done.returncode == 1


# ---------------------------------------------------------------- renewal on a full disk


def _collect(stream: Any, lines: list[str]) -> None:
    lines.extend(stream)  # line by line, as the process writes them


def test_a_renewal_that_cannot_be_written_leaves_the_valid_leaf_in_service(tmp_path: Path) -> None:
    """issue 20: a renewal due on a full disk stopped the gateway from starting."""
    first = start_gateway(tmp_path, NOWHERE, TLS_ON)  # makes the CA, the leaf and the session key
    first.stop()
    leaf = tmp_path / "certs" / tls.LEAF_CERT
    before = cert_files(tmp_path / "certs")
    # Every regular-file write stops at 64 bytes (a full disk, for any user, root included),
    # and the leaf is always due for renewal (renew when fewer than 100 days remain).
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        "from gateway.cli import main\n"
        f"sys.exit(main(['serve', '--config', {str(first.config_path)!r}]))\n"
    )
    env = {**os.environ, "PVSGW_SERVER__CERT_RENEW_DAYS": "100"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    threading.Thread(target=_collect, args=(proc.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while not any("pvs-gateway listening on https://" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        url = next(line for line in lines if "listening on" in line).split("listening on ")[1].split()[0].rstrip(",")
        port = int(url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(tmp_path / "certs" / tls.CA_CERT))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            served = conn.getpeercert(binary_form=True)
        assert served is not None
        assert hashlib.sha256(served).hexdigest() == hashlib.sha256(ssl.PEM_cert_to_DER_cert(leaf.read_text())).hexdigest()
        r = httpx.get(url + "/metrics", verify=ctx, headers={"Authorization": f"Bearer {first.keys['admin']}"}, timeout=10)
        assert r.status_code == 200
        assert "pvsgw_certificate_renewal_failures_total 1.0" in r.text
        warnings = [line for line in lines if "could not renew the server certificate" in line]
        assert len(warnings) == 1 and str(tmp_path / "certs" / tls.LEAF_KEY) in warnings[0] and "WARNING" in warnings[0]
    finally:
        stop_process(proc)
    assert "Traceback" not in "".join(lines)
    assert cert_files(tmp_path / "certs") == before


# ---------------------------------------------------------------- the PVS pin


def test_a_damaged_pin_file_gets_a_502_that_names_no_server_path(tmp_path: Path, make_simulator: Any) -> None:
    sim: Simulator = make_simulator("--firmware", "localapi", "--latency-scale", "0.05", "--seed", "3")
    assert sim.url.startswith("https://")
    pin = tmp_path / "gw" / "certs" / "pvs-pin.json"
    pin.parent.mkdir(parents=True)
    pin.write_text('{"sha256": "not a fingerprint"}')
    gw = start_gateway(tmp_path / "gw", sim.url, {"upstream": {"firmware": "localapi", "verify_tls": "pin", "failure_threshold": 10}})
    try:
        with gw.client() as c:
            r = c.get("/vars?name=/sys/info/sw_rev")
        assert r.status_code == 502, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["proxy-status"].startswith("pvs-gateway; error=tls_certificate_error")
        assert str(tmp_path) not in r.text and "pvs-pin.json" not in r.text and "certs/" not in r.text
        assert "pvs-gateway certs trust-pvs" in r.json()["detail"]
        logs = gw.wait_for_log(str(pin))  # the path is for the admin reading the log
        assert "Traceback" not in logs
        assert pin.read_text() == '{"sha256": "not a fingerprint"}'  # not re-pinned over it
        checked = cli("check", "--config", str(gw.config_path), cwd=gw.workdir)
        assert checked.returncode == 2
        assert listed(checked.stderr) == [
            f"server.cert_dir: the PVS certificate pin {pin} has no valid sha256; fix it or run `pvs-gateway certs trust-pvs`"
        ]
    finally:
        gw.stop()
    assert json.loads(pin.read_text()) == {"sha256": "not a fingerprint"}


# ---------------------------------------------------------------- SIGHUP


def _served_leaf(port: int, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def test_sighup_reloads_keys_and_certificates_and_keeps_serving(simulator: Simulator, make_gateway: Any) -> None:
    gw = make_gateway(simulator.url, TLS_ON)
    assert gw.ca is not None
    port = int(gw.url.rsplit(":", 1)[1])
    old_leaf = _served_leaf(port, gw.ca)
    with gw.client("admin") as admin, gw.client("viewer") as viewer:
        assert admin.get("/healthz").status_code == 200 and viewer.get("/api/v1/summary").status_code == 200
        for args in (("keys", "revoke", "viewer"), ("certs", "renew")):
            done = cli(*args, "--config", str(gw.config_path), cwd=gw.workdir)
            assert done.returncode == 0, done.stderr
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_log("SIGHUP: reloading")
        deadline = time.monotonic() + 3  # the certificate watcher alone may take 5 s
        while _served_leaf(port, gw.ca) == old_leaf or viewer.get("/api/v1/summary").status_code != 401:
            assert time.monotonic() < deadline, gw.logs()[-2000:]
            time.sleep(0.1)
        assert admin.get("/healthz").status_code == 200  # the open connection was not dropped
    assert gw.proc.poll() is None  # SIGHUP never stops the process
    assert "Traceback" not in gw.logs()
