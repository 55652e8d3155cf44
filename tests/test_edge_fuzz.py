"""A differential fuzz of the connection layer: random streams, random chunkings, one reference.

Each case is a stream of requests (valid GETs and HEADs, GETs carrying a body
by length or by chunks, malformed lines, requests the edge must wait for) sent
to a real gateway cut at random places, with random pauses, over one
connection. The answers it gets must be exactly those a correct HTTP/1.1
server gives the same bytes, as h11 reads them from one buffer (the
reference): each request answered once and in order, nothing answered from
inside a body, nothing answered after the request that ends the connection.
Memory stays bounded over all cases.

``PVSGW_LONG=1`` runs ten times the cases.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from collections.abc import Callable

import h11

from tests.harness import Gateway, Simulator, rss_bytes

CASES = 60 * (10 if os.environ.get("PVSGW_LONG") else 1)
MB = 1024 * 1024


def _get(rng: random.Random) -> bytes:
    extra = rng.choice(["", "Accept: */*\r\n", "X-Thing:  spaced value \r\n", "accept-encoding: gzip\r\n"])
    return f"GET /healthz HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


def _head(rng: random.Random) -> bytes:
    return b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _with_length(rng: random.Random) -> bytes:
    body = _get(rng) * rng.randint(1, 2)  # a body that looks like requests
    return b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def _chunked(rng: random.Random) -> bytes:
    body = _get(rng)
    return b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def _malformed(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
            b"GET  /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00",  # a TLS ClientHello on the plain port
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ]
    )


MAKERS: list[Callable[[random.Random], bytes]] = [_get, _get, _get, _head, _with_length, _chunked, _malformed]
CLOSE = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def reference(stream: bytes) -> list[int]:
    """The statuses a correct server gives ``stream``, read by h11 as one buffer.

    The gateway answers a request carrying a body 400 and closes (GET and HEAD take none);
    a request h11 refuses gets 400 and the connection ends there.
    """
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    conn.receive_data(b"")  # the client closes after sending everything
    statuses: list[int] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            statuses.append(400)
            return statuses
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            if event is h11.PAUSED:
                # Answer the request just read, then read on (what uvicorn does after each answer).
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
                continue
            return statuses
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}
            if b"content-length" in names or b"transfer-encoding" in names:
                statuses.append(400)
                return statuses
            statuses.append(200)
            if any(n == b"connection" and v.lower() == b"close" for n, v in event.headers):
                return statuses


def _send_cut(sock: socket.socket, stream: bytes, rng: random.Random) -> None:
    at = 0
    try:
        while at < len(stream):
            step = rng.choice([1, 2, 7, 40, 200, 4000])
            sock.sendall(stream[at : at + step])
            at += step
            if rng.random() < 0.15:
                time.sleep(rng.choice([0.001, 0.01, 0.05]))
    except OSError:
        pass  # the gateway closed after a refusal; what it answered is read below


def _answers(sock: socket.socket) -> list[int]:
    sock.settimeout(5)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def test_random_streams_are_answered_as_a_correct_parser_reads_them(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {"server": {"keepalive_timeout": 3.0}})
    host, port = re.match(r"http://([^:/]+):(\d+)", gw.url).groups()  # type: ignore[union-attr]
    rng = random.Random(20261203)
    before = rss_bytes(gw.proc.pid)
    for case in range(CASES):
        items = [rng.choice(MAKERS)(rng) for _ in range(rng.randint(1, 6))]
        stream = b"".join(items) + CLOSE
        expected = reference(stream)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            _send_cut(sock, stream, rng)
            got = _answers(sock)
        assert got == expected, f"case {case}: {stream!r}"
    grown = rss_bytes(gw.proc.pid) - before
    assert grown < 64 * MB
    assert gw.proc.poll() is None
    assert "Traceback" not in gw.logs()
