"""The hot path (gateway.hotpath): fresh cache hits answered in the connection protocol.

It must be invisible: the same answers as the ASGI stack, every request
counted once (rate limits, failures, logs), pipelined requests in order.
HTTP/1.0 requests are never taken by it (it only answers keep-alive
connections), which gives the ASGI path's answer to compare with, from the
same gateway in the same second.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest
from uvicorn.protocols.http import httptools_impl

from gateway.httpproto import head_encoder
from tests.harness import Gateway, Simulator

DEVICE_LIST = "/cgi-bin/dl_cgi?Command=DeviceList"
TTL = {"cache": {"ttl": {"DeviceList": 3600}}}
# Fields that differ between two answers of the same entry in the same second.
PER_REQUEST = {"date", "x-request-id", "ratelimit", "connection"}


class Answer:
    def __init__(self, head: bytes, body: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.fields = [tuple(line.split(": ", 1)) for line in lines[1:]]
        self.body = body

    def get(self, name: str) -> str:
        return next(v for k, v in self.fields if k == name)

    def stable_fields(self) -> list[tuple[str, ...]]:
        return [f for f in self.fields if f[0] not in PER_REQUEST]

    @property
    def length(self) -> int:
        return int(dict(self.fields).get("content-length", "0"))


def _connect(gw: Gateway) -> socket.socket:
    host, port = gw.url.split("://")[1].split("/")[0].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    if gw.url.startswith("https"):
        ctx = gw.verify
        assert isinstance(ctx, ssl.SSLContext)
        return ctx.wrap_socket(sock, server_hostname=host)
    return sock


def _read_answers(sock: socket.socket, count: int, *, head_only: frozenset[int] = frozenset()) -> list[Answer]:
    """``count`` answers; those at the ``head_only`` positions (HEAD requests) have no body."""
    data = b""
    answers: list[Answer] = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(answers)} answers"
            data += chunk
            continue
        head = data[:end]
        length = 0 if len(answers) in head_only else Answer(head, b"").length
        while len(data) < end + 4 + length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a body"
            data += chunk
        answers.append(Answer(head, data[end + 4 : end + 4 + length]))
        data = data[end + 4 + length :]
    return answers


def _request(gw: Gateway, key: str, target: str = DEVICE_LIST, *, method: str = "GET", version: str = "1.1") -> bytes:
    return f"{method} {target} HTTP/{version}\r\nHost: gw\r\nAuthorization: Bearer {gw.keys[key]}\r\n\r\n".encode()


def _exchange(gw: Gateway, raw: bytes, count: int = 1, **kw: Any) -> list[Answer]:
    with _connect(gw) as sock:
        sock.sendall(raw)
        return _read_answers(sock, count, **kw)


def _hot_answered(gw: Gateway) -> int | None:
    with gw.client("admin") as c:
        return c.get("/stats").json()["hot_path_answered"]


def test_a_hot_answer_is_the_asgi_answer(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    # A quota under 1000, so RateLimit's r is exact (gateway.ratelimit.shown_remaining).
    gw = make_gateway(simulator.url, {**TTL, "server": {"tls": "self-signed"}, "ratelimit": {"per_caller": "900/minute"}})
    (first,) = _exchange(gw, _request(gw, "viewer"))  # the miss: through ASGI, stored
    assert first.status == 200 and "fwd=miss" in first.get("cache-status")
    for _ in range(3):  # the three must fall in one second of the entry's age to compare whole
        before = _hot_answered(gw)
        with _connect(gw) as sock:
            sock.sendall(_request(gw, "viewer"))
            (hot,) = _read_answers(sock, 1)
        (asgi,) = _exchange(gw, _request(gw, "viewer", version="1.0"))
        (hot2,) = _exchange(gw, _request(gw, "viewer"))
        if hot.get("age") == asgi.get("age") == hot2.get("age"):
            break
    assert _hot_answered(gw) == (before or 0) + 2  # the HTTP/1.0 request went through ASGI
    assert hot.status == asgi.status == 200 and hot.body == asgi.body == first.body
    assert hot.stable_fields() == asgi.stable_fields()
    assert "strict-transport-security" in dict(hot.fields) and "hit;" in hot.get("cache-status")
    # Each request counted once, whichever path answered it.
    remaining = [int(a.get("ratelimit").split("r=")[1].split(";")[0]) for a in (hot, asgi, hot2)]
    assert remaining[0] - remaining[1] == 1 and remaining[1] - remaining[2] == 1
    assert hot.get("x-request-id") != hot2.get("x-request-id")


def test_hot_path_off_answers_the_same_through_asgi(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {**TTL, "server": {"hot_path": False}})
    answers = _exchange(gw, _request(gw, "viewer") * 3, 3)
    assert [a.status for a in answers] == [200, 200, 200] and "hit;" in answers[2].get("cache-status")
    assert _hot_answered(gw) is None


def test_a_refusal_is_decided_once(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {**TTL, "ratelimit": {"per_caller": "3/minute"}})
    answers = _exchange(gw, _request(gw, "viewer") * 4, 4)
    assert [a.status for a in answers] == [200, 200, 200, 429]
    assert [a.get("ratelimit") for a in answers[:3]] == [f'"caller";r={r};t={answers[i].get("ratelimit").split("t=")[1]}' for i, r in enumerate((2, 1, 0))]
    assert "caller" in answers[3].body.decode() and answers[3].get("retry-after")
    assert _hot_answered(gw) == 2  # the miss and the refusal went through ASGI


def test_failed_credentials_are_counted_once(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {**TTL, "ratelimit": {"auth_failures": "3/minute"}})
    _exchange(gw, _request(gw, "viewer"))  # stored: the wrong keys below would otherwise be hot-path candidates
    gw.keys["wrong"] = gw.keys["viewer"][:-4] + "AAAA"
    wrong = _exchange(gw, _request(gw, "wrong") * 2, 2)
    assert [a.status for a in wrong] == [401, 401]
    # Two failures of three allowed: counted twice, a valid key is still admitted.
    (ok,) = _exchange(gw, _request(gw, "viewer"))
    assert ok.status == 200


def test_pipelined_hot_and_asgi_requests_keep_their_order(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, TTL)
    _exchange(gw, _request(gw, "viewer"))
    batch = (_request(gw, "viewer") + _request(gw, "viewer", "/healthz")) * 50 + _request(gw, "viewer", method="HEAD")
    answers = _exchange(gw, batch, 101, head_only=frozenset({100}))
    for i, a in enumerate(answers[:100]):
        assert a.status == 200
        assert (b'"devices"' in a.body) == (i % 2 == 0), f"answer {i} out of order"
    assert answers[100].status == 200 and answers[100].body == b"" and int(answers[100].get("content-length")) == len(answers[0].body)
    ids = [a.get("x-request-id") for a in answers]
    assert len(set(ids)) == len(ids)
    assert _hot_answered(gw) == 51


def test_hot_answers_are_logged_like_any_other(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, TTL)
    answers = _exchange(gw, _request(gw, "viewer") * 5, 5)
    rid = answers[4].get("x-request-id")
    logs = gw.wait_for_log(f"request_id={rid}")
    line = next(line for line in logs.splitlines() if f"request_id={rid}" in line)
    assert "name=viewer" in line and "status=200" in line and 'cache="pvs-gateway; hit;' in line
    assert sum(f"request_id={a.get('x-request-id')} " in logs for a in answers) == 5
    with gw.client("admin") as c:
        assert c.get("/stats").json()["identities"][f"key:{gw.keys['viewer'].split('_')[1]}"]["requests"] == 5


def test_clients_that_leave_before_their_answer_do_no_harm(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, TTL)
    _exchange(gw, _request(gw, "viewer"))
    for _ in range(30):
        with _connect(gw) as sock:
            sock.sendall(_request(gw, "viewer") * 3)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset at close
    time.sleep(0.2)
    (ok,) = _exchange(gw, _request(gw, "viewer"))
    assert ok.status == 200
    assert "Traceback" not in gw.logs() and "hot path failed" not in gw.logs()


@pytest.fixture
def encoder() -> Any:
    enc = head_encoder(httptools_impl)
    assert enc is not None
    return enc


def test_the_fixed_part_of_a_head_is_encoded_once_per_list(encoder: Any) -> None:
    default = [(b"date", b"Tue, 24 Nov 2026 00:00:00 GMT")]
    fixed = [(b"content-length", b"2"), (b"age", b"1")]
    head, length = encoder.encode_split(200, default, fixed, [(b"x-request-id", b"a1")])
    assert length == 2 and head == b"HTTP/1.1 200 OK\r\ndate: Tue, 24 Nov 2026 00:00:00 GMT\r\ncontent-length: 2\r\nage: 1\r\nx-request-id: a1\r\n\r\n"
    assert head == encoder.encode(200, [*default, *fixed, (b"x-request-id", b"a1")])[0]
    # A new list (the entry aged a second) is encoded afresh, not served from the memo.
    head2, _ = encoder.encode_split(200, default, [(b"content-length", b"2"), (b"age", b"2")], [])
    assert b"age: 2\r\n" in head2 and b"age: 1" not in head2
    newer = [(b"date", b"Tue, 24 Nov 2026 00:00:01 GMT")]
    assert b"00:00:01" in encoder.encode_split(200, newer, fixed, [])[0]


@pytest.mark.parametrize("value", [b"a\r\nset-cookie: x=1", b"a\nb", b"a\rb", b"a\x00b"])
def test_per_request_fields_are_checked_too(encoder: Any, value: bytes) -> None:
    with pytest.raises(RuntimeError):
        encoder.encode_split(200, [], [(b"content-length", b"0")], [(b"x-request-id", value)])


def test_per_request_fields_cannot_reframe_the_answer(encoder: Any) -> None:
    assert encoder.encode_split(200, [], [(b"content-length", b"0")], [(b"content-length", b"5")]) is None
    assert encoder.encode_split(200, [], [(b"content-length", b"0")], [(b"connection", b"close")]) is None


def test_callers_on_different_policies_each_get_their_own(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {**TTL, "ratelimit": {"per_caller": "50/minute", "roles": {"admin": "70/minute"}}})
    gw.add_key("dashboard", rate_limit="30/minute")
    time.sleep(1.5)  # the key file is reloaded within a second
    _exchange(gw, _request(gw, "viewer"))
    policies = {"viewer": '"caller";q=50;w=60', "admin": '"caller";q=70;w=60', "dashboard": '"caller";q=30;w=60'}
    with _connect(gw) as sock:
        for _ in range(3):  # alternating on one connection: each answer carries its caller's policy
            for name in policies:
                sock.sendall(_request(gw, name))
                (answer,) = _read_answers(sock, 1)
                assert answer.status == 200 and answer.get("ratelimit-policy") == policies[name], name
    assert (_hot_answered(gw) or 0) >= 8


def test_varied_requests_get_the_answers_the_asgi_path_gives(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {**TTL, "auth": {"allow_anonymous_from": ["127.0.0.2/32"]}})
    key = gw.keys["viewer"]
    basic = base64.b64encode(f"x:{key}".encode()).decode()
    good = [  # every credential form, and fields that change nothing
        f"Authorization: Bearer {key}",
        f"X-API-Key: {key}",
        f"Authorization: Basic {basic}",
        f"Authorization: bearer   {key}  ",
        f"Authorization: Bearer nope\r\nAuthorization: Bearer {key}",  # the last one counts
        f"Authorization: Bearer {key}\r\nContent-Length: 0",
        f"Authorization: Bearer {key}\r\nX-Forwarded-For: 10.0.0.1",  # not from a trusted proxy
        f"Authorization: Bearer {key}\r\nCookie: session=forged",  # the key comes first
    ]
    bad = [
        f"Authorization: Bearer {key}\r\nAuthorization: Bearer nope",
        f"Authorization: Bearer {key}x",
        "User-Agent: no-credentials",
        "Cookie: session=forged",
    ]
    targets = [
        DEVICE_LIST,
        DEVICE_LIST + "&Command=DeviceList",
        "/cgi-bin/dl_cgi?command=devicelist",
        "/cgi-bin/dl_cgi?Command=DeviceList%00",
        "/cgi-bin/dl_cgi?Command=Start",
        "/cgi-bin/dl_cgi/supervisor/info",
    ]
    _exchange(gw, _request(gw, "viewer"))  # stored
    _exchange(gw, _request(gw, "viewer", "/cgi-bin/dl_cgi/supervisor/info"))
    # Every valid credential form takes the hot path (first: past 16 recent failed credentials
    # from one address, below, its requests go the ASGI way until they age out).
    before = _hot_answered(gw) or 0
    for head in good:
        (a,) = _exchange(gw, f"GET {DEVICE_LIST} HTTP/1.1\r\nHost: gw\r\n{head}\r\n\r\n".encode())
        assert a.status == 200, head
    assert (_hot_answered(gw) or 0) - before == len(good)
    for method in ("GET", "HEAD"):
        for target in targets:
            for head in good + bad:
                raw = f"{method} {target} HTTP/1.1\r\nHost: gw\r\n{head}\r\n\r\n"
                head_only = frozenset({0}) if method == "HEAD" else frozenset()
                for _ in range(3):  # compared within one second of the entry's age
                    (a,) = _exchange(gw, raw.encode(), head_only=head_only)
                    (b,) = _exchange(gw, raw.replace("HTTP/1.1", "HTTP/1.0").encode(), head_only=head_only)
                    if dict(a.fields).get("age") == dict(b.fields).get("age"):
                        break
                assert (a.status, a.body) == (b.status, b.body), raw
                assert a.stable_fields() == b.stable_fields(), raw


# -- requests repeated byte for byte on a connection (gateway.httpproto: _repeat) --------------


def _stats(gw: Gateway) -> dict[str, Any]:
    with gw.client("admin") as c:
        return c.get("/stats").json()


def _one_by_one(sock: socket.socket, raw: bytes, count: int, **kw: Any) -> list[Answer]:
    """``raw`` sent ``count`` times, each after the previous answer: what a poller does."""
    answers = []
    for _ in range(count):
        sock.sendall(raw)
        answers += _read_answers(sock, 1, **kw)
    return answers


def test_a_repeated_request_is_parsed_once_and_answered_as_any(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {**TTL, "ratelimit": {"per_caller": "900/minute"}})  # r exact below 1000
    _exchange(gw, _request(gw, "viewer"))
    before = _stats(gw)
    with _connect(gw) as sock:
        answers = _one_by_one(sock, _request(gw, "viewer"), 6)
        # Another request in between replaces what is remembered; HEAD then GET again.
        answers += _one_by_one(sock, _request(gw, "viewer", method="HEAD"), 2, head_only=frozenset({0}))
        answers += _one_by_one(sock, _request(gw, "viewer"), 2)
    (asgi,) = _exchange(gw, _request(gw, "viewer", version="1.0"))
    after = _stats(gw)
    assert [a.status for a in answers] == [200] * 10
    assert after["hot_path_repeats"] - before["hot_path_repeats"] == 5 + 1 + 1  # all but the first of each run
    assert after["hot_path_answered"] - before["hot_path_answered"] == 10
    gets = [a for i, a in enumerate(answers) if i not in (6, 7)]
    assert all(a.body == asgi.body for a in gets) and answers[6].body == answers[7].body == b""
    assert all(a.stable_fields() == asgi.stable_fields() for a in gets if a.get("age") == asgi.get("age"))
    remaining = [int(a.get("ratelimit").split("r=")[1].split(";")[0]) for a in answers]
    assert remaining == list(range(remaining[0], remaining[0] - 10, -1))  # each one counted, once
    assert len({a.get("x-request-id") for a in answers}) == 10


def test_connections_repeating_one_key_share_its_limit(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    """Each connection holds the key's counter (gateway.ratelimit, admit_now); all spend the same one."""
    gw = make_gateway(simulator.url, {**TTL, "ratelimit": {"per_caller": "12/minute"}})
    raw = _request(gw, "viewer")
    with _connect(gw) as first, _connect(gw) as second:
        answers = []
        for _ in range(7):  # alternating, each connection repeating its own bytes: 14 requests
            answers += _one_by_one(first, raw, 1) + _one_by_one(second, raw, 1)
    assert [a.status for a in answers] == [200] * 12 + [429] * 2
    remaining = [int(a.get("ratelimit").split("r=")[1].split(";")[0]) for a in answers[:12]]
    assert remaining == list(range(11, -1, -1))
    assert _stats(gw)["hot_path_repeats"] >= 10


