"""Trust in the PVS's certificate: pin on first use, a CA file, or (loudly) nothing.

The LocalAPI PVS serves HTTPS with a self-signed certificate, so chain and host
name checks can only fail; yet the gateway sends the PVS password at login. In
"pin" mode the first certificate seen is recorded and every later TLS
connection presenting another one is closed right after the handshake, before
httpcore writes a single request byte. The check sits in an httpcore network
backend wrapper because that is the one place between "handshake done" and
"request written" that httpx lets us reach.

Problems with the pin file are logged with its path; what a client sees (the
502's problem details) names no server path.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import json
import logging
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpcore
import httpx
from cryptography import x509

from gateway.errors import UpstreamTLSError
from gateway.files import write_atomic

log = logging.getLogger("gateway.pinning")

TRUST_COMMAND = "pvs-gateway certs trust-pvs"
# Suggested name inside server.cert_dir (certs/README.md: "the pinned PVS certificate" lives there).
PIN_FILE = "pvs-pin.json"
MODES = ("pin", "ca", "off")


class PinMismatchError(UpstreamTLSError):
    """The PVS presented a certificate other than the pinned one; nothing was sent."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(
            "The PVS presented a TLS certificate different from the pinned one, so the gateway "
            f"did not talk to it. If the PVS certificate changed legitimately, an admin runs `{TRUST_COMMAND}`."
        )
        self.expected = expected
        self.got = got


def cert_fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as colon-separated upper-case hex (as ``openssl x509 -fingerprint``)."""
    return hashlib.sha256(der).digest().hex(":").upper()


def _normalize(fp: str) -> str:
    """Compare fingerprints regardless of colons, case or a ``sha256=`` prefix (hand-edited files)."""
    fp = fp.strip().lower().removeprefix("sha256=").removeprefix("sha256:")
    return "".join(ch for ch in fp if ch in "0123456789abcdef")


def _subject(der: bytes) -> str:
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return "(unparseable certificate)"


# ---------------------------------------------------------------- pin file


class PinFileError(Exception):
    """The pin file exists but cannot be used; the message names it (for logs and the CLI only)."""


# What a caller is told when the pin file is the problem: no server path (it goes to the log).
PIN_UNUSABLE = (
    "The gateway cannot use its stored PVS certificate pin, so it did not talk to the PVS. "
    f"The gateway's log says why; an admin fixes the file or runs `{TRUST_COMMAND}`."
)


def read_pin(pin_file: Path) -> dict[str, Any] | None:
    """The stored pin, or None if there is none yet. A damaged file raises ``PinFileError`` (fail closed)."""
    try:
        data = json.loads(Path(pin_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise PinFileError(f"cannot read the PVS certificate pin {pin_file}: {reason}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str) or len(_normalize(data["sha256"])) != 64:
        raise PinFileError(f"the PVS certificate pin {pin_file} has no valid sha256")
    return data


def write_pin(pin_file: Path, der: bytes, url: str) -> dict[str, Any]:
    """Record ``der`` as the trusted PVS certificate (atomic, mode 0600)."""
    pin_file = Path(pin_file)
    data = {
        "sha256": cert_fingerprint(der),
        "first_seen": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "subject": _subject(der),
        "url": url,
    }
    write_atomic(pin_file, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    return data


def _signature(path: Path) -> object:
    """Which version of the file is there: "missing", (inode, mtime, size), or ("error", errno)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return ("error", exc.errno)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class _Pinner:
    """Checks one handshake's certificate against the pin.

    The pin file is read again whenever it changes (checked on every new
    connection, and on ``reload``), so `certs trust-pvs` run in another process
    takes effect without a restart. A file that becomes unusable is logged once
    and the pin loaded before stays in force; with none loaded, nothing is sent.
    """

    def __init__(self, pin_file: Path, url: str) -> None:
        self.pin_file = Path(pin_file)
        self.url = url
        self._reported: set[tuple[str, str]] = set()
        self._pin: str | None = None  # the fingerprint in force, as stored
        self._loaded: object = None  # _signature of the file version _pin came from
        self._bad: object = None  # _signature of a version that could not be used (logged once)

    def reload(self, *, force: bool = False) -> None:
        """Re-read the pin file if it changed (always, with ``force``). Never raises."""
        signature = _signature(self.pin_file)
        if not force and signature in (self._loaded, self._bad):
            return
        try:
            data = read_pin(self.pin_file) if signature != "missing" else None
        except PinFileError as exc:
            if force or signature != self._bad:
                keep = f"still trusting the pin loaded before, sha256={self._pin}" if self._pin else "nothing is sent to the PVS"
                log.error("%s (%s); fix it or run `%s`", exc, keep, TRUST_COMMAND)
            self._bad = signature
            return
        if data is None:
            if self._pin is not None:
                log.warning("the PVS certificate pin %s is gone: the next certificate seen will be pinned", self.pin_file)
            self._pin = None
        else:
            self._pin = str(data["sha256"])
        self._loaded, self._bad = signature, None

    def check(self, der: bytes | None) -> None:
        if not der:
            raise UpstreamTLSError("the PVS presented no TLS certificate")
        self.reload()
        got = cert_fingerprint(der)
        if self._pin is None:
            if self._bad is not None:
                raise UpstreamTLSError(PIN_UNUSABLE)  # damaged, and no pin loaded before: fail closed
            try:
                write_pin(self.pin_file, der, self.url)
            except OSError as exc:
                # Without a stored pin, the next start would trust whatever it meets.
                log.error("cannot store the PVS certificate pin %s: %s; nothing is sent to the PVS", self.pin_file, exc.strerror or exc)
                raise UpstreamTLSError(PIN_UNUSABLE) from None
            self._pin, self._loaded = got, _signature(self.pin_file)
            log.warning(
                "pinned PVS certificate sha256=%s (%s), trusted on first use; stored in %s", got, _subject(der), self.pin_file
            )
            return
        if _normalize(self._pin) == _normalize(got):
            return
        expected = self._pin
        key = (_normalize(expected), _normalize(got))
        if key not in self._reported:  # once per presented certificate, not per request
            self._reported.add(key)
            log.error(
                "PVS certificate changed: pinned sha256=%s, presented sha256=%s (%s). Refusing to send anything to it. "
                "If the PVS was replaced or re-keyed, run `%s` to trust the new certificate.",
                expected,
                got,
                _subject(der),
                TRUST_COMMAND,
            )
        raise PinMismatchError(expected, got)


