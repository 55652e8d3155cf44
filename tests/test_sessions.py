"""Sessions end server-side (SPEC §3 "Credentials"): at logout, with their key, at their lifetime.

Unit tests drive ``SessionStore`` with an injected clock (no sleeps); Redis
tests use a real ``redis-server`` on 127.0.0.1; gateway tests run the real
gateway on the simulator and replay what LocalAPI clients send.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from pathlib import Path

import httpx
import pytest

from gateway.auth import keys as keystore
from gateway.auth.keys import KeyStore
from gateway.auth.sessions import SYNC_FRESH, SessionSigner, SessionStore
from gateway.local import PVSLogin, session_principal
from gateway.settings import Secret, UpstreamSettings
from gateway.shared import Shared
from tests.harness import Gateway, Simulator, start_gateway

SECRET = b"s" * 32
SUPERVISOR = "/cgi-bin/dl_cgi/supervisor/info"
SERIAL = "ZT0000850005XK7QP"
PVS_PASSWORD = SERIAL[-5:]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, shared: Shared | None = None) -> SessionStore:
    return SessionStore(SessionSigner(SECRET), shared=shared, clock=clock)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---------------------------------------------------------------- the store, with a clock


def test_issue_then_verify_names_the_subject() -> None:
    clock = Clock()
    store = _store(clock)
    session, token = store.issue("key:k7f3a9qz", 3600)
    found = store.verify(token)
    assert found == session and found.subject == "key:k7f3a9qz"
    assert found.expires - found.issued == 3600
    assert store.issue("key:k7f3a9qz", 3600)[1] != token  # a new id each time


def test_a_session_ends_at_its_lifetime_and_using_it_does_not_extend_it() -> None:
    clock = Clock()
    store = _store(clock)
    session, token = store.issue("key:k7f3a9qz", 60)
    for _ in range(59):  # used every second: the end does not move
        clock.now += 1
        assert store.verify(token) == session
    clock.now = session.expires - 0.001
    assert store.verify(token) is not None
    clock.now = session.expires
    assert store.verify(token) is None


def test_revoked_sessions_are_refused_at_once() -> None:
    clock = Clock()
    store = _store(clock)
    _, token = store.issue("key:a", 3600)
    _, other = store.issue("key:a", 3600)
    ended = asyncio.run(store.revoke_token(token))
    assert ended is not None and ended.subject == "key:a"
    assert store.verify(token) is None
    assert store.verify(other) is not None  # only that session ends
    assert asyncio.run(store.revoke_token(token)) is None  # already over


def test_a_token_this_gateway_did_not_issue_is_refused_without_redis() -> None:
    """Same secret, no record (another process, or this one before a restart): the revocation list is unknown."""
    clock = Clock()
    _, token = _store(clock).issue("key:a", 3600)
    assert SessionSigner(SECRET).verify(token, now=clock.now) == "key:a"  # authentic ...
    assert _store(clock).verify(token) is None  # ... yet no record vouches for it


def test_forged_and_tampered_tokens_are_refused() -> None:
    clock = Clock()
    store = _store(clock)
    _, token = store.issue("key:viewer01", 3600)
    payload, sig = token.split(".")
    foreign = SessionStore(SessionSigner(b"t" * 32), clock=clock).issue("key:admin001", 3600)[1]
    for bad in (foreign, f"{payload}.{sig[:-2]}AA", f"{payload}.", token + "=", token + ".x", "", "a" * 5000, token + "\n"):
        assert store.verify(bad) is None, bad
    assert store.verify(token) is not None


def test_the_record_table_is_bounded() -> None:
    clock = Clock()
    store = SessionStore(SessionSigner(SECRET), clock=clock, max_records=10)
    tokens = []
    for i in range(25):
        clock.now += 1
        tokens.append(store.issue(f"key:k{i}", 3600)[1])
    assert len(store) <= 10
    assert store.verify(tokens[-1]) is not None and store.verify(tokens[0]) is None  # the oldest went first


def test_oidc_style_sessions_by_id() -> None:
    clock = Clock()
    store = _store(clock)
    session = store.open("oidc:alice", 8 * 3600)
    assert store.active(session.sid, "oidc:alice", session.expires) == session
    assert store.active(session.sid, "oidc:mallory", session.expires) is None  # the id is bound to its subject
    assert store.active("made-up", "oidc:alice", session.expires) is None
    asyncio.run(store.revoke(session.sid))
    assert store.active(session.sid, "oidc:alice", session.expires) is None


# ---------------------------------------------------------------- who a session is


def _keystore(tmp_path: Path) -> tuple[KeyStore, Path]:
    path = tmp_path / "keys.json"
    keystore.add_key(path, "phone", "viewer")
    keystore.add_key(path, "boss", "admin")
    keys = KeyStore(path)
    keys.reload_if_changed()
    return keys, path


def test_a_key_session_dies_with_its_key(tmp_path: Path) -> None:
    keys, path = _keystore(tmp_path)
    store = _store(Clock(time.time()))
    phone = next(r for r in keystore.list_keys(path) if r["name"] == "phone")
    _, token = store.issue(f"key:{phone['id']}", 3600)
    session = session_principal(store, keys)
    principal = session(token)
    assert principal is not None and principal.role == "viewer" and principal.method == "session"
    keystore.revoke_key(path, "phone")
    keys.reload_if_changed()
    assert session(token) is None


def test_a_key_session_dies_when_its_key_expires(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    record, _ = keystore.add_key(path, "guest", "viewer", expires_days=2 / 86400)  # two seconds
    keys = KeyStore(path)
    keys.reload_if_changed()
    store = _store(Clock(time.time()))  # the session itself would last an hour
    _, token = store.issue(f"key:{record.id}", 3600)
    session = session_principal(store, keys)
    assert session(token) is not None
    deadline = time.monotonic() + 10
    while session(token) is not None:  # the key's expiry is wall time, read by keys.py
        assert time.monotonic() < deadline, "the session outlived its key"
        time.sleep(0.2)


# ---------------------------------------------------------------- the PVS's own login


def _scope(ip: str, *, path: str = "/auth", query: bytes = b"login", authorization: str | None = None) -> dict:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return {"type": "http", "path": path, "query_string": query, "client": (ip, 5000), "headers": headers}


def test_pvs_login_needs_the_lan_the_user_and_the_password() -> None:
    pvs = PVSLogin(UpstreamSettings(serial=SERIAL), ["192.168.1.0/24"])
    assert pvs.allowed(_scope("192.168.1.20"), "ssm_owner", PVS_PASSWORD)
    assert not pvs.allowed(_scope("203.0.113.9"), "ssm_owner", PVS_PASSWORD)  # not from the LAN
    assert not pvs.allowed(_scope("192.168.1.20"), "ssm_owner", "A0001")
    assert not pvs.allowed(_scope("192.168.1.20"), "admin", PVS_PASSWORD)
    assert not pvs.allowed(_scope("192.168.1.20", path="/vars", query=b"match=/"), "ssm_owner", PVS_PASSWORD)
    assert not pvs.allowed(_scope("192.168.1.20", query=b"logout"), "ssm_owner", PVS_PASSWORD)
    principal = pvs.principal(_scope("192.168.1.20", authorization=_basic("ssm_owner", PVS_PASSWORD)))
    assert principal.role == "viewer" and principal.method == "pvs_login"
    # upstream.password, when set, is the password (the serial's suffix no longer is).
    override = PVSLogin(UpstreamSettings(serial=SERIAL, password=Secret("Pw-123")), ["192.168.1.0/24"])
    assert override.allowed(_scope("192.168.1.20"), "ssm_owner", "Pw-123")
    assert not override.allowed(_scope("192.168.1.20"), "ssm_owner", PVS_PASSWORD)
    # No anonymous networks, or no known password: never.
    assert not PVSLogin(UpstreamSettings(serial=SERIAL), []).allowed(_scope("192.168.1.20"), "ssm_owner", PVS_PASSWORD)
    assert not PVSLogin(UpstreamSettings(), ["192.168.1.0/24"]).allowed(_scope("192.168.1.20"), "ssm_owner", "")
    # The serial learned from the PVS serves when none is configured.
    learned = PVSLogin(UpstreamSettings(), ["192.168.1.0/24"], serial=lambda: SERIAL)
    assert learned.allowed(_scope("192.168.1.20"), "ssm_owner", PVS_PASSWORD)


def test_a_pvs_login_session_is_a_viewer_bound_to_the_lan(tmp_path: Path) -> None:
    keys, _ = _keystore(tmp_path)
    store = _store(Clock(time.time()))
    pvs = PVSLogin(UpstreamSettings(serial=SERIAL), ["192.168.1.0/24"])
    _, token = store.issue("pvs:192.168.1.20", 3600)
    session = session_principal(store, keys, pvs)
    principal = session(token, "192.168.1.20")
    assert principal is not None and principal.role == "viewer"
    assert session(token, "203.0.113.9") is None  # a copied cookie is worthless off the LAN
    assert session_principal(store, keys, None)(token) is None  # no PVS login configured: no such sessions


# ---------------------------------------------------------------- shared through Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_revocations_are_shared_through_redis(redis_url: str) -> None:
    async def scenario() -> None:
        clock = Clock(time.time())
        one, two = Shared(redis_url), Shared(redis_url)
        a, b = _store(clock, one), _store(clock, two)
        try:
            session, token = a.issue("key:a", 3600)
            assert b.verify(token) is None  # b has never read the shared list: it cannot vouch
            assert await b.sync()
            assert b.verify(token) is not None  # issued by a, honoured by b
            await a.revoke(session.sid, session.expires)  # logout at a ...
            assert b.verify(token) is not None
            assert await b.sync()
            assert b.verify(token) is None  # ... reaches b at its next read
            assert a.verify(token) is None
            # A list older than SYNC_FRESH vouches for nothing (Redis gone quiet).
            _, fresh = a.issue("key:a", 3600)
            assert await b.sync()
            assert b.verify(fresh) is not None
            clock.now += SYNC_FRESH + 1
            assert b.verify(fresh) is None
            assert a.verify(fresh) is not None  # its issuer still holds the record
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(scenario())


def test_a_revocation_made_while_redis_is_down_is_sent_later(redis_url: str) -> None:
    async def scenario() -> None:
        clock = Clock(time.time())
        dead = f"redis://127.0.0.1:{_free_port()}"
        a_shared, b_shared = Shared(dead, timeout=0.2), Shared(redis_url)
        a, b = _store(clock, a_shared), _store(clock, b_shared)
        try:
            session, token = a.issue("key:a", 3600)
            assert await b.sync() and b.verify(token) is not None
            assert await a.revoke(session.sid, session.expires)  # Redis unreachable for a: kept locally
            assert a.verify(token) is None
            assert await b.sync() and b.verify(token) is not None  # b has not heard yet
            # Redis reachable again for a (same store, the real address): the revocation goes out.
            a._shared = Shared(redis_url)
            assert await a.sync()
            assert await b.sync() and b.verify(token) is None
            await a._shared.aclose()
        finally:
            await a_shared.aclose()
            await b_shared.aclose()

    asyncio.run(scenario())


# ---------------------------------------------------------------- the real gateway


def test_logout_ends_the_session_server_side(simulator: Simulator, make_gateway) -> None:
    """Issue 20: after /auth?logout the same token used to keep working."""
    gw: Gateway = make_gateway(simulator.url)
    with httpx.Client(base_url=gw.url) as c:
        login = c.get("/auth?login", headers={"Authorization": _basic("me", gw.keys["viewer"])})
        assert login.status_code == 200, login.text
        token = login.json()["session"]
        cookie = {"Cookie": f"session={token}"}
        c.cookies.clear()
        assert c.get(SUPERVISOR, headers=cookie).status_code == 200
        out = c.get("/auth?logout", headers=cookie)
        assert out.status_code == 204
        assert "Max-Age=0" in out.headers["set-cookie"]
        c.cookies.clear()
        replay = c.get(SUPERVISOR, headers=cookie)
        assert replay.status_code == 401, replay.text
        assert replay.headers["content-type"] == "application/problem+json"


def test_a_session_cannot_mint_a_fresh_session(simulator: Simulator, make_gateway) -> None:
    """Issue 20: /auth?login with only a session cookie used to mint a new 24 h session."""
    gw: Gateway = make_gateway(simulator.url)
    with httpx.Client(base_url=gw.url) as c:
        token = c.get("/auth?login", headers={"Authorization": _basic("me", gw.keys["viewer"])}).json()["session"]
        c.cookies.clear()
        renew = c.get("/auth?login", headers={"Cookie": f"session={token}"})
        assert renew.status_code == 401, renew.text
        assert "set-cookie" not in renew.headers and "session" not in renew.json()
        assert renew.headers["www-authenticate"].startswith("Basic")
        assert c.get(SUPERVISOR, headers={"Cookie": f"session={token}"}).status_code == 200  # the old one still works


def test_a_revoked_key_ends_its_sessions(simulator: Simulator, make_gateway) -> None:
    gw: Gateway = make_gateway(simulator.url)
    gw.add_key("tablet")
    with httpx.Client(base_url=gw.url) as c:
        deadline = time.monotonic() + 10
        while (login := c.get("/auth?login", headers={"Authorization": _basic("t", gw.keys["tablet"])})).status_code != 200:
            assert time.monotonic() < deadline, login.text  # the gateway picks the new key up
            time.sleep(0.2)
        cookie = {"Cookie": f"session={login.json()['session']}"}
        c.cookies.clear()
        assert c.get(SUPERVISOR, headers=cookie).status_code == 200
        keystore.revoke_key(gw.workdir / "keys.json", "tablet")
        deadline = time.monotonic() + 10
        while c.get(SUPERVISOR, headers=cookie).status_code != 401:
            assert time.monotonic() < deadline, "the session outlived its revoked key"
            time.sleep(0.2)


def test_a_restart_without_redis_ends_sessions(simulator: Simulator, make_gateway) -> None:
    """The revocation list lived in memory: honouring old tokens after a restart would revive logged-out ones."""
    gw: Gateway = make_gateway(simulator.url)
    with httpx.Client(base_url=gw.url) as c:
        token = c.get("/auth?login", headers={"Authorization": _basic("me", gw.keys["viewer"])}).json()["session"]
        c.cookies.clear()
        assert c.get(SUPERVISOR, headers={"Cookie": f"session={token}"}).status_code == 200
    gw.stop()
    # Same keys file (the viewer key is not rotated: only a new one is added), same session secret.
    again = start_gateway(gw.workdir, simulator.url, key_roles={"spare": "viewer"})
    try:
        secret = (gw.workdir / "certs" / "session.key").read_bytes()
        assert SessionSigner(secret).verify(token) is not None  # the token itself is still authentic
        with httpx.Client(base_url=again.url) as c:
            assert c.get(SUPERVISOR, headers={"Authorization": f"Bearer {gw.keys['viewer']}"}).status_code == 200  # the key lives
            assert c.get(SUPERVISOR, headers={"Cookie": f"session={token}"}).status_code == 401
    finally:
        again.stop()


@pytest.fixture
def localapi_simulator(make_simulator) -> Simulator:
    return make_simulator("--firmware", "localapi", "--serial", SERIAL, "--latency-scale", "0.05", "--clock", "12:00")


def test_homebridge_logs_in_with_the_pvs_password_from_the_lan(localapi_simulator: Simulator, make_gateway) -> None:
    """Issue 21 item 2: homebridge-pvs6 sends the PVS's own login, then reads /vars with the cookie."""
    gw: Gateway = make_gateway(
        localapi_simulator.url,
        {"upstream": {"firmware": "localapi", "serial": SERIAL}, "auth": {"allow_anonymous_from": ["127.0.0.0/8"]}},
    )
    with httpx.Client(base_url=gw.url, timeout=10) as c:  # homebridge's 10 s timeout
        login = c.get("/auth?login", headers={"Authorization": _basic("ssm_owner", PVS_PASSWORD)})
        assert login.status_code == 200, login.text
        token = login.json()["session"]
        assert list(login.json()) == ["session"]
        assert login.cookies.get("session") == token and "HttpOnly" in login.headers["set-cookie"]
        for match in ("/sys/livedata/", "/sys/devices/meter/"):
            r = c.get("/vars", params={"match": match, "fmt": "obj"})
            assert r.status_code == 200, r.text
            assert any(k.startswith(match) for k in r.json())
        assert c.get("/stats").status_code == 403  # a viewer
        wrong = c.get("/auth?login", headers={"Authorization": _basic("ssm_owner", "A0001")})
        assert wrong.status_code == 401
    assert PVS_PASSWORD not in gw.logs()


