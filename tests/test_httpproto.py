"""The connection protocol's one-write answers (gateway.httpproto.coalescing_cycle).

Driven in process through a recording transport, because what is tested is
how many writes leave the protocol, which a socket cannot show; the socket
behaviour (pipelining, HEAD, Connection: close) is tested over TCP below.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from gateway.httpproto import protocol_class
from gateway.settings import ServerSettings
from tests.harness import Gateway, Simulator

BODY = b'{"ok":true}' * 100


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8443)}.get(name, default)

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _app(headers: list[tuple[bytes, bytes]], body: bytes = BODY, *, chunks: int = 1) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        size = len(body) // chunks
        for i in range(chunks):
            part = body[i * size : (i + 1) * size] if i < chunks - 1 else body[i * size :]
            await send({"type": "http.response.body", "body": part, "more_body": i < chunks - 1})

    return app


async def _run(app: Any, request: bytes) -> RecordingTransport:
    config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False, lifespan="off")
    config.load()
    cls = protocol_class(ServerSettings())
    assert not isinstance(cls, str)
    proto = cls(config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())  # type: ignore[call-arg]
    transport = RecordingTransport()
    proto.connection_made(transport)
    proto.data_received(request)
    for _ in range(20):
        await asyncio.sleep(0)
    proto.connection_lost(None)
    return transport


def _serve(app: Any, request: bytes) -> RecordingTransport:
    return asyncio.run(_run(app, request))


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
LENGTH = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


def test_a_complete_answer_leaves_in_one_write() -> None:
    t = _serve(_app(LENGTH), GET)
    assert len(t.writes) == 1
    head, _, body = t.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 1100" in head
    assert body == BODY


def test_head_requests_get_the_head_only() -> None:
    t = _serve(_app(LENGTH), b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(t.writes) == 1 and t.writes[0].endswith(b"content-length: 1100\r\n\r\n")


def test_a_streamed_body_sends_the_head_with_its_first_part() -> None:
    t = _serve(_app(LENGTH, chunks=3), GET)
    assert len(t.writes) == 3
    assert b"".join(t.writes).partition(b"\r\n\r\n")[2] == BODY


@pytest.mark.parametrize(
    ("headers", "request_line"),
    [
        ([(b"content-type", b"text/plain")], GET),  # no length: uvicorn's chunked encoding
        ([*LENGTH, (b"connection", b"close")], GET),
        (LENGTH, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"),  # no keep-alive
    ],
)
def test_other_answers_keep_uvicorns_own_path(headers: list[tuple[bytes, bytes]], request_line: bytes) -> None:
    t = _serve(_app(headers), request_line)
    assert len(t.writes) >= 2  # uvicorn writes its head on its own
    assert BODY in b"".join(t.writes).replace(b"\r\n", b"") or BODY in b"".join(t.writes)


@pytest.mark.parametrize(
    "bad",
    [
        [*LENGTH, (b"x-bad", b"a\r\nset-cookie: forged=1")],
        [*LENGTH, (b"x-bad", b"a\nforged")],
        [*LENGTH, (b"x-bad", b"a\rforged")],
        [*LENGTH, (b"x-bad", b"a\x00forged")],
        [*LENGTH, (b"bad name", b"v")],
    ],
)
def test_header_checks_still_refuse_injection(bad: list[tuple[bytes, bytes]]) -> None:
    t = _serve(_app(bad), GET)
    sent = b"".join(t.writes)
    assert b"forged" not in sent and b"bad name" not in sent
    assert sent.startswith(b"HTTP/1.1 500 ") or (sent == b"" and t.closed)  # an app error: 500, or (uvicorn's own path) a closed connection


def test_a_body_longer_than_its_length_is_refused() -> None:
    t = _serve(_app([(b"content-length", b"5")]), GET)
    assert BODY not in b"".join(t.writes)
    assert t.closed


def test_pipelined_requests_are_answered_in_order(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {"server": {"tls": "off"}, "auth": {"allow_anonymous_from": ["127.0.0.0/8"]}})
    host, port = gw.url.split("://")[1].split(":")
    target = "/cgi-bin/dl_cgi/supervisor/info"
    requests = (
        f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"HEAD {target} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(requests)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 3, data[:500]
    first_head, _, first_body = answers[0].partition(b"\r\n\r\n")
    length = int(next(line.split(b": ")[1] for line in first_head.split(b"\r\n") if line.startswith(b"content-length")))
    assert answers[0].startswith(b"200 ") and len(first_body) == length
    assert answers[1].startswith(b"200 ") and answers[1].endswith(b"\r\n\r\n") and b"content-length: %d" % length in answers[1]
    assert answers[2].startswith(b"200 ") and b"connection: close" in answers[2]