def test_a_repeated_request_meets_every_decision_again(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {**TTL, "ratelimit": {"per_caller": "4/minute"}})
    gw.add_key("to-revoke")
    raw = _request(gw, "to-revoke")
    with _connect(gw) as sock:
        deadline = time.monotonic() + 5
        while _one_by_one(sock, raw, 1)[0].status != 200:  # the running gateway picks up new keys
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # Limited: the fourth is the last of four a minute, the fifth refused (through the app).
        statuses = [a.status for a in _one_by_one(sock, raw, 4)]
        assert statuses == [200, 200, 200, 429]
        # Revoked while this connection remembers the request: the same bytes are refused within seconds.
        subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "revoke", "to-revoke", "--config", str(gw.config_path)],
            check=True, capture_output=True,
        )
        before = _stats(gw)["hot_path_repeats"]
        deadline = time.monotonic() + 5
        seen = [a.status for a in _one_by_one(sock, raw, 1)]
        while seen[-1] != 401:
            assert time.monotonic() < deadline, seen
            time.sleep(0.2)
            seen += [a.status for a in _one_by_one(sock, raw, 1)]
        assert set(seen) <= {429, 401}
    assert _stats(gw)["hot_path_repeats"] - before == len(seen)
    assert "hot path failed" not in gw.logs()


