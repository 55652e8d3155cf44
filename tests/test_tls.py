"""Server certificates: the household CA, its leaf, real handshakes and hot reload.

Every handshake here is real TLS on 127.0.0.1; names other than 127.0.0.1 are
only sent as SNI / checked against the certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import tls
from gateway.settings import ServerSettings, Settings
from tests.threaded_server import serve_in_thread

EXTRA = ("pvs-gateway.example.lan", "192.0.2.10")
ROOT = Path(__file__).resolve().parent.parent
V = ssl.TLSVersion


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def pem_sha256(path: Path) -> str:
    return sha256(ssl.PEM_cert_to_DER_cert(path.read_text()))


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def cert_dir(tmp_path: Path) -> Path:
    return tmp_path / "certs"


@contextlib.contextmanager
def tls_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """A real asyncio TLS server on 127.0.0.1 (what uvicorn does with config.ssl); yields its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"ok")
            await writer.drain()
            writer.close()
        except OSError:
            pass

    with serve_in_thread(handle, ctx) as port:
        yield port


def handshake(
    port: int,
    *,
    cafile: Path | None = None,
    server_hostname: str | None = "localhost",
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> tuple[bytes, str, str]:
    """Connect to 127.0.0.1:port; return (peer cert DER, TLS version, cipher)."""
    if cafile is not None:
        ctx = ssl.create_default_context(cafile=str(cafile))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname=server_hostname) as conn:
            der = conn.getpeercert(True)
            assert conn.recv(2) == b"ok"
            return der, conn.version() or "", conn.cipher()[0]


# ---------------------------------------------------------------- issuing


def test_ca_and_leaf_have_the_promised_shape(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, EXTRA)
    ca, leaf = load(paths.ca_cert), load(paths.leaf_cert)

    # CA: P-256, ~10 years, says it is this household's pvs-gateway, may sign leaves only.
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert 3640 <= (ca.not_valid_after_utc - ca.not_valid_before_utc).days <= 3660
    subject = ca.subject.rfc4514_string()
    assert "pvs-gateway local CA (" in subject and "O=pvs-gateway household CA" in subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest

    # Leaf: P-256, short-lived, server auth only, under the CA.
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey) and leaf.public_key().curve.name == "secp256r1"
    assert 80 <= (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 397
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    leaf.verify_directly_issued_by(ca)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {"localhost", socket.gethostname().lower(), "pvs-gateway.example.lan"} <= dns
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("192.0.2.10")} <= ips
    assert "192.0.2.10" not in dns  # IP literals are IP SANs, not DNS names


def test_key_files_are_private_from_creation(cert_dir: Path) -> None:
    old = os.umask(0)  # a careless umask must not widen the keys: the mode is given at creation
    try:
        paths = tls.ensure_certificates(cert_dir, ())
    finally:
        os.umask(old)
    assert stat.S_IMODE(cert_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.leaf_key.stat().st_mode) == 0o600
    assert sorted(p.name for p in cert_dir.iterdir()) == sorted([tls.CA_CERT, tls.CA_KEY, tls.LEAF_CERT, tls.LEAF_KEY, tls.LOCK_FILE])
    assert stat.S_IMODE((cert_dir / tls.LOCK_FILE).stat().st_mode) == 0o600


def test_ca_and_leaf_are_reused(cert_dir: Path) -> None:
    first = tls.ensure_certificates(cert_dir, EXTRA)
    ca_fp, leaf_fp = tls.fingerprint(first.ca_cert), tls.fingerprint(first.leaf_cert)
    tls.ensure_certificates(cert_dir, EXTRA)
    assert tls.fingerprint(first.ca_cert) == ca_fp
    assert tls.fingerprint(first.leaf_cert) == leaf_fp


def test_leaf_renewed_near_expiry_under_the_same_ca(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, EXTRA, renew_days=30)
    ca_fp, leaf_fp = tls.fingerprint(paths.ca_cert), tls.fingerprint(paths.leaf_cert)
    # 59 days on, 31 days remain: not yet due.
    tls.ensure_certificates(cert_dir, EXTRA, renew_days=30, now=now() + dt.timedelta(days=59))
    assert tls.fingerprint(paths.leaf_cert) == leaf_fp
    # 61 days on, 29 remain: renewed, valid from "then", same CA.
    later = now() + dt.timedelta(days=61)
    tls.ensure_certificates(cert_dir, EXTRA, renew_days=30, now=later)
    assert tls.fingerprint(paths.leaf_cert) != leaf_fp
    assert load(paths.leaf_cert).not_valid_after_utc > later + dt.timedelta(days=80)
    assert tls.fingerprint(paths.ca_cert) == ca_fp
    load(paths.leaf_cert).verify_directly_issued_by(load(paths.ca_cert))


