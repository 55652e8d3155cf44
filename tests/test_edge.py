"""The edge (gateway/edge.py): what one connection may cost, in every connection state.

Each attack that worked against the old connection layer is here as a test
against a real gateway process: memory per connection stays bounded whatever a
client streams and whenever it streams it; bytes are answered as a correct
HTTP/1.1 parser reads them (never twice, never from inside a body); connection
caps hold per address and let other addresses in; silent and slow clients are
closed on time. The last tests pin what the edge relies on from uvicorn.
"""

from __future__ import annotations

import inspect
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol

from tests.harness import Gateway, Simulator, rss_bytes

KEEPALIVE = 3.0
EDGE = {
    "server": {
        "keepalive_timeout": KEEPALIVE,
        "max_connections_per_ip": 20,
        "tls_handshake_timeout": 2.0,
    },
    "cache": {"ttl": {"DeviceList": 600}},
}
MB = 1024 * 1024


def _address(gw: Gateway) -> tuple[str, int]:
    host, port = re.match(r"https?://([^:/]+):(\d+)", gw.url).groups()  # type: ignore[union-attr]
    return host, int(port)


def _connect(gw: Gateway, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(_address(gw), timeout=10, source_address=(source, 0))
    if gw.url.startswith("https"):
        context = ssl.create_default_context(cafile=str(gw.ca))
        return context.wrap_socket(sock, server_hostname="localhost")
    return sock


def _get(path: str, key: str | None = None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}{extra}\r\n".encode()


def _read_answers(sock: socket.socket, quiet: float = 1.5) -> list[int]:
    """Statuses of the answers read until the connection closes or is quiet for ``quiet`` s."""
    sock.settimeout(quiet)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def _stream(sock: socket.socket, total: int, seconds: float = 20.0) -> int:
    """Send up to ``total`` bytes of header-ish filler; the bytes the gateway accepted before it refused."""
    chunk = b"X-Filler: " + b"a" * (64 * 1024 - 12) + b"\r\n"
    sent = 0
    deadline = time.monotonic() + seconds
    sock.settimeout(2.0)
    try:
        while sent < total and time.monotonic() < deadline:
            sent += sock.send(chunk)
    except (OSError, ssl.SSLError):
        pass
    return sent


@pytest.fixture
def gateway(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> Iterator[Gateway]:
    gw = make_gateway(simulator.url, EDGE)
    with gw.client() as c:  # warm: DeviceList in the cache
        assert c.get("/cgi-bin/dl_cgi?Command=DeviceList").status_code == 200
    yield gw


# ---------------------------------------------------------------- memory, in each connection state


def _slow_miss(gw: Gateway) -> bytes:
    # Not cached (a new resource): the answer waits on the simulator while the attack streams.
    return _get("/cgi-bin/dl_cgi?Command=Get_Comm", gw.keys["viewer"])


STATES: dict[str, Callable[[Gateway], bytes]] = {
    "first head never ends": lambda gw: b"GET /cgi-bin/dl_cgi?Command=DeviceList HTTP/1.1\r\nHost: x\r\n",
    "second head after a slow miss": lambda gw: _slow_miss(gw) + b"GET / HTTP/1.1\r\nHost: x\r\n",
    "head after an answer": lambda gw: _get("/healthz") + b"GET / HTTP/1.1\r\nHost: x\r\n",
    "inside a declared body": lambda gw: b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
}


@pytest.mark.parametrize("state", list(STATES))
def test_memory_stays_bounded_when_256_mb_are_streamed(gateway: Gateway, state: str) -> None:
    before = rss_bytes(gateway.proc.pid)
    sock = _connect(gateway)
    sock.sendall(STATES[state](gateway))
    accepted = _stream(sock, 256 * MB)
    sock.close()
    time.sleep(0.3)
    grown = rss_bytes(gateway.proc.pid) - before
    print(f"{state}: {accepted / MB:.1f} MB accepted, RSS +{grown / MB:.1f} MB")
    assert grown < 64 * MB
    with gateway.client() as c:  # and the gateway still serves
        assert c.get("/cgi-bin/dl_cgi?Command=DeviceList").status_code == 200


def test_a_client_that_never_reads_is_dropped_and_costs_no_memory(gateway: Gateway) -> None:
    before = rss_bytes(gateway.proc.pid)
    sock = _connect(gateway)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = _get("/cgi-bin/dl_cgi?Command=DeviceList", gateway.keys["viewer"])
    sent = _stream_requests(sock, request, 256 * MB)
    started = time.monotonic()
    # Its answers stall; it must be closed once its unread answer has waited keepalive_timeout.
    sock.settimeout(KEEPALIVE + 5)
    closed = False
    try:
        while time.monotonic() - started < KEEPALIVE + 5:
            time.sleep(0.5)
            sock.send(b"")
            if not sock.recv(1, socket.MSG_PEEK):
                closed = True
                break
    except OSError:
        closed = True
    grown = rss_bytes(gateway.proc.pid) - before
    print(f"never reads: {sent / MB:.1f} MB of requests accepted, RSS +{grown / MB:.1f} MB")
    assert grown < 64 * MB
    assert sent < 64 * MB  # the gateway stopped reading long before 256 MB
    sock.close()
    assert closed or _closed_soon(gateway)


def _stream_requests(sock: socket.socket, request: bytes, total: int) -> int:
    # One request per send, as a poller would pipeline them (a 64 KB burst would be one over-cap head).
    sent = 0
    sock.settimeout(2.0)
    try:
        while sent < total:
            sent += sock.send(request)
    except (OSError, ssl.SSLError):
        pass
    return sent


def _closed_soon(gw: Gateway) -> bool:
    with gw.client() as c:
        return c.get("/stats").json()["connections"]["open"] <= 1


# ---------------------------------------------------------------- framing: as a correct parser reads it


def test_a_request_and_a_partial_head_sent_twice_are_read_as_one_stream(gateway: Gateway) -> None:
    request = _get("/cgi-bin/dl_cgi?Command=DeviceList", gateway.keys["viewer"])
    partial = b"GET /cgi-bin/dl_cgi?Command=DeviceList HTTP/1.1\r\nHo"
    sock = _connect(gateway)
    sock.sendall(request + partial)
    time.sleep(0.3)
    sock.sendall(request + partial)
    # The second "request" begins inside the partial head: "HoGET ..." is no header line.
    assert _read_answers(sock) == [200, 400]


def test_bytes_inside_a_declared_body_are_never_answered_as_a_request(gateway: Gateway) -> None:
    inner = _get("/cgi-bin/dl_cgi?Command=DeviceList", gateway.keys["viewer"])
    smuggle = (
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(inner) + inner
    )
    sock = _connect(gateway)
    sock.sendall(smuggle)
    assert _read_answers(sock) == [400]  # a GET with a body; its body is not a request


def test_chunked_body_is_not_answered_as_a_request(gateway: Gateway) -> None:
    inner = _get("/healthz")
    smuggle = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)
    sock = _connect(gateway)
    sock.sendall(smuggle)
    assert _read_answers(sock) == [400]


def test_pipelined_requests_are_each_answered_once_in_order(gateway: Gateway) -> None:
    key = gateway.keys["viewer"]
    sock = _connect(gateway)
    sock.sendall(_get("/cgi-bin/dl_cgi?Command=DeviceList", key) + _get("/healthz") + _get("/nope", key))
    assert _read_answers(sock) == [200, 200, 404]


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"GET /healthz HTTP/1.1\r\n\r\n", "HTTP/1.1 without Host"),
        (b"GET /healthz\r\n\r\n", "a request line without a version"),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "two Host fields"),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "two lengths"),
    ],
)
def test_malformed_requests_get_a_400_problem(gateway: Gateway, raw: bytes, why: str) -> None:
    sock = _connect(gateway)
    sock.sendall(raw)
    sock.settimeout(3)
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 "), why
    assert b"application/problem+json" in answer, why