def test_only_a_whole_request_alone_in_its_read_is_remembered(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, TTL)
    raw = _request(gw, "viewer")
    _exchange(gw, raw)
    before = _stats(gw)["hot_path_repeats"]
    with _connect(gw) as sock:
        sock.sendall(raw * 2)  # two in one read: parsed, not remembered
        assert [a.status for a in _read_answers(sock, 2)] == [200, 200]
        sock.sendall(raw * 2)
        assert [a.status for a in _read_answers(sock, 2)] == [200, 200]
        for _ in range(2):  # one request in two reads
            sock.sendall(raw[:10])
            time.sleep(0.05)
            sock.sendall(raw[10:])
            assert _read_answers(sock, 1)[0].status == 200
    assert _stats(gw)["hot_path_repeats"] == before


def test_a_key_that_expires_while_a_connection_repeats_it_is_refused(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, TTL)
    gw.keys["short"] = gw.add_key("short-lived", expires_days=4 / 86400)  # four seconds
    raw = _request(gw, "short")
    with _connect(gw) as sock:
        deadline = time.monotonic() + 10
        seen = [a.status for a in _one_by_one(sock, raw, 1)]
        while 200 not in seen or seen[-1] != 401:  # picked up by the running gateway, then expired
            assert time.monotonic() < deadline, seen[-5:]
            time.sleep(0.05)
            seen += [a.status for a in _one_by_one(sock, raw, 1)]
    admitted = seen[seen.index(200):]
    assert admitted.count(200) >= 3, seen  # on repeats, until it expired
    assert admitted[admitted.index(401):] == [401]