def test_leaf_reissued_when_names_change_but_ca_kept(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, EXTRA)
    ca_fp, leaf_fp = tls.fingerprint(paths.ca_cert), tls.fingerprint(paths.leaf_cert)
    tls.ensure_certificates(cert_dir, (*EXTRA, "solar.example.lan"))
    assert tls.fingerprint(paths.leaf_cert) != leaf_fp
    assert "solar.example.lan" in tls.describe(cert_dir)["leaf"]["sans"]
    assert tls.fingerprint(paths.ca_cert) == ca_fp


def test_leaf_from_another_ca_is_replaced(cert_dir: Path, tmp_path: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, EXTRA)
    ca_fp = tls.fingerprint(paths.ca_cert)
    other = tls.ensure_certificates(tmp_path / "other", EXTRA)
    shutil.copy(other.leaf_cert, paths.leaf_cert)
    shutil.copy(other.leaf_key, paths.leaf_key)
    tls.ensure_certificates(cert_dir, EXTRA)
    load(paths.leaf_cert).verify_directly_issued_by(load(paths.ca_cert))
    assert tls.fingerprint(paths.ca_cert) == ca_fp


@pytest.mark.parametrize("damaged", [tls.LEAF_CERT, tls.LEAF_KEY])
def test_a_damaged_leaf_is_simply_reissued_under_the_same_ca(cert_dir: Path, damaged: str) -> None:
    """Nobody trusts a leaf directly, so unlike the CA it is ours to remake."""
    paths = tls.ensure_certificates(cert_dir, ())
    ca_fp, leaf_fp = tls.fingerprint(paths.ca_cert), tls.fingerprint(paths.leaf_cert)
    (cert_dir / damaged).write_bytes(b"\x00garbage")
    tls.ensure_certificates(cert_dir, ())
    assert tls.fingerprint(paths.ca_cert) == ca_fp and tls.fingerprint(paths.leaf_cert) != leaf_fp
    load(paths.leaf_cert).verify_directly_issued_by(load(paths.ca_cert))


def test_ca_whose_key_is_lost_is_never_silently_replaced(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, ())
    before = paths.ca_cert.read_bytes()
    paths.ca_key.unlink()
    with pytest.raises(tls.TLSSetupError, match="key"):
        tls.ensure_certificates(cert_dir, ())
    assert paths.ca_cert.read_bytes() == before


