"""The device's self-signed TLS certificate, like the one new PVS firmware serves."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_FILE = "pvs-sim-cert.pem"
KEY_FILE = "pvs-sim-key.pem"


def make_self_signed(common_name: str, hosts: list[str]) -> tuple[bytes, bytes]:
    """A fresh (cert PEM, key PEM) pair valid for ``hosts`` (names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class DeviceCert:
    """Owns the server SSLContext; ``rotate()`` changes the cert for new connections only."""

    def __init__(self, *, common_name: str, hosts: list[str], cert_dir: str | None) -> None:
        self._common_name = common_name
        self._hosts = hosts
        self._dir = Path(cert_dir) if cert_dir else None
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.cert_pem = b""
        loaded = self._load_from_dir()
        if loaded is None:
            loaded = make_self_signed(common_name, hosts)
            self._save(*loaded)
        self._install(*loaded)

    def rotate(self) -> None:
        pair = make_self_signed(self._common_name, self._hosts)
        self._save(*pair)
        self._install(*pair)

    def _load_from_dir(self) -> tuple[bytes, bytes] | None:
        if self._dir is None:
            return None
        cert, key = self._dir / CERT_FILE, self._dir / KEY_FILE
        if cert.is_file() and key.is_file():
            return cert.read_bytes(), key.read_bytes()
        return None

    def _save(self, cert_pem: bytes, key_pem: bytes) -> None:
        if self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        key_path = self._dir / KEY_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        (self._dir / CERT_FILE).write_bytes(cert_pem)

    def _install(self, cert_pem: bytes, key_pem: bytes) -> None:
        # SSLContext only loads from files; a private temporary directory keeps
        # the key out of shared places and is removed at once. Loading into the
        # same context changes the cert for handshakes that start afterwards.
        with tempfile.TemporaryDirectory(prefix="pvs-sim-") as tmp:
            cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert_path.write_bytes(cert_pem)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem)
            self.context.load_cert_chain(cert_path, key_path)
        self.cert_pem = cert_pem
