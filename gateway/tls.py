"""Server certificates: a household CA, its leaf, and a TLS context that reloads.

Users of Caddy's internal CA complain that they trusted a short-lived cert and
then "certs expire in days" (caddy#5324, #6467). So the story here is: trust
the CA once (``pvs-gateway certs export-ca``); the CA lives ~10 years and is
never re-issued by this module; the 90-day leaf is renewed underneath it and
picked up by new connections without a restart.

The CA has ``pathlen=0``: it can sign leaves, not further CAs, and its name
says whose it is, so a user reviewing their trust store knows what it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.files import flocked, write_atomic_all
from gateway.settings import ServerSettings, Settings

log = logging.getLogger("gateway.tls")

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
LEAF_CERT = "leaf.pem"
LEAF_KEY = "leaf.key"
# Held while certificates are checked and made, so gateways sharing one cert_dir
# (a cluster, or serve next to `certs renew`) never make two CAs.
LOCK_FILE = ".certs.lock"
LOCK_TIMEOUT = 30.0

CA_DAYS = 3650
# Apple and browsers refuse leaves valid for more than 398 days; 90 keeps renewal routine.
LEAF_DAYS = 90
# Backdate notBefore so a client whose clock runs a little behind still accepts a fresh cert.
BACKDATE = dt.timedelta(hours=1)

# Mozilla "intermediate" TLS 1.2 suites, ECDHE only (no DH params are loaded, and
# forward secrecy without DHE's cost). TLS 1.3 suites are not affected by set_ciphers.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

_DNS_NAME = re.compile(r"(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")

SanSet = frozenset[tuple[str, str]]  # {("dns", "localhost"), ("ip", "127.0.0.1"), ...}


class TLSSetupError(Exception):
    """Certificates cannot be created or loaded; the message (one line, naming the file) says what to do."""


class CertWriteError(TLSSetupError):
    """A certificate or key could not be written (full disk, read-only directory)."""


# Leaf renewals that could not be written, by cert_dir: pvsgw_certificate_renewal_failures_total.
# Kept per directory, not per object, because the TLS object (server) and the metrics (app) are built apart.
_renewal_failures: dict[str, int] = {}


def renewal_failures(cert_dir: Path | str) -> int:
    """How many leaf renewals in ``cert_dir`` failed to be written since this process started."""
    return _renewal_failures.get(str(Path(cert_dir).resolve()), 0)


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    leaf_cert: Path
    leaf_key: Path

    @classmethod
    def in_dir(cls, cert_dir: Path) -> CertPaths:
        d = Path(cert_dir)
        return cls(d / CA_CERT, d / CA_KEY, d / LEAF_CERT, d / LEAF_KEY)


# ---------------------------------------------------------------- names


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san_entry(name: str) -> tuple[str, str]:
    """Normalize one configured name: IP literal -> ("ip", ...), else an A-label DNS name."""
    value = name.strip().strip("[]")
    try:
        return ("ip", str(ipaddress.ip_address(value)))
    except ValueError:
        pass
    value = value.rstrip(".").lower()
    if not value:
        raise TLSSetupError(f"server.hostnames: empty host name in {name!r}")
    try:
        # Certificates carry A-labels; "*" and "_" are not IDNA but are fine as ASCII labels.
        value = ".".join(label if label.isascii() else label.encode("idna").decode("ascii") for label in value.split("."))
    except UnicodeError:
        value = ""
    if not _DNS_NAME.fullmatch(value):
        raise TLSSetupError(f"server.hostnames: {name!r} is not a valid host name or IP address")
    return ("dns", value)


def hostname_problems(hostnames: Iterable[str]) -> list[str]:
    """Every unusable ``server.hostnames`` entry, for ``pvs-gateway check``."""
    problems = []
    for name in hostnames:
        try:
            _san_entry(name)
        except TLSSetupError as exc:
            problems.append(str(exc))
    return problems


def _machine_names() -> list[str]:
    """Local host name, FQDN and non-loopback addresses, found without asking the network.

    ``getaddrinfo(gethostname())`` is answered by /etc/hosts or nss-myhostname on
    a normal LAN box; ``socket.getfqdn`` is avoided because it does a reverse DNS lookup.
    """
    names: list[str] = []
    host = socket.gethostname()
    if not host:
        return names
    names.append(host)
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_CANONNAME)
    except OSError:
        return names
    for family, _, _, canonname, sockaddr in infos:
        if canonname and canonname.lower() != host.lower():
            names.append(canonname)
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        except ValueError:
            continue
        # IPv6 link-local needs a zone in a URL, which a SAN cannot carry; loopback is added anyway.
        if ip.is_loopback or ip.is_unspecified or (ip.version == 6 and ip.is_link_local):
            continue
        names.append(str(ip))
    return names


def wanted_sans(hostnames: Iterable[str]) -> SanSet:
    """The SAN set a leaf should carry for this machine and the configured names."""
    sans = {_san_entry(n) for n in ("localhost", "127.0.0.1", "::1", *hostnames)}
    for name in _machine_names():
        try:
            sans.add(_san_entry(name))
        except TLSSetupError:
            pass  # an odd machine name must not stop the gateway; configured names are strict
    return frozenset(sans)


def leaf_hostnames(server: ServerSettings) -> tuple[str, ...]:
    """Configured names for the leaf: ``server.hostnames`` plus a specific ``server.host``.

    ``serve`` and ``certs renew`` must pass the same list, or they would keep
    re-issuing the leaf for each other's SAN set.
    """
    extra = [] if server.host in ("", "0.0.0.0", "::", "*") else [server.host]
    return tuple(dict.fromkeys([*server.hostnames, *extra]))


def _cert_sans(cert: x509.Certificate) -> SanSet:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    out = {("dns", n.lower()) for n in ext.get_values_for_type(x509.DNSName)}
    out |= {("ip", str(ip)) for ip in ext.get_values_for_type(x509.IPAddress)}
    return frozenset(out)


# ---------------------------------------------------------------- files


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write_pair(cert_path: Path, cert: x509.Certificate, key_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a certificate and its key; on failure neither file is replaced."""
    try:
        # Key first: a reader catching the pair between the two renames gets a mismatch
        # and retries, never a cert whose key is gone.
        write_atomic_all([(key_path, _key_pem(key), 0o600), (cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)])
    except OSError as exc:
        raise CertWriteError(f"cannot write {exc.filename or cert_path}: {exc.strerror or exc}") from None