def test_ca_key_without_its_certificate_is_refused_not_replaced(cert_dir: Path) -> None:
    """Devices may trust the CA of this key: a new CA would break them all (issue 20)."""
    paths = tls.ensure_certificates(cert_dir, ())
    key_before = paths.ca_key.read_bytes()
    paths.ca_cert.unlink()
    for call in (lambda: tls.ensure_certificates(cert_dir, ()), lambda: tls.renew_leaf(cert_dir, ())):
        with pytest.raises(tls.TLSSetupError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message
        assert str(paths.ca_cert) in message and "missing" in message and f"delete {paths.ca_key}" in message
    assert not paths.ca_cert.exists() and paths.ca_key.read_bytes() == key_before
    assert tls.check_cert_dir(cert_dir) == [message]


@pytest.mark.parametrize("damaged", [tls.CA_CERT, tls.CA_KEY])
def test_a_damaged_ca_file_is_named_and_nothing_is_replaced(cert_dir: Path, damaged: str) -> None:
    paths = tls.ensure_certificates(cert_dir, ())
    (cert_dir / damaged).write_text("-----BEGIN garbage-----\n")
    before = {p.name: p.read_bytes() for p in cert_dir.iterdir()}
    with pytest.raises(tls.TLSSetupError) as caught:
        tls.ensure_certificates(cert_dir, ())
    message = str(caught.value)
    other = tls.CA_KEY if damaged == tls.CA_CERT else tls.CA_CERT
    assert message.startswith(f"{cert_dir / damaged} is not a readable"), message
    assert f"{cert_dir / other} is" not in message  # the right file is blamed
    assert "\n" not in message and "restore it" in message
    assert {p.name: p.read_bytes() for p in cert_dir.iterdir()} == before
    assert tls.check_cert_dir(cert_dir) == [message]
    with pytest.raises(tls.TLSSetupError, match=damaged):
        tls.describe(cert_dir) if damaged == tls.CA_CERT else tls.renew_leaf(cert_dir, ())
    assert paths.leaf_cert.read_bytes() == before[tls.LEAF_CERT]


def test_ca_and_key_that_do_not_belong_together_are_refused(cert_dir: Path, tmp_path: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, ())
    other = tls.ensure_certificates(tmp_path / "other", ())
    shutil.copy(other.ca_key, paths.ca_key)
    problems = tls.check_cert_dir(cert_dir)
    assert len(problems) == 1 and problems[0].startswith(f"{paths.ca_key} does not belong to {paths.ca_cert}")
    with pytest.raises(tls.TLSSetupError, match="does not belong"):
        tls.ensure_certificates(cert_dir, ())
    assert tls.check_cert_dir(tmp_path / "empty") == [] and tls.check_cert_dir(other.ca_cert.parent) == []


def test_renew_leaf_forces_a_new_leaf(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, EXTRA)
    ca_fp, leaf_fp = tls.fingerprint(paths.ca_cert), tls.fingerprint(paths.leaf_cert)
    tls.renew_leaf(cert_dir, EXTRA)
    assert tls.fingerprint(paths.leaf_cert) != leaf_fp
    assert tls.fingerprint(paths.ca_cert) == ca_fp


def test_describe_export_and_fingerprint(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, EXTRA)
    info = tls.describe(cert_dir)
    assert info["ca"]["sha256"] == tls.fingerprint(paths.ca_cert)
    assert info["ca"]["sha256"].replace(":", "").lower() == pem_sha256(paths.ca_cert)
    assert len(info["ca"]["sha256"].split(":")) == 32
    assert info["leaf"]["sha256"] == tls.leaf_fingerprint(cert_dir)
    assert {"localhost", "127.0.0.1", "::1", *EXTRA} <= set(info["leaf"]["sans"])
    assert info["leaf"]["issuer"] == info["ca"]["subject"]
    assert 85 <= info["leaf"]["days_left"] <= 90 and info["ca"]["days_left"] > 3600
    dt.datetime.fromisoformat(info["leaf"]["not_after"])
    assert tls.export_ca(cert_dir) == paths.ca_cert.read_text()
    assert "PRIVATE" not in tls.export_ca(cert_dir)
    assert tls.describe(cert_dir.parent / "empty") == {"cert_dir": str(cert_dir.parent / "empty"), "ca": None, "leaf": None}


def test_leaf_hostnames_adds_a_specific_listen_address() -> None:
    assert tls.leaf_hostnames(ServerSettings(host="0.0.0.0", hostnames=("a.lan",))) == ("a.lan",)
    assert tls.leaf_hostnames(ServerSettings(host="192.0.2.7", hostnames=("a.lan",))) == ("a.lan", "192.0.2.7")


# ---------------------------------------------------------------- handshakes


def test_client_trusting_only_the_ca_connects_by_every_name(cert_dir: Path, tmp_path: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, EXTRA)
    with tls_server(tls.server_ssl_context(paths.leaf_cert, paths.leaf_key)) as port:
        for name in ("localhost", "127.0.0.1", "pvs-gateway.example.lan", "192.0.2.10"):
            der, _, _ = handshake(port, cafile=paths.ca_cert, server_hostname=name)
            assert sha256(der) == pem_sha256(paths.leaf_cert)
        # The checks are real: an unlisted name, or trusting another CA, fails.
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(port, cafile=paths.ca_cert, server_hostname="not-listed.example.lan")
        other = tls.ensure_certificates(tmp_path / "other", EXTRA)
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(port, cafile=other.ca_cert, server_hostname="localhost")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls12_and_13_work_tls11_and_cbc_are_refused(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, ())
    ours = tls.server_ssl_context(paths.leaf_cert, paths.leaf_key)
    with tls_server(ours) as port:
        _, version, cipher = handshake(port, cafile=paths.ca_cert, version=V.TLSv1_2)
        assert version == "TLSv1.2" and cipher in tls.TLS12_CIPHERS.split(":")
        _, version, _ = handshake(port, cafile=paths.ca_cert, version=V.TLSv1_3)
        assert version == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            handshake(port, version=V.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            handshake(port, version=V.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
    # Control: the same clients succeed against a permissive server, so the refusals above are the server's.
    loose = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    loose.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):
        loose.minimum_version = V.TLSv1_1
    loose.load_cert_chain(paths.leaf_cert, paths.leaf_key)
    with tls_server(loose) as port:
        assert handshake(port, version=V.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")[1] == "TLSv1.1"
        assert handshake(port, version=V.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")[2] == "ECDHE-ECDSA-AES128-SHA"


def test_context_settings_and_missing_files(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, ())
    ctx = tls.server_ssl_context(paths.leaf_cert, paths.leaf_key)
    assert ctx.minimum_version == V.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and tls12 <= set(tls.TLS12_CIPHERS.split(":"))
    assert all(("GCM" in n or "CHACHA20" in n) and n.startswith("ECDHE-") for n in tls12)
    with pytest.raises(tls.TLSSetupError, match="cannot read"):
        tls.server_ssl_context(cert_dir / "nope.pem", cert_dir / "nope.key")


# ---------------------------------------------------------------- hot reload


def test_reload_serves_new_leaf_to_new_connections(cert_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.tls")
    paths = tls.ensure_certificates(cert_dir, EXTRA)
    server_tls = tls.ReloadingServerTLS(paths.leaf_cert, paths.leaf_key, cert_dir=cert_dir, hostnames=EXTRA)
    assert server_tls.ca_file == paths.ca_cert
    with tls_server(server_tls.context) as port:
        old = pem_sha256(paths.leaf_cert)
        assert sha256(handshake(port, cafile=paths.ca_cert)[0]) == old
        assert server_tls.reload_if_changed() is False  # nothing changed

        tls.renew_leaf(cert_dir, EXTRA)
        new = pem_sha256(paths.leaf_cert)
        assert new != old
        assert server_tls.reload_if_changed() is True
        assert server_tls.fingerprint == tls.fingerprint(paths.leaf_cert)
        # With SNI (a name) and without (an IP literal: clients send no SNI), same server, no restart.
        for name in ("localhost", "127.0.0.1", None):
            der, _, _ = handshake(port, cafile=paths.ca_cert if name else None, server_hostname=name)
            assert sha256(der) == new
    fps = [r.getMessage() for r in caplog.records if "sha256=" in r.getMessage()]
    assert any(server_tls.fingerprint in m for m in fps)
    assert "PRIVATE KEY" not in caplog.text


def test_mismatched_pair_keeps_the_old_certificate_serving(cert_dir: Path, tmp_path: Path) -> None:
    """Why contexts are swapped instead of reloaded in place: a half-replaced pair must not break serving."""
    paths = tls.ensure_certificates(cert_dir, ())
    server_tls = tls.ReloadingServerTLS(paths.leaf_cert, paths.leaf_key)
    other = tls.ensure_certificates(tmp_path / "other", ())
    old = pem_sha256(paths.leaf_cert)
    with tls_server(server_tls.context) as port:
        shutil.copy(other.leaf_cert, paths.leaf_cert)  # cert replaced, key not (yet)
        assert server_tls.reload_if_changed() is False
        assert sha256(handshake(port)[0]) == old
        shutil.copy(other.leaf_key, paths.leaf_key)  # now the pair matches
        assert server_tls.reload_if_changed() is True
        assert sha256(handshake(port)[0]) == pem_sha256(other.leaf_cert)


def test_self_signed_mode_renews_an_expiring_leaf_periodically(cert_dir: Path) -> None:
    paths = tls.ensure_certificates(cert_dir, ())
    server_tls = tls.ReloadingServerTLS(paths.leaf_cert, paths.leaf_key, cert_dir=cert_dir, renew_check_interval=0)
    # Someone (or time) leaves a leaf with 10 days left on disk.
    tls.renew_leaf(cert_dir, (), now=now() - dt.timedelta(days=80))
    assert server_tls.reload_if_changed() is True
    with tls_server(server_tls.context) as port:
        served = x509.load_der_x509_certificate(handshake(port, cafile=paths.ca_cert)[0])
    assert served.not_valid_after_utc - now() > dt.timedelta(days=80)


def test_from_settings_self_signed(tmp_path: Path) -> None:
    server = ServerSettings(cert_dir="c", hostnames=("a.example.lan",), cert_renew_days=20)
    settings = Settings(server=server, base_dir=str(tmp_path))
    server_tls = tls.ReloadingServerTLS.from_settings(settings)
    assert server_tls.cert_file == tmp_path / "c" / tls.LEAF_CERT
    assert server_tls.renew_days == 20
    assert "a.example.lan" in tls.describe(tmp_path / "c")["leaf"]["sans"]
    with pytest.raises(ValueError):
        tls.ReloadingServerTLS.from_settings(Settings(server=ServerSettings(tls="off")))


def test_uvicorn_hot_reload_through_watch(cert_dir: Path) -> None:
    """The gateway's wiring: config.load(); config.ssl = tls.context; watch() as a background task."""
    paths = tls.ensure_certificates(cert_dir, ())
    server_tls = tls.ReloadingServerTLS(paths.leaf_cert, paths.leaf_key, cert_dir=cert_dir)

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            task = None
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    task = asyncio.create_task(server_tls.watch(interval=0.05))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    assert task is not None
                    task.cancel()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": scope["scheme"].encode()})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, lifespan="on", access_log=False)
    config.load()
    config.ssl = server_tls.context
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def served_leaf() -> str:
        ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
        with httpx.Client(verify=ctx, trust_env=False) as client:  # a new client: a new connection
            with client.stream("GET", f"https://127.0.0.1:{port}/") as response:
                ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
                der = ssl_object.getpeercert(True)
                response.read()
                assert response.text == "https"
        return sha256(der)

    try:
        deadline = time.monotonic() + 5
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        old = served_leaf()
        assert old == pem_sha256(paths.leaf_cert)
        tls.renew_leaf(cert_dir, ())
        new = pem_sha256(paths.leaf_cert)
        deadline = time.monotonic() + 3
        while (seen := served_leaf()) == old and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == new
        assert thread.is_alive()  # same server, never restarted
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def test_bad_configured_names_are_reported() -> None:
    assert tls.hostname_problems(["pvs.example.lan", "*.example.lan", "192.0.2.1", "[::1]", "ünï.example"]) == []
    problems = tls.hostname_problems(["bad name", "a..b"])
    assert len(problems) == 2 and all(p.startswith("server.hostnames:") for p in problems)


# ---------------------------------------------------------------- files that cannot be written, reloads


def _limited(script: str, max_file_bytes: int) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a Python whose regular-file writes stop at ``max_file_bytes``: a full
    disk that works for every user (root included, who ignores directory modes)."""
    prologue = (
        "import logging, resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # EFBIG instead of being killed
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, {max_file_bytes}))\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
    )
    return subprocess.run([sys.executable, "-c", prologue + script], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


@pytest.mark.parametrize(
    "limit, fails_on",
    # 64 bytes: the new key's temp file fails. 400: the key (241 bytes) is written, the
    # certificate (~700) is not; the old pair must still be whole, not a new key beside the old cert.
    [(64, tls.LEAF_KEY), (400, tls.LEAF_CERT)],
)
def test_a_renewal_that_cannot_be_written_keeps_the_valid_leaf(cert_dir: Path, limit: int, fails_on: str) -> None:
    paths = tls.ensure_certificates(cert_dir, ())
    assert len(paths.leaf_key.read_bytes()) < 400 < len(paths.leaf_cert.read_bytes())
    tls.renew_leaf(cert_dir, (), now=now() - dt.timedelta(days=80))  # 10 days left: renewal due
    before = {p.name: p.read_bytes() for p in cert_dir.iterdir()}
    script = (
        "from gateway import tls\n"
        f"d = {str(cert_dir)!r}\n"
        "t = tls.ReloadingServerTLS(d + '/leaf.pem', d + '/leaf.key', cert_dir=d)\n"
        "print('serving', t.fingerprint, 'failures', tls.renewal_failures(d))\n"
    )
    done = _limited(script, limit)
    assert done.returncode == 0, done.stderr
    assert f"serving {tls.fingerprint(paths.leaf_cert)} failures 1" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING gateway.tls")]
    assert len(warnings) == 1, done.stderr
    assert "could not renew the server certificate" in warnings[0] and f"cannot write {cert_dir / fails_on}:" in warnings[0]
    assert "Traceback" not in done.stderr
    # Neither file of the pair was replaced, and no temp file is left behind.
    assert {p.name: p.read_bytes() for p in cert_dir.iterdir()} == before


def test_an_expired_leaf_that_cannot_be_renewed_is_one_line_naming_the_file(cert_dir: Path) -> None:
    tls.ensure_certificates(cert_dir, ())
    tls.renew_leaf(cert_dir, (), now=now() - dt.timedelta(days=100))  # expired 10 days ago
    script = (
        "from gateway import tls\n"
        "try:\n"
        f"    tls.ensure_certificates({str(cert_dir)!r}, ())\n"
        "except tls.CertWriteError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = _limited(script, 64)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"refused: cannot write {cert_dir / tls.LEAF_KEY}: File too large"), line


def test_reload_is_synchronous_never_raises_and_keeps_serving(cert_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.tls")
    paths = tls.ensure_certificates(cert_dir, ())
    server_tls = tls.ReloadingServerTLS(paths.leaf_cert, paths.leaf_key, cert_dir=cert_dir)
    first = server_tls.fingerprint
    with tls_server(server_tls.context) as port:
        assert server_tls.reload() is False  # nothing due, nothing changed
        tls.renew_leaf(cert_dir, ())  # e.g. `certs renew` in another process
        assert server_tls.reload() is True
        renewed = server_tls.fingerprint
        assert renewed != first and sha256(handshake(port, cafile=paths.ca_cert)[0]) == pem_sha256(paths.leaf_cert)

        paths.ca_cert.write_text("damaged")  # the CA file breaks while serving
        caplog.clear()
        assert server_tls.reload() is False
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and str(paths.ca_cert) in errors[0], errors
        assert server_tls.fingerprint == renewed
        assert sha256(handshake(port)[0]) == pem_sha256(paths.leaf_cert)  # still served, same leaf


def test_files_mode_reload_of_a_damaged_certificate_keeps_the_old_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    issued = tls.ensure_certificates(tmp_path / "issued", ())
    cert, key = tmp_path / "cert.pem", tmp_path / "cert.key"
    shutil.copy(issued.leaf_cert, cert)
    shutil.copy(issued.leaf_key, key)
    server_tls = tls.ReloadingServerTLS(cert, key)
    with tls_server(server_tls.context) as port:
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        caplog.clear()
        assert server_tls.reload() is False
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and str(cert) in warned[0] and "\n" not in warned[0]
        assert sha256(handshake(port)[0]) == pem_sha256(issued.leaf_cert)
        key.unlink()
        assert server_tls.reload() is False  # a missing key: the same
        assert sha256(handshake(port)[0]) == pem_sha256(issued.leaf_cert)


def test_gateways_starting_together_on_an_empty_cert_dir_make_one_ca(tmp_path: Path) -> None:
    """issue 22 item 5: a file lock in cert_dir; the second process uses what the first made."""
    script = (
        "import logging, sys, time\n"
        "from gateway import tls\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "start, d = float(sys.argv[1]), sys.argv[2]\n"
        "time.sleep(max(0.0, start - time.time()))\n"  # everyone leaves the gate together
        "p = tls.ensure_certificates(d, ())\n"
        "print(tls.fingerprint(p.ca_cert), tls.fingerprint(p.leaf_cert))\n"
    )
    for attempt in range(6):
        shared = tmp_path / f"shared{attempt}" / "certs"
        start = time.time() + 1.5  # after every interpreter has imported cryptography
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(start), str(shared)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for _ in range(4)
        ]
        results = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), results
        seen = {tuple(out.split()) for out, _ in results}
        assert len(seen) == 1, (attempt, seen)  # one CA and one leaf, the same for all
        ((ca_fp, leaf_fp),) = seen
        assert ca_fp == tls.fingerprint(shared / tls.CA_CERT) and leaf_fp == tls.fingerprint(shared / tls.LEAF_CERT)
        created = sum(err.count("created local CA") for _, err in results)
        assert created == 1, results
        load(shared / tls.LEAF_CERT).verify_directly_issued_by(load(shared / tls.CA_CERT))