# ---------------------------------------------------------------- deadlines


def test_a_slow_head_gets_408_within_the_deadline(gateway: Gateway) -> None:
    sock = _connect(gateway)
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    sock.settimeout(0.5)
    answer = b""
    while time.monotonic() - started < KEEPALIVE + 3:
        try:
            sock.sendall(b"X: y\r\n")  # a byte now and then never extends the deadline
            answer += sock.recv(65536)
            if answer:
                break
        except TimeoutError:
            continue
        except OSError:
            break
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert KEEPALIVE - 0.5 <= took <= KEEPALIVE + 2


def test_an_idle_connection_is_closed_after_keepalive_timeout(gateway: Gateway) -> None:
    sock = _connect(gateway)
    sock.sendall(_get("/healthz"))
    sock.settimeout(KEEPALIVE + 3)
    started = time.monotonic()
    data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 200 ")
    while data:
        data = sock.recv(65536)
    assert time.monotonic() - started <= KEEPALIVE + 2


def test_an_oversized_head_gets_431(gateway: Gateway) -> None:
    sock = _connect(gateway)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    sock.settimeout(3)
    assert sock.recv(65536).startswith(b"HTTP/1.1 431 ")


# ---------------------------------------------------------------- connection caps (TLS)


@pytest.fixture
def tls_gateway(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway(simulator.url, {**EDGE, "server": {**EDGE["server"], "tls": "self-signed"}})


def test_idle_tls_connections_over_the_per_ip_cap_are_refused_and_others_are_served(tls_gateway: Gateway) -> None:
    address = _address(tls_gateway)
    held = []
    for _ in range(40):  # never send a ClientHello
        held.append(socket.create_connection(address, timeout=5))
    try:
        time.sleep(0.3)
        refused = 0
        for sock in held:
            sock.settimeout(0.2)
            try:
                if sock.recv(1) == b"":
                    refused += 1
            except TimeoutError:
                pass
            except OSError:
                refused += 1
        assert refused >= 20  # 20 may stay (the cap), the rest are closed at once
        # Another address is served while all of that goes on.
        other = _connect(tls_gateway, source="127.0.0.2")
        other.sendall(_get("/healthz"))
        assert _read_answers(other, quiet=2)[:1] == [200]
        other.close()
    finally:
        for sock in held:
            sock.close()


def test_a_silent_tcp_connection_is_closed_within_the_handshake_timeout(tls_gateway: Gateway) -> None:
    sock = socket.create_connection(_address(tls_gateway), timeout=10)
    started = time.monotonic()
    sock.settimeout(2.0 + 2 + 1)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        data = b""
    took = time.monotonic() - started
    assert data == b""
    assert took <= 2.0 + 2


def test_tls_connections_aborted_before_their_answer_leave_no_memory_behind(tls_gateway: Gateway) -> None:
    """A client that closes without reading (a killed app, a timed-out poller, an attacker) costs nothing
    once gone: uvicorn would keep each for keepalive_timeout, with Python's TLS buffers (~300 KB)."""
    address = _address(tls_gateway)
    context = ssl.create_default_context(cafile=str(tls_gateway.ca))
    request = _get("/cgi-bin/dl_cgi?Command=DeviceList")  # no key: a 401 is enough

    def abort(n: int) -> int:
        done = 0
        for _ in range(n):
            try:
                with socket.create_connection(address, timeout=5) as raw, context.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(request)
                done += 1
            except OSError:
                pass
        return done

    abort(200)  # warm: allocator pools, imports
    time.sleep(0.5)
    before = rss_bytes(tls_gateway.proc.pid)
    assert abort(1000) >= 990
    time.sleep(0.5)
    grown = rss_bytes(tls_gateway.proc.pid) - before
    print(f"1000 aborted TLS connections: RSS +{grown / MB:.1f} MB")
    assert grown < 16 * MB


# ---------------------------------------------------------------- the plain-HTTP LAN listener


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_lan_listener_has_the_same_edge(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    port = _free_port()
    gw = make_gateway(simulator.url, {**EDGE, "server": {**EDGE["server"], "tls": "self-signed", "http_port": port}})
    before = rss_bytes(gw.proc.pid)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    _stream(sock, 64 * MB, seconds=10)
    sock.close()
    assert rss_bytes(gw.proc.pid) - before < 64 * MB
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 308 ")
    assert b"evil.example" not in answer


# ---------------------------------------------------------------- what the edge relies on from uvicorn


def test_what_the_edge_relies_on_from_uvicorn_is_still_there() -> None:
    """gateway/edge.py's docstring lists these; if this fails, read it again against uvicorn."""
    import asyncio

    import uvicorn

    # 1. A callable http= is used as the protocol factory, called with keyword arguments.
    config = uvicorn.Config(lambda *a: None, http=lambda **kw: asyncio.Protocol())  # type: ignore[arg-type]
    config.load()
    assert callable(config.http_protocol_class) and not isinstance(config.http_protocol_class, str)
    source = inspect.getsource(uvicorn.Server.startup)
    assert "config.http_protocol_class(" in source and "config=config" in source
    # 2. H11Protocol pauses reading while a request is in flight.
    assert issubclass(H11Protocol, asyncio.Protocol)
    assert "h11.PAUSED" in inspect.getsource(H11Protocol.handle_events)
    assert "pause_reading" in inspect.getsource(H11Protocol.handle_events)
    # 3. send_400_response(msg) is how it answers what h11 refuses.
    assert list(inspect.signature(H11Protocol.send_400_response).parameters) == ["self", "msg"]
    assert "send_400_response" in inspect.getsource(H11Protocol.handle_events)
    # 4. connection_lost(None) cancels the keep-alive timer.
    lost = inspect.getsource(H11Protocol.connection_lost)
    assert "if exc is None:" in lost and "_unset_keepalive_if_required()" in lost.split("if exc is None:", 1)[1]


def test_the_edge_sees_every_connection_of_a_real_server(tmp_path: Path) -> None:
    """A real uvicorn server with the edge's factory: the caps count, and release, its connections."""
    import asyncio

    import uvicorn

    from gateway.edge import Connections, EdgeLimits, EdgeMiddleware, protocol_factory

    connections = Connections(EdgeLimits(max_connections_per_ip=2))
    seen: list[int] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        seen.append(connections.total)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(EdgeMiddleware(app, connections), http=protocol_factory(connections, {}), lifespan="off", log_config=None)
    server = uvicorn.Server(config)

    def run() -> None:
        asyncio.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        a = socket.create_connection(("127.0.0.1", port))
        b = socket.create_connection(("127.0.0.1", port))
        c = socket.create_connection(("127.0.0.1", port))  # over the cap of 2
        c.settimeout(2)
        assert c.recv(1) == b""
        a.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        a.settimeout(2)
        assert a.recv(1024).startswith(b"HTTP/1.1 200 ")
        assert seen == [2]
        a.close()
        b.close()
        deadline = time.monotonic() + 3
        while connections.total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connections.total == 0 and connections.per_ip == {}
    finally:
        server.should_exit = True
        thread.join(10)