def _unreadable(path: Path, what: str, exc: BaseException | None) -> TLSSetupError:
    detail = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
    return TLSSetupError(f"{path} is not a readable {what}{detail}")


def _load_cert(path: Path) -> x509.Certificate | None:
    """The certificate in ``path``; None if there is no such file; TLSSetupError naming it if it is damaged."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _unreadable(path, "PEM certificate", exc) from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """The EC private key in ``path``; None if there is no such file; TLSSetupError naming it if it is damaged."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise _unreadable(path, "PEM private key", exc) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise _unreadable(path, "EC private key", None)
    return key


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _ensure_dir(cert_dir: Path) -> None:
    try:
        cert_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # exist_ok: gateways started together
    except OSError as exc:
        raise CertWriteError(f"cannot create {cert_dir}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _cert_dir_lock(cert_dir: Path) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(flocked(cert_dir / LOCK_FILE, timeout=LOCK_TIMEOUT))
        except TimeoutError:
            raise TLSSetupError(f"{cert_dir / LOCK_FILE} is held by another process for over {LOCK_TIMEOUT:.0f} s") from None
        except OSError:
            # Where even the lock file cannot be created, nobody can write certificates
            # either: go on reading; anything that must be written fails on its own.
            pass
        yield


# ---------------------------------------------------------------- issuing


def _short(value: str, limit: int = 64) -> str:
    # X.509 upper bound for CN and O is 64 characters.
    return value if len(value) <= limit else value[: limit - 1] + "~"


def _new_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    host = socket.gethostname() or "localhost"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, _short(f"pvs-gateway local CA ({host})")),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pvs-gateway household CA"),
            # Tells two CAs apart (e.g. after cert_dir was deleted): trust stores such as
            # Firefox's get confused by distinct CAs with identical names.
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"created {now:%Y-%m-%d} id {secrets.token_hex(4)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _new_leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    sans: SanSet,
    primary: str,
    now: dt.datetime,
) -> x509.Certificate:
    general: list[x509.GeneralName] = []
    for kind, value in sorted(sans):
        general.append(x509.DNSName(value) if kind == "dns" else x509.IPAddress(ipaddress.ip_address(value)))
    # Clients match SANs only; the CN is for people reading the certificate.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, _short(primary)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pvs-gateway"),
        ]
    )
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _ensure_ca(paths: CertPaths, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA, made only when neither of its files exists; never replaced (clients trust it)."""
    new_ca = f"delete both {paths.ca_cert.name} and {paths.ca_key.name} to make a new CA (every device must then trust the new one)"
    try:
        ca = _load_cert(paths.ca_cert)
    except TLSSetupError as exc:
        raise TLSSetupError(f"{exc}; restore it from a backup, or {new_ca}") from None
    try:
        key = _load_key(paths.ca_key)
    except TLSSetupError as exc:
        raise TLSSetupError(f"{exc}; restore it from a backup, or {new_ca}") from None
    if ca is not None and key is not None:
        if not _same_key(ca, key):
            raise TLSSetupError(f"{paths.ca_key} does not belong to {paths.ca_cert}; restore the matching key, or {new_ca}")
        return ca, key
    if ca is not None:
        raise TLSSetupError(f"{paths.ca_key} is missing (the key of {paths.ca_cert}); restore it from a backup, or {new_ca}")
    if key is not None:
        # Devices may trust the CA this key belongs to: a new one would silently break them all.
        raise TLSSetupError(
            f"{paths.ca_cert} is missing but its key {paths.ca_key} exists; restore {paths.ca_cert.name} "
            f"(e.g. from `certs export-ca` output saved earlier), or delete {paths.ca_key} to make a new CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    ca = _new_ca(key, now)
    _write_pair(paths.ca_cert, ca, paths.ca_key, key)
    log.info("created local CA %s sha256=%s", ca.subject.rfc4514_string(), _fp(ca))
    return ca, key


def _leaf_problem(
    paths: CertPaths, ca: x509.Certificate, sans: SanSet, renew_days: int, now: dt.datetime
) -> tuple[str | None, bool]:
    """Why the leaf needs re-issuing (None if it is fine), and whether it can still be served meanwhile."""
    try:
        leaf = _load_cert(paths.leaf_cert)
        key = _load_key(paths.leaf_key)
    except TLSSetupError as exc:
        return str(exc), False  # ours to remake: nobody trusts a leaf directly
    if leaf is None or key is None:
        return "missing", False
    if not _same_key(leaf, key):
        return "key does not match", False
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by the current CA", False
    valid = leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc
    if leaf.not_valid_after_utc - now < dt.timedelta(days=renew_days):
        return f"expires {leaf.not_valid_after_utc:%Y-%m-%d}", valid
    if _cert_sans(leaf) != sans:
        return "host names changed", valid
    return None, valid


def _primary_name(hostnames: Sequence[str]) -> str:
    """The first configured DNS name, else this machine's name (only shown in the subject)."""
    for name in hostnames:
        kind, value = _san_entry(name)
        if kind == "dns":
            return value
    return socket.gethostname() or "localhost"


def _issue_leaf(
    paths: CertPaths,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hostnames: Sequence[str],
    now: dt.datetime,
    reason: str,
) -> None:
    sans = wanted_sans(hostnames)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _new_leaf(ca, ca_key, key, sans, _primary_name(hostnames), now)
    _write_pair(paths.leaf_cert, leaf, paths.leaf_key, key)
    names = ", ".join(v for _, v in sorted(sans))
    until = leaf.not_valid_after_utc.isoformat()
    log.info("issued server certificate (%s) sha256=%s for %s, valid until %s", reason, _fp(leaf), names, until)


def ensure_certificates(
    cert_dir: Path, hostnames: Sequence[str], *, renew_days: int = 30, now: dt.datetime | None = None
) -> CertPaths:
    """Create the CA and leaf if needed; re-issue the leaf (never the CA) when due.

    A due renewal that cannot be written (full disk, read-only directory) leaves
    a still-valid leaf in service: a warning, ``renewal_failures`` + 1, and the
    next check tries again. Without a valid leaf it raises ``CertWriteError``.
    """
    now = now or _utcnow()
    cert_dir = Path(cert_dir)
    _ensure_dir(cert_dir)
    paths = CertPaths.in_dir(cert_dir)
    with _cert_dir_lock(cert_dir):
        ca, ca_key = _ensure_ca(paths, now)
        reason, servable = _leaf_problem(paths, ca, wanted_sans(hostnames), renew_days, now)
        if reason is None:
            return paths
        try:
            _issue_leaf(paths, ca, ca_key, hostnames, now, reason)
        except CertWriteError as exc:
            if not servable:
                raise
            key = str(cert_dir.resolve())
            _renewal_failures[key] = _renewal_failures.get(key, 0) + 1
            log.warning("could not renew the server certificate (%s): %s; still serving the current one", reason, exc)
    return paths


def renew_leaf(cert_dir: Path, hostnames: Sequence[str], *, now: dt.datetime | None = None) -> CertPaths:
    """Issue a new leaf now, under the existing CA (created if there is none)."""
    now = now or _utcnow()
    cert_dir = Path(cert_dir)
    _ensure_dir(cert_dir)
    paths = CertPaths.in_dir(cert_dir)
    with _cert_dir_lock(cert_dir):
        ca, ca_key = _ensure_ca(paths, now)
        _issue_leaf(paths, ca, ca_key, hostnames, now, "renewed on request")
    return paths


def check_cert_dir(cert_dir: Path) -> list[str]:
    """What ``pvs-gateway check`` reports about the CA in ``cert_dir``, without changing anything.

    The same rules ``ensure_certificates`` applies: a damaged or lone CA file, or
    a key that does not belong to the certificate, stops ``serve``. Missing both
    is fine (``serve`` makes them); a damaged leaf is fine too (it is remade).
    """
    paths = CertPaths.in_dir(Path(cert_dir))
    if not paths.ca_cert.exists() and not paths.ca_key.exists():
        return []
    try:
        _ensure_ca(paths, _utcnow())  # both files present or an error: never writes
    except TLSSetupError as exc:
        return [str(exc)]
    return []


# ---------------------------------------------------------------- inspection


def _fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def fingerprint(cert_pem_path: Path | str) -> str:
    """SHA-256 of the (first) certificate in a PEM file, as colon-separated hex."""
    return _fp(x509.load_pem_x509_certificate(Path(cert_pem_path).read_bytes()))


def leaf_fingerprint(cert_dir: Path | str) -> str:
    return fingerprint(Path(cert_dir) / LEAF_CERT)


def describe_certificate(cert_pem_path: Path | str, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """What ``certs show`` prints about one certificate (also usable for tls = "files")."""
    now = now or _utcnow()
    cert = x509.load_pem_x509_certificate(Path(cert_pem_path).read_bytes())
    sans = sorted(_cert_sans(cert))
    return {
        "path": str(cert_pem_path),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sha256": _fp(cert),
        "sans": [v for _, v in sans],
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": (cert.not_valid_after_utc - now).days,
    }


def describe(cert_dir: Path | str, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """``{"ca": {...} | None, "leaf": {...} | None}`` for ``pvs-gateway certs show``."""
    paths = CertPaths.in_dir(Path(cert_dir))
    out: dict[str, Any] = {"cert_dir": str(cert_dir)}
    for label, path in (("ca", paths.ca_cert), ("leaf", paths.leaf_cert)):
        out[label] = describe_certificate(path, now=now) if _load_cert(path) is not None else None
    return out


def export_ca(cert_dir: Path | str) -> str:
    """The CA certificate (PEM) that clients should trust."""
    path = Path(cert_dir) / CA_CERT
    cert = _load_cert(path)
    if cert is None:
        raise TLSSetupError(f"no CA certificate at {path} yet; run `pvs-gateway certs renew` or start the gateway once")
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


# ---------------------------------------------------------------- serving


def _restrict_groups(ctx: ssl.SSLContext) -> None:
    """Offer only Mozilla "intermediate" key-exchange groups.

    OpenSSL's default list adds X448 and P-521, which the profile excludes.
    Python before 3.15 can set only one group (``set_ecdh_curve``), and
    reaching libssl through ctypes to set a list is not something a security
    gateway should do, so P-256 alone: compliant and universally supported;
    clients that lead with an X25519 key share pay one extra round trip.
    """
    ctx.set_ecdh_curve("prime256v1")


def server_ssl_context(cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    """A server context on Mozilla's "intermediate" profile (TLS 1.2+)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    _restrict_groups(ctx)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Intermediate profile: every offered suite is strong, so let the client pick
    # (phones prefer ChaCha20 without AES hardware).
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    for path in (cert_file, key_file):  # OpenSSL's own error would not say which file
        try:
            Path(path).open("rb").close()
        except OSError as exc:
            raise TLSSetupError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:  # damaged, or key and certificate differ
        reason = getattr(exc, "reason", None) or exc
        raise TLSSetupError(f"cannot use {cert_file} with {key_file}: {reason}") from None
    return ctx


def _stat_signature(*paths: Path) -> tuple[tuple[int, int, int], ...] | None:
    try:
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in (p.stat() for p in paths))
    except OSError:
        return None


class ReloadingServerTLS:
    """Owns the ``SSLContext`` given to uvicorn and swaps certificates under it.

    Why not ``load_cert_chain`` again on the live context: if the new cert and
    key do not match (caught between two renames, or a bad copy), OpenSSL has
    already dropped the old key and every later handshake fails. Instead a fresh
    context is built and fully loaded first; the live context's ``sni_callback``
    (which OpenSSL calls on every handshake, with or without SNI) moves each new
    connection onto it with ``ssl_obj.context = new``. Open connections keep
    their certificate. Both contexts come from ``server_ssl_context``, so the
    protocol settings (kept from the original context) are the same.
    """

    def __init__(
        self,
        cert_file: Path | str,
        key_file: Path | str,
        *,
        cert_dir: Path | str | None = None,
        hostnames: Sequence[str] = (),
        renew_days: int = 30,
        renew_check_interval: float = 3600.0,
    ) -> None:
        """``cert_dir`` set means self-signed: ``ensure_certificates`` runs now and periodically."""
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.cert_dir = Path(cert_dir) if cert_dir is not None else None
        self.hostnames = tuple(hostnames)
        self.renew_days = renew_days
        self.renew_check_interval = renew_check_interval
        self._lock = threading.Lock()  # watch() runs reloads in a worker thread
        self._last_renew_check = float("-inf")
        self._failed_signature: object = None
        if self.cert_dir is not None:
            self._renew_check()
        self._signature = _stat_signature(self.cert_file, self.key_file)
        self.context = server_ssl_context(self.cert_file, self.key_file)
        self._current = self.context
        self.fingerprint = fingerprint(self.cert_file)
        self.context.sni_callback = self._select_context
        log.info("TLS certificate loaded sha256=%s", self.fingerprint)

    @classmethod
    def from_settings(cls, settings: Settings) -> ReloadingServerTLS:
        """For ``server.tls`` = "self-signed" or "files" (the caller handles "off")."""
        server = settings.server
        if server.tls == "self-signed":
            paths = CertPaths.in_dir(settings.path(server.cert_dir))
            return cls(
                paths.leaf_cert,
                paths.leaf_key,
                cert_dir=settings.path(server.cert_dir),
                hostnames=leaf_hostnames(server),
                renew_days=server.cert_renew_days,
            )
        if server.tls == "files":
            return cls(settings.path(server.cert_file), settings.path(server.key_file))
        raise ValueError(f"server.tls = {server.tls!r} has no certificate to serve")

    @property
    def ca_file(self) -> Path | None:
        """The CA clients should trust (self-signed mode only)."""
        return self.cert_dir / CA_CERT if self.cert_dir is not None else None

    def _select_context(self, ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._current  # one attribute read: a reload in another thread cannot tear it
        if current is not ctx:
            ssl_obj.context = current
        return None

    def _renew_check(self) -> None:
        assert self.cert_dir is not None
        ensure_certificates(self.cert_dir, self.hostnames, renew_days=self.renew_days)
        self._last_renew_check = time.monotonic()

    def reload_if_changed(self) -> bool:
        """Renew a due self-signed leaf, then load the cert/key files if they changed.

        Returns True when new connections now get a different certificate. A
        pair that fails to load leaves the current one serving (and is retried
        when the files change again).
        """
        with self._lock:
            if self.cert_dir is not None and time.monotonic() - self._last_renew_check >= self.renew_check_interval:
                try:
                    self._renew_check()
                except (OSError, TLSSetupError) as exc:
                    self._last_renew_check = time.monotonic()  # once per interval, not every few seconds
                    log.error("cannot renew the server certificate: %s (still serving sha256=%s)", exc, self.fingerprint)
            signature = _stat_signature(self.cert_file, self.key_file)
            if signature is None or signature == self._signature or signature == self._failed_signature:
                return False
            try:
                new = server_ssl_context(self.cert_file, self.key_file)
                new_fp = fingerprint(self.cert_file)
            except (OSError, ssl.SSLError, ValueError, TLSSetupError) as exc:
                self._failed_signature = signature
                log.warning(
                    "not reloading TLS certificate %s: %s (still serving sha256=%s)", self.cert_file, exc, self.fingerprint
                )
                return False
            self._current = new
            self._signature = signature
            self._failed_signature = None
            changed = new_fp != self.fingerprint
            self.fingerprint = new_fp
            log.info("TLS certificate reloaded sha256=%s", new_fp)
            return changed

    def force_renew_check(self) -> bool:
        """Run the self-signed renewal check now, then reload."""
        self._last_renew_check = float("-inf")
        return self.reload_if_changed()

    def reload(self) -> bool:
        """For SIGHUP: renew if due, re-read the certificate files, swap the context in place.

        Synchronous, and never raises: a problem is one log line naming the file,
        and the certificate served so far stays in service. True when new
        connections now get a different certificate.
        """
        with self._lock:
            self._failed_signature = None  # a pair that failed before is worth one more try
        try:
            return self.force_renew_check()
        except Exception as exc:
            log.error("TLS reload of %s failed: %s (still serving sha256=%s)", self.cert_file, exc, self.fingerprint)
            return False

    async def watch(self, interval: float = 5.0) -> None:
        """Reload forever; run as a background task. File I/O and key generation go to a thread."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except Exception:  # a watcher that dies silently would let the cert expire
                log.exception("TLS certificate reload failed")