def test_the_pvs_password_is_refused_off_the_lan_and_counts_as_a_failure(localapi_simulator: Simulator, make_gateway) -> None:
    gw: Gateway = make_gateway(
        localapi_simulator.url,
        {
            "upstream": {"firmware": "localapi", "serial": SERIAL},
            "auth": {"allow_anonymous_from": ["192.168.77.0/24"]},
            "server": {"trusted_proxies": ["127.0.0.1/32"]},
            "ratelimit": {"auth_failures": "3/minute"},
        },
    )
    outside = {"X-Forwarded-For": "203.0.113.9", "Authorization": _basic("ssm_owner", PVS_PASSWORD)}
    with httpx.Client(base_url=gw.url) as c:
        codes = [c.get("/auth?login", headers=outside).status_code for _ in range(4)]
        assert codes[:3] == [401, 401, 401] and codes[3] == 429, codes
        lan = {"X-Forwarded-For": "192.168.77.5", "Authorization": _basic("ssm_owner", PVS_PASSWORD)}
        assert c.get("/auth?login", headers=lan).status_code == 200


def test_pvs_logins_from_the_lan_are_not_failures(localapi_simulator: Simulator, make_gateway) -> None:
    gw: Gateway = make_gateway(
        localapi_simulator.url,
        {
            "upstream": {"firmware": "localapi", "serial": SERIAL},
            "auth": {"allow_anonymous_from": ["127.0.0.0/8"]},
            "ratelimit": {"auth_failures": "3/minute"},
        },
    )
    with httpx.Client(base_url=gw.url) as c:
        codes = [c.get("/auth?login", headers={"Authorization": _basic("ssm_owner", PVS_PASSWORD)}).status_code for _ in range(5)]
    assert codes == [200] * 5


