"""Trust in the PVS certificate: pin on first use, CA file, off.

A fake PVS (real TLS on 127.0.0.1) records every byte each connection
receives, so "refused before any request bytes" is observed on the server side.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import socket
import ssl
import stat
import time
from pathlib import Path

import httpcore
import httpx
import pytest

from gateway import pinning, tls
from gateway.errors import UpstreamTLSError
from gateway.simulator.tlscert import make_self_signed
from tests.threaded_server import serve_in_thread


def self_signed(directory: Path, cn: str) -> tuple[Path, Path, str]:
    """A PVS-like self-signed certificate (the simulator's kind); returns (cert, key, its sha256 fingerprint)."""
    cert_pem, key_pem = make_self_signed(cn, [])
    cert_path, key_path = directory / f"{cn}.pem", directory / f"{cn}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path, tls.fingerprint(cert_path)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


class FakePVS:
    """HTTPS (or HTTP) server whose certificate can be swapped; records bytes per connection."""

    def __init__(self, ctx: ssl.SSLContext | None) -> None:
        self.base = ctx
        self.current = ctx
        self.handshakes = 0
        self.received: list[bytearray] = []
        self.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        if ctx is not None:
            ctx.sni_callback = self._sni

    def _sni(self, ssl_obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.handshakes += 1
        if self.current is not ctx:
            ssl_obj.context = self.current

    def use(self, cert: Path, key: Path) -> None:
        self.current = server_context(cert, key)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.received.append(buf)
        try:
            while b"\r\n\r\n" not in buf:
                chunk = await asyncio.wait_for(reader.read(4096), 5)
                if not chunk:
                    return
                buf += chunk
            writer.write(self.answer)
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    def all_bytes_since(self, index: int) -> bytes:
        return b"".join(bytes(b) for b in self.received[index:])


def running(pvs: FakePVS) -> contextlib.AbstractContextManager[int]:
    return serve_in_thread(pvs.handle, pvs.base)


def get(transport: httpx.AsyncBaseTransport, url: str, times: int = 1) -> list[httpx.Response | BaseException]:
    """``times`` sequential GETs through one transport (one client), results or exceptions."""

    async def main() -> list[httpx.Response | BaseException]:
        out: list[httpx.Response | BaseException] = []
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            for _ in range(times):
                try:
                    out.append(await client.get(url + "/cgi-bin/dl_cgi?Command=DeviceList"))
                except Exception as exc:
                    out.append(exc)
        return out

    return asyncio.run(main())


Certs = dict[str, tuple[Path, Path, str]]


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return {"a": self_signed(tmp_path, "pvs-a"), "b": self_signed(tmp_path, "pvs-b")}


def pin_transport(url: str, pin_file: Path, **kw: object) -> httpx.AsyncBaseTransport:
    return pinning.make_transport(url, mode="pin", pin_file=pin_file, connect_timeout=5, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- pin mode


def test_first_use_pins_and_same_certificate_is_accepted(tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.pinning")
    cert_a, key_a, fp_a = certs["a"]
    pin_file = tmp_path / "state" / "pvs-pin.json"
    pvs = FakePVS(server_context(cert_a, key_a))
    with running(pvs) as port:
        url = f"https://127.0.0.1:{port}"
        (first,) = get(pin_transport(url, pin_file), url)
        assert isinstance(first, httpx.Response) and first.text == "ok"
        pin = json.loads(pin_file.read_text())
        assert pin["sha256"] == fp_a
        assert pin["subject"] == "CN=pvs-a" and pin["url"] == url
        dt.datetime.fromisoformat(pin["first_seen"])
        assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
        assert f"pinned PVS certificate sha256={fp_a}" in caplog.text

        # A later run (new transport, same pin file): accepted, pin untouched.
        results = get(pin_transport(url, pin_file), url, times=2)
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
        assert json.loads(pin_file.read_text()) == pin
    assert pvs.all_bytes_since(0).count(b"GET /cgi-bin/dl_cgi?Command=DeviceList") == 3


def test_changed_certificate_is_refused_before_any_request_byte(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.pinning")
    (cert_a, key_a, fp_a), (cert_b, key_b, fp_b) = certs["a"], certs["b"]
    pin_file = tmp_path / "pin.json"
    pvs = FakePVS(server_context(cert_a, key_a))
    with running(pvs) as port:
        url = f"https://127.0.0.1:{port}"
        transport = pin_transport(url, pin_file)

        async def scenario() -> tuple[list[object], int, int]:
            async with httpx.AsyncClient(transport=transport, timeout=5) as client:
                ok = await client.get(url + "/")
                assert ok.status_code == 200
                pvs.use(cert_b, key_b)  # the "PVS" now presents another certificate
                mark, handshakes = len(pvs.received), pvs.handshakes
                errors: list[object] = []
                for _ in range(3):
                    try:
                        await client.get(url + "/auth?login", headers={"Authorization": "Basic c2VjcmV0"})
                    except Exception as exc:
                        errors.append(exc)
                return errors, mark, handshakes

        errors, mark, handshakes = asyncio.run(scenario())
        assert len(errors) == 3
        for exc in errors:
            assert isinstance(exc, pinning.PinMismatchError) and isinstance(exc, UpstreamTLSError)
            assert (exc.expected, exc.got) == (fp_a, fp_b)
            assert "pvs-gateway certs trust-pvs" in exc.detail
        assert pvs.handshakes >= handshakes + 3  # the handshakes really happened...
        deadline = time.monotonic() + 2
        while len(pvs.received) < mark + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pvs.all_bytes_since(mark) == b""  # ...and not one request byte followed them
        assert json.loads(pin_file.read_text())["sha256"] == fp_a  # the pin is not overwritten

        # Control: the same server does record bytes from a client that does not check.
        mark = len(pvs.received)
        (resp,) = get(pinning.make_transport(url, mode="off", pin_file=pin_file, connect_timeout=5), url)
        assert isinstance(resp, httpx.Response)
        assert b"GET /cgi-bin/dl_cgi" in pvs.all_bytes_since(mark)

    mismatch_logs = [r for r in caplog.records if r.name == "gateway.pinning" and r.levelno >= logging.ERROR]
    assert len(mismatch_logs) == 1  # once per presented certificate, not per request
    message = mismatch_logs[0].getMessage()
    assert fp_a in message and fp_b in message and "pvs-gateway certs trust-pvs" in message


def test_accept_current_repins_and_the_running_transport_follows(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.pinning")
    (cert_a, key_a, fp_a), (cert_b, key_b, fp_b) = certs["a"], certs["b"]
    pin_file = tmp_path / "pin.json"
    pvs = FakePVS(server_context(cert_a, key_a))
    with running(pvs) as port:
        url = f"https://127.0.0.1:{port}"
        transport = pin_transport(url, pin_file)
        assert isinstance(get(transport, url)[0], httpx.Response)
        pvs.use(cert_b, key_b)
        transport = pin_transport(url, pin_file)
        assert isinstance(get(transport, url)[0], pinning.PinMismatchError)

        assert pinning.fetch_certificate(url) == (fp_b, ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(cert_b.read_text())))
        assert pinning.accept_current(url, pin_file) == fp_b
        assert json.loads(pin_file.read_text())["sha256"] == fp_b
        assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
        assert f"old sha256={fp_a}, new sha256={fp_b}" in caplog.text
        # Same transport, no restart: the pin file is read on each new connection.
        (resp,) = get(transport, url)
        assert isinstance(resp, httpx.Response) and resp.text == "ok"


def test_damaged_pin_file_fails_closed(tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    cert_a, key_a, fp_a = certs["a"]
    pin_file = tmp_path / "pin.json"
    pin_file.write_text("{not json")
    pvs = FakePVS(server_context(cert_a, key_a))
    with running(pvs) as port:
        url = f"https://127.0.0.1:{port}"
        with caplog.at_level(logging.ERROR, logger="gateway.pinning"):
            results = get(pin_transport(url, pin_file), url, times=3)
        assert all(isinstance(r, UpstreamTLSError) for r in results), results
        time.sleep(0.05)
        assert pvs.all_bytes_since(0) == b""
        assert pin_file.read_text() == "{not json"  # never re-pinned on first use over a damaged file
        # The caller (a 502's problem details) is told what to do, never where the file is;
        # the log says where, once however many requests failed.
        detail = results[0].detail  # type: ignore[union-attr]
        assert str(tmp_path) not in detail and "pin.json" not in detail and "pvs-gateway certs trust-pvs" in detail
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == 1 and str(pin_file) in logged[0] and "\n" not in logged[0]
        assert pinning.accept_current(url, pin_file) == fp_a  # the repair command works on it


def test_unwritable_pin_names_no_path_to_the_caller(tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    cert_a, key_a, _ = certs["a"]
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    pin_file = blocker / "pin.json"  # its directory cannot exist: the first-use pin cannot be stored
    pvs = FakePVS(server_context(cert_a, key_a))
    with running(pvs) as port, caplog.at_level(logging.ERROR, logger="gateway.pinning"):
        url = f"https://127.0.0.1:{port}"
        (result,) = get(pin_transport(url, pin_file), url)
        assert isinstance(result, UpstreamTLSError)
        assert str(tmp_path) not in result.detail and "not-a-dir" not in result.detail
        assert pvs.all_bytes_since(0) == b""
    assert str(pin_file) in caplog.text


def test_reload_pin_rereads_never_raises_and_keeps_the_old_pin(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    (cert_a, key_a, fp_a), (_, _, fp_b) = certs["a"], certs["b"]
    pin_file = tmp_path / "pin.json"
    pvs = FakePVS(server_context(cert_a, key_a))
    with running(pvs) as port:
        url = f"https://127.0.0.1:{port}"
        transport = pin_transport(url, pin_file)
        assert isinstance(transport, pinning.PinningTransport)
        assert isinstance(get(transport, url)[0], httpx.Response)  # pinned a on first use
        original = pin_file.read_text()

        pin_file.write_text("{damaged")  # e.g. a bad hand edit, then SIGHUP
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway.pinning"):
            transport.reload_pin()
        (line,) = [r.getMessage() for r in caplog.records]
        assert str(pin_file) in line and f"still trusting the pin loaded before, sha256={fp_a}" in line
        assert isinstance(get(transport, url)[0], httpx.Response)  # the old pin stays in force

        pin_file.write_text(original.replace(fp_a, fp_b))  # a pin for another certificate
        transport.reload_pin()
        (refused,) = get(transport, url)
        assert isinstance(refused, pinning.PinMismatchError) and refused.expected == fp_b

        pin_file.unlink()
        pin_file.mkdir()  # unreadable in another way: still no exception out of reload_pin
        transport.reload_pin()
    pinning.make_transport("http://127.0.0.1:1", mode="pin", pin_file=pin_file, connect_timeout=1).reload_pin()  # no pinner: no-op


def test_pin_mode_enforces_its_own_connect_timeout(tmp_path: Path) -> None:
    """A PVS that accepts TCP but never finishes the handshake fails fast, whatever the request timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    transport = pinning.make_transport(url, mode="pin", pin_file=tmp_path / "pin.json", connect_timeout=0.3)

    async def main() -> float:
        start = time.monotonic()
        async with httpx.AsyncClient(transport=transport, timeout=30) as client:
            with pytest.raises(httpx.ConnectTimeout):
                await client.get(url)
        return time.monotonic() - start

    try:
        assert asyncio.run(main()) < 3
    finally:
        listener.close()
    assert not (tmp_path / "pin.json").exists()


def test_transport_installs_the_checking_backend(tmp_path: Path) -> None:
    """The transport is httpcore's public pool with the certificate-checking backend."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=7)
    url = "https://127.0.0.1:1"
    transport = pinning.make_transport(url, mode="pin", pin_file=tmp_path / "p", connect_timeout=1, limits=limits)
    assert isinstance(transport, pinning.PinningTransport)
    assert isinstance(transport.pool, httpcore.AsyncConnectionPool)
    with pytest.raises(ValueError):
        pinning.make_transport("https://127.0.0.1:1", mode="trust-me", pin_file=tmp_path / "p", connect_timeout=1)


# ---------------------------------------------------------------- ca and off modes, plain http


def test_ca_mode_verifies_against_the_ca_file(tmp_path: Path, certs: Certs) -> None:
    issued = tls.ensure_certificates(tmp_path / "pvs-ca", ())  # a CA-signed PVS cert with IP SAN 127.0.0.1
    other = tls.ensure_certificates(tmp_path / "other-ca", ())
    pvs = FakePVS(server_context(issued.leaf_cert, issued.leaf_key))
    with running(pvs) as port:
        url = f"https://127.0.0.1:{port}"

        def through(ca: Path) -> httpx.Response | BaseException:
            transport = pinning.make_transport(url, mode="ca", pin_file=tmp_path / "unused", ca_file=str(ca), connect_timeout=5)
            return get(transport, url)[0]

        ok = through(issued.ca_cert)
        assert isinstance(ok, httpx.Response) and ok.text == "ok"
        mark = len(pvs.received)
        bad = through(other.ca_cert)
        assert isinstance(bad, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(bad)
        time.sleep(0.05)
        assert pvs.all_bytes_since(mark) == b""
    assert not (tmp_path / "unused").exists()


def test_off_mode_accepts_anything_and_warns_once(tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.pinning")
    (cert_a, key_a, _), (cert_b, key_b, _) = certs["a"], certs["b"]
    pvs = FakePVS(server_context(cert_a, key_a))
    with running(pvs) as port:
        url = f"https://127.0.0.1:{port}"
        transport = pinning.make_transport(url, mode="off", pin_file=tmp_path / "pin.json", connect_timeout=5)
        first = get(transport, url)[0]
        pvs.use(cert_b, key_b)
        second = get(transport, url)[0]
    assert isinstance(first, httpx.Response) and isinstance(second, httpx.Response)
    assert not (tmp_path / "pin.json").exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not checked" in r.getMessage()]
    assert len(warnings) == 1


def test_plain_http_url_gets_a_normal_transport(tmp_path: Path) -> None:
    pvs = FakePVS(None)
    with running(pvs) as port:
        url = f"http://127.0.0.1:{port}"
        (resp,) = get(pinning.make_transport(url, mode="pin", pin_file=tmp_path / "pin.json", connect_timeout=5), url)
    assert isinstance(resp, httpx.Response) and resp.text == "ok"
    assert not (tmp_path / "pin.json").exists()
    with pytest.raises(ValueError):
        pinning.fetch_certificate(url)


# ---------------------------------------------------------------- a PVS going away


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_pvs_closing_before_answering_is_told_from_a_broken_answer(tmp_path: Path, certs: Certs, scheme: str) -> None:
    """A PVS going down (reboot) closes without a byte: 503, retry later. One that sends part of
    an answer and closes is broken: 502. httpcore raises the same error for both."""
    from gateway.upstream import map_transport_error

    cert, key, _ = certs["a"]
    pvs = FakePVS(server_context(cert, key) if scheme == "https" else None)
    outcomes = {}
    with running(pvs) as port:
        url = f"{scheme}://127.0.0.1:{port}"
        for name, answer in (
            ("nothing", b""),
            ("part of a head", b"HTTP/1.1 200 OK\r\nContent-Le"),
            ("part of a body", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok"),
            ("whole", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"),
        ):
            pvs.answer = answer
            [result] = get(pin_transport(url, tmp_path / f"pin-{name}.json"), url)
            if isinstance(result, httpx.Response):
                outcomes[name] = result.status_code
            else:
                assert isinstance(result, httpx.HTTPError), result
                outcomes[name] = map_transport_error(result, url).status
    assert outcomes == {"nothing": 503, "part of a head": 502, "part of a body": 502, "whole": 200}