# ---------------------------------------------------------------- httpcore seam

_Check = Callable[[bytes | None], None]  # raises to refuse the peer's certificate (DER)

# Bytes the PVS has sent for the request this task has in flight (set by PinningTransport,
# counted by _CheckedStream.read): none means it closed without answering at all.
_received: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("pvs_bytes_received", default=None)


class ClosedWithoutAnswer(httpx.RemoteProtocolError):
    """The PVS closed the connection before sending a byte of its answer (its web server going
    down, a reboot), as against an answer cut short or malformed."""


class _CheckedStream(httpcore.AsyncNetworkStream):
    """Delegates to the real stream; ``start_tls`` runs the certificate check before returning;
    ``read`` counts what the PVS sends for the request in flight (``_received``)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, check: _Check | None, bound: Callable[[float | None], float]) -> None:
        self._inner = inner
        self._check = check
        self._bound = bound

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._inner.read(max_bytes, timeout)
        counter = _received.get()
        if counter is not None:
            counter[0] += len(data)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, self._bound(timeout))
        if self._check is not None:
            ssl_object = tls.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(True) if ssl_object is not None else None
            try:
                self._check(der)
            except BaseException:
                await tls.aclose()  # no close_notify dance, no request: just drop the socket
                raise
        return _CheckedStream(tls, None, self._bound)  # still counting what the PVS sends


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend, check: _Check | None, connect_timeout: float) -> None:
        self._inner = inner
        self._check = check
        self._connect_timeout = connect_timeout

    def _bound(self, timeout: float | None) -> float:
        # The PVS is on the LAN: a connect or handshake slower than this means it is down,
        # whatever overall timeout the request carries.
        return self._connect_timeout if timeout is None else min(timeout, self._connect_timeout)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, self._bound(timeout), local_address, socket_options)
        return _CheckedStream(stream, self._check, self._bound)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, self._bound(timeout), socket_options)
        return _CheckedStream(stream, self._check, self._bound)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# ---------------------------------------------------------------- contexts and transport


def unverified_context() -> ssl.SSLContext:
    """Client context that accepts any certificate: the pin (or nothing, in "off") replaces the chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def ca_context(ca_file: str | Path) -> ssl.SSLContext:
    """Full verification (chain and host name) against the given CA file only."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:  # raised at start, never to a client
        reason = exc.strerror or getattr(exc, "reason", None) or exc
        raise UpstreamTLSError(f"upstream.ca_file: cannot load {ca_file}: {reason}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# httpcore's errors as httpx's (the classes upstream.map_transport_error reads), most specific first.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def _as_httpx(exc: Exception, request: httpx.Request) -> Exception:
    for core, mapped in _ERRORS:
        if isinstance(exc, core):
            error = mapped(str(exc), request=request)
            error.__cause__ = exc
            return error
    return exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Any, request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> Any:
        try:
            async for chunk in self._stream:
                yield chunk
        except Exception as exc:
            raise _as_httpx(exc, self._request) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class PinningTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore connection pool whose network backend checks the
    PVS's certificate (``_CheckedBackend``), plus ``reload_pin`` for SIGHUP.

    httpx's own ``AsyncHTTPTransport`` has no public way to take a network backend, so this
    is the same bridge built on httpcore's public API: requests and answers converted, and
    httpcore's errors raised as httpx's. One more class than httpx has: a connection the PVS
    closed before sending a byte (``ClosedWithoutAnswer``, counted by the backend's streams),
    which httpcore reports as the same protocol error as a broken answer.
    """

    def __init__(self, pool: httpcore.AsyncConnectionPool, pinner: _Pinner | None) -> None:
        self.pool = pool
        self.pinner = pinner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = httpcore.Request(
            method=request.method.encode("ascii"),
            url=httpcore.URL(
                scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        received = [0]
        token = _received.set(received)
        try:
            answer = await self.pool.handle_async_request(core)
        except httpcore.RemoteProtocolError as exc:
            if received[0] == 0:
                raise ClosedWithoutAnswer(str(exc), request=request) from exc
            raise _as_httpx(exc, request) from exc
        except Exception as exc:
            raise _as_httpx(exc, request) from exc
        finally:
            _received.reset(token)
        return httpx.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=_Body(answer.stream, request),
            extensions=answer.extensions,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()

    def reload_pin(self) -> None:
        """Re-read the pin file now. Synchronous, never raises: a problem is one log line
        naming the file, and the pin loaded before stays in force."""
        if self.pinner is not None:
            self.pinner.reload(force=True)


def make_transport(
    url: str,
    *,
    mode: str,
    pin_file: Path,
    ca_file: str = "",
    connect_timeout: float,
    limits: httpx.Limits | None = None,
) -> PinningTransport:
    """The httpx transport for talking to the PVS at ``url`` under ``mode`` ("pin" | "ca" | "off")."""
    if mode not in MODES:
        raise ValueError(f"upstream.verify_tls must be one of {MODES} (got {mode!r})")
    limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own default
    https = urllib.parse.urlsplit(url).scheme == "https"
    check: _Check | None = None
    pinner: _Pinner | None = None
    if not https:
        ssl_context = unverified_context()  # never used: http:// has no handshake
    elif mode == "pin":
        ssl_context = unverified_context()
        pinner = _Pinner(pin_file, url)
        check = pinner.check
    elif mode == "ca":
        ssl_context = ca_context(ca_file)
    else:
        ssl_context = unverified_context()
        log.warning(
            "upstream.verify_tls = \"off\": the PVS certificate is not checked; anyone on the path can read the PVS password"
        )

    pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        network_backend=_CheckedBackend(httpcore.AnyIOBackend(), check, connect_timeout),
    )
    transport = PinningTransport(pool, pinner)
    return transport


# ---------------------------------------------------------------- CLI helpers


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"upstream.url must be an https:// URL to have a certificate (got {url!r})")
    return parts.hostname, parts.port or 443


def _fetch_der(url: str, timeout: float) -> bytes:
    host, port = _host_port(url)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with unverified_context().wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(True)
    if not der:
        raise UpstreamTLSError(f"{url} presented no TLS certificate")
    return der


def fetch_certificate(url: str, *, timeout: float = 10.0) -> tuple[str, str]:
    """Connect to the PVS and return ``(sha256 fingerprint, PEM)`` of the certificate it presents."""
    der = _fetch_der(url, timeout)
    return cert_fingerprint(der), ssl.DER_cert_to_PEM_cert(der)


def accept_current(url: str, pin_file: Path, *, timeout: float = 10.0) -> str:
    """Pin whatever certificate the PVS presents now (``certs trust-pvs``); returns its fingerprint."""
    try:
        old = read_pin(pin_file)
    except PinFileError:
        old = None  # a damaged pin file is exactly what this command repairs
    der = _fetch_der(url, timeout)
    fp = write_pin(pin_file, der, url)["sha256"]
    old_fp = old["sha256"] if old else "(none)"
    log.warning("re-pinned PVS certificate: old sha256=%s, new sha256=%s (%s)", old_fp, fp, pin_file)
    return fp