def test_a_logout_at_one_gateway_ends_the_session_at_the_other(redis_url: str, simulator: Simulator, make_gateway) -> None:
    """Two replicas sharing Redis (and, as they must, the session secret and the keys file)."""
    shared = {"cluster": {"redis_url": redis_url}, "auth": {"session_secret": "one-secret-for-both-replicas-" + "x" * 8}}
    first: Gateway = make_gateway(simulator.url, shared)
    second: Gateway = make_gateway(
        simulator.url, {**shared, "auth": {**shared["auth"], "keys_file": str(first.workdir / "keys.json")}}, key_roles={"spare": "viewer"}
    )
    with httpx.Client(base_url=first.url) as a, httpx.Client(base_url=second.url) as b:
        token = a.get("/auth?login", headers={"Authorization": _basic("me", first.keys["viewer"])}).json()["session"]
        a.cookies.clear()
        cookie = {"Cookie": f"session={token}"}
        deadline = time.monotonic() + 10
        while b.get(SUPERVISOR, headers=cookie).status_code != 200:  # honoured once b has read the shared list
            assert time.monotonic() < deadline, "the other replica never honoured the session"
            time.sleep(0.2)
        assert a.get("/auth?logout", headers=cookie).status_code == 204
        ended = time.monotonic()
        while b.get(SUPERVISOR, headers=cookie).status_code != 401:
            assert time.monotonic() - ended < 5, "the logout did not reach the other replica"
            time.sleep(0.1)
        assert a.get(SUPERVISOR, headers=cookie).status_code == 401


def test_a_pvs_login_session_is_refused_off_the_lan(localapi_simulator: Simulator, make_gateway) -> None:
    gw: Gateway = make_gateway(
        localapi_simulator.url,
        {
            "upstream": {"firmware": "localapi", "serial": SERIAL},
            "auth": {"allow_anonymous_from": ["192.168.77.0/24"]},
            "server": {"trusted_proxies": ["127.0.0.1/32"]},
        },
    )
    with httpx.Client(base_url=gw.url) as c:
        login = c.get("/auth?login", headers={"X-Forwarded-For": "192.168.77.5", "Authorization": _basic("ssm_owner", PVS_PASSWORD)})
        assert login.status_code == 200, login.text
        c.cookies.clear()
        cookie = {"Cookie": f"session={login.json()['session']}"}
        assert c.get(SUPERVISOR, headers={**cookie, "X-Forwarded-For": "192.168.77.5"}).status_code == 200
        assert c.get(SUPERVISOR, headers={**cookie, "X-Forwarded-For": "203.0.113.9"}).status_code == 401
