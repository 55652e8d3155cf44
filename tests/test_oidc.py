"""OIDC: bearer JWTs and the browser login, against a real OpenID provider on 127.0.0.1.

The provider is panva/oidc-provider (tests/oidc/provider.mjs, started by
tests/oidc_provider.py). Tests that need it skip only when its node_modules
are missing; the pure tests (claim mapping, ``next`` and Accept handling) always run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.auth import OIDC_COOKIE, Principal
from gateway.auth.oidc import (
    AuthFailed,
    Forbidden,
    OIDCVerifier,
    ProviderUnavailable,
    _import_keys,
    claim_groups,
)
from gateway.auth.oidc_login import (
    _Login,
    login_redirect,
    oidc_routes,
    principal_from_session,
    safe_next,
    wants_html,
)
from gateway.auth.sessions import SessionSigner, SessionStore
from gateway.errors import PROBLEM_TYPE, problem_body
from gateway.settings import AuthSettings, OIDCSettings
from tests.oidc_provider import (
    OTHER_RESOURCE,
    SKIP_REASON,
    TestProvider,
    b64url,
    browse,
    make_key,
    start_provider,
)

needs_idp = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------- fixtures


class Clock:
    """Wall clock plus an adjustable offset (for session expiry and refresh)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Monotonic:
    """A monotonic clock the test moves by hand (JWKS cache ages)."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


class ServerThread:
    """uvicorn serving ``app`` on an already-bound socket, in a thread with its own loop."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        self.sock = sock
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test app did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def base_url(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def app_socket() -> Iterator[socket.socket]:
    sock = bound_socket()
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory, app_socket: socket.socket) -> Iterator[TestProvider]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    base = base_url(app_socket)
    with start_provider(
        tmp_path_factory.mktemp("idp"),
        redirect_uris=[base + "/auth/callback"],
        post_logout_redirect_uris=[base + "/auth/logout"],
    ) as provider:
        yield provider


class JWKSCounter:
    """An ``httpx.AsyncClient`` event hook counting requests by path."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.paths.append(request.url.path)

    def count(self, suffix: str) -> int:
        return sum(1 for p in self.paths if p.endswith(suffix))


@contextlib.asynccontextmanager
async def make_verifier(settings: OIDCSettings, **kw: Any) -> AsyncIterator[tuple[OIDCVerifier, JWKSCounter]]:
    counter = JWKSCounter()
    async with httpx.AsyncClient(event_hooks={"request": [counter]}) as client:
        yield OIDCVerifier(settings, client=client, **kw), counter


def make_test_app(idp: TestProvider, *, clock: Clock, https_only: bool = False, **oidc_over: Any) -> Starlette:
    """A tiny gateway stand-in: the login routes and middleware plus two protected routes."""
    oidc = idp.oidc_settings(**{"allowed_groups": ("family",), "admin_groups": ("admins",), **oidc_over})
    settings = AuthSettings(methods=("api_key", "oidc"), session_lifetime=3600, oidc=oidc)
    client = httpx.AsyncClient()
    verifier = OIDCVerifier(oidc, client=client)
    login = oidc_routes(settings, verifier, secret_key="test-secret-" + "x" * 32, https_only=https_only, clock=clock)

    async def protected(request: Request) -> Response:
        principal = principal_from_session(request.session, now=clock())
        if principal is None:
            if wants_html(request):
                return login_redirect(request)
            return Response(problem_body(401, "sign in first"), status_code=401, media_type=PROBLEM_TYPE)
        return JSONResponse({"id": principal.id, "name": principal.name, "role": principal.role, "method": principal.method})

    async def home(request: Request) -> Response:
        return PlainTextResponse("home")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [*login.routes, Route("/protected", protected), Route("/api/v1/summary", protected), Route("/", home)]
    app = Starlette(routes=routes, middleware=login.middleware, lifespan=lifespan)
    app.state.http_client = client
    return app


@pytest.fixture(scope="module")
def app_clock() -> Clock:
    return Clock()


#: The module's app re-checks groups every minute (the default is 300 s); the provider's access tokens last 300 s.
RECHECK = 60.0


@pytest.fixture(scope="module")
def app_url(idp: TestProvider, app_socket: socket.socket, app_clock: Clock) -> Iterator[str]:
    with ServerThread(make_test_app(idp, clock=app_clock, recheck_interval=RECHECK), app_socket):
        yield base_url(app_socket)


@pytest.fixture
def clock(app_clock: Clock) -> Iterator[Clock]:
    app_clock.offset = 0.0
    yield app_clock
    app_clock.offset = 0.0


def session_payload(client: httpx.Client) -> dict[str, Any]:
    """The (signed, not encrypted) session cookie's JSON."""
    value = client.cookies[OIDC_COOKIE]
    data = value.split(".")[0]
    return json.loads(base64.b64decode(data + "=" * (-len(data) % 4)))


def login_as(client: httpx.Client, app_url: str, user: str, path: str = "/protected") -> httpx.Response:
    return browse(client, "GET", app_url + path, login=user)


HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


# ---------------------------------------------------------------- bearer tokens


@needs_idp
@pytest.mark.anyio
async def test_valid_user_token_is_admitted_with_role(idp: TestProvider) -> None:
    alice = idp.user_tokens("alice")["access_token"]
    bob = idp.user_tokens("bob")["access_token"]
    async with make_verifier(idp.oidc_settings(admin_groups=("admins",))) as (verifier, counter):
        p = await verifier.verify_bearer(alice)
        assert (p.id, p.name, p.role, p.method) == ("oidc:alice", "alice@example.test", "admin", "jwt")
        p = await verifier.verify_bearer(bob)
        assert (p.id, p.name, p.role) == ("oidc:bob", "bob@example.test", "viewer")
        # One discovery and one JWKS fetch served both tokens.
        assert counter.count("/.well-known/openid-configuration") == 1
        assert counter.count("/jwks") == 1


@needs_idp
@pytest.mark.anyio
async def test_machine_token_from_client_credentials(idp: TestProvider) -> None:
    token = idp.client_credentials()["access_token"]
    async with make_verifier(idp.oidc_settings(admin_groups=("robots",))) as (verifier, _):
        p = await verifier.verify_bearer(token)
        assert (p.id, p.name, p.role) == ("oidc:pvs-robot", "pvs-robot", "admin")
    async with make_verifier(idp.oidc_settings(allowed_emails=("alice@example.test",))) as (verifier, _):
        with pytest.raises(Forbidden):
            await verifier.verify_bearer(token)


@needs_idp
@pytest.mark.anyio
async def test_audience_defaults_to_client_id(idp: TestProvider) -> None:
    """With no audience configured, tokens must name the client id (oauth2-proxy's rule)."""
    id_token = idp.user_tokens("alice")["id_token"]
    access_for_resource = idp.user_tokens("alice")["access_token"]
    async with make_verifier(idp.oidc_settings(audience="")) as (verifier, _):
        assert (await verifier.verify_bearer(id_token)).id == "oidc:alice"
        with pytest.raises(AuthFailed, match="not for this gateway"):
            await verifier.verify_bearer(access_for_resource)


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{b64url(signature)}"


def _claims_of(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


REJECTIONS = {
    "expired": (lambda idp: idp.mint(exp=int(time.time()) - 120, iat=int(time.time()) - 600), "expired"),
    "not yet valid": (lambda idp: idp.mint(nbf=int(time.time()) + 600), "not yet valid"),
    "issued in the future": (lambda idp: idp.mint(iat=int(time.time()) + 600), "issued in the future"),
    "wrong issuer": (lambda idp: idp.mint(iss="http://127.0.0.1:1"), "another issuer"),
    "wrong audience (minted)": (lambda idp: idp.mint(aud="https://someone-else.test"), "not for this gateway"),
    "wrong audience (real token)": (lambda idp: idp.user_tokens("alice", resource=OTHER_RESOURCE)["access_token"], "not for this gateway"),
    "no exp": (lambda idp: idp.mint(drop=["exp"]), "required claim"),
    "tampered payload": (lambda idp: _tamper(idp.mint(groups=["guests"])), "signature is invalid"),
    "other key, same kid": (lambda idp: idp.mint(key=make_key(idp.signing_key.kid)), "signature is invalid"),
    "alg none": (lambda idp: _forge({"alg": "none", "typ": "JWT"}, _claims_of(idp.mint())), "'none' is not allowed"),
    "alg none, capitalised": (lambda idp: _forge({"alg": "None"}, _claims_of(idp.mint())), "is not allowed"),
    "HS256 with the public key": (lambda idp: _hs256_with_public_key(idp), "'HS256' is not allowed"),
    "not a JWT": (lambda idp: "an-api-key-perhaps", "not a compact JWS"),
    "garbage header": (lambda idp: "e30x.e30.abc", "malformed"),
    "logout token type": (lambda idp: idp.mint(header={"typ": "logout+jwt"}), "not an access or ID token"),
    "alg differs from the key's alg": (lambda idp: idp.mint(header={"alg": "PS256"}, key=_without_alg(idp.signing_key)), "unknown key"),
}


def _without_alg(key: RSAKey) -> RSAKey:
    """The same key material, not tied to one algorithm (so it can sign PS256 too)."""
    return RSAKey.import_key({k: v for k, v in key.as_dict(private=True).items() if k != "alg"})


def _tamper(token: str) -> str:
    head, _, sig = token.split(".")
    claims = _claims_of(token)
    claims["groups"] = ["family", "admins"]
    return f"{head}.{b64url(json.dumps(claims).encode())}.{sig}"


def _hs256_with_public_key(idp: TestProvider) -> str:
    """The classic key-confusion forgery: HMAC keyed with the RSA public key (PEM and JWK forms)."""
    public = idp.signing_key.as_dict(private=False)
    pem = idp.signing_key.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": public["kid"]}
    claims = _claims_of(idp.mint())
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@needs_idp
@pytest.mark.anyio
@pytest.mark.parametrize("case", list(REJECTIONS))
async def test_bad_tokens_are_rejected(idp: TestProvider, case: str) -> None:
    make, reason = REJECTIONS[case]
    token = make(idp)
    async with make_verifier(idp.oidc_settings()) as (verifier, _):
        assert (await verifier.verify_bearer(idp.mint())).id == "oidc:alice"  # the same verifier accepts a good one
        with pytest.raises(AuthFailed, match=reason) as info:
            await verifier.verify_bearer(token)
        assert info.value.status == 401
        assert any(name == "WWW-Authenticate" for name, _ in info.value.headers)


@needs_idp
@pytest.mark.anyio
async def test_leeway_applies_to_exp_and_nbf(idp: TestProvider) -> None:
    now = int(time.time())
    slightly_expired = idp.mint(exp=now - 10, iat=now - 300)
    slightly_early = idp.mint(nbf=now + 10)
    async with make_verifier(idp.oidc_settings(leeway=30)) as (verifier, _):
        await verifier.verify_bearer(slightly_expired)
        await verifier.verify_bearer(slightly_early)
    async with make_verifier(idp.oidc_settings(leeway=0)) as (verifier, _):
        with pytest.raises(AuthFailed, match="expired"):
            await verifier.verify_bearer(slightly_expired)
        with pytest.raises(AuthFailed, match="not yet valid"):
            await verifier.verify_bearer(slightly_early)


@needs_idp
@pytest.mark.anyio
async def test_allow_lists(idp: TestProvider) -> None:
    tokens = {u: idp.mint(sub=u, email=f"{u}@example.test", groups=g) for u, g in [("alice", ["family", "admins"]), ("bob", ["guests"])]}
    carol_unverified = idp.mint(sub="carol", email="carol@example.test", email_verified=False, groups=["family"])
    async with make_verifier(idp.oidc_settings(allowed_emails=("Alice@Example.test",))) as (verifier, _):
        assert (await verifier.verify_bearer(tokens["alice"])).role == "viewer"
        with pytest.raises(Forbidden, match=r"bob@example\.test"):
            await verifier.verify_bearer(tokens["bob"])
    async with make_verifier(idp.oidc_settings(allowed_emails=("carol@example.test",))) as (verifier, _):
        with pytest.raises(Forbidden):  # an unverified address counts for nothing
            await verifier.verify_bearer(carol_unverified)
    async with make_verifier(idp.oidc_settings(allowed_groups=("family",), allowed_emails=("bob@example.test",), admin_groups=("admins",))) as (verifier, _):
        assert (await verifier.verify_bearer(tokens["alice"])).role == "admin"  # by group
        assert (await verifier.verify_bearer(tokens["bob"])).role == "viewer"  # by e-mail
        assert (await verifier.verify_bearer(carol_unverified)).id == "oidc:carol"  # by group
    async with make_verifier(idp.oidc_settings(allowed_groups=("nobody",), admin_groups=("admins",))) as (verifier, _):
        with pytest.raises(Forbidden) as info:  # admin_groups does not admit by itself
            await verifier.verify_bearer(tokens["alice"])
        assert info.value.status == 403


@needs_idp
@pytest.mark.anyio
async def test_unknown_kid_refreshes_once_and_floods_stay_under_the_floor(tmp_path: Path) -> None:
    mono = Monotonic()
    with start_provider(tmp_path, keys=[make_key("old")]) as idp:
        settings = idp.oidc_settings(jwks_min_refresh=60, jwks_max_age=3600)
        async with make_verifier(settings, clock=mono) as (verifier, counter):
            await verifier.verify_bearer(idp.mint())
            assert counter.count("/jwks") == 1

            # The provider rotates to a new key; its first token makes us refetch once.
            idp.rotate([make_key("new"), make_key("old-2")])
            rotated = idp.user_tokens("alice")["access_token"]
            assert json.loads(base64.urlsafe_b64decode(rotated.split(".")[0] + "==")).get("kid") == "new"
            mono.value += 61  # past the floor since the first fetch
            assert (await verifier.verify_bearer(rotated)).id == "oidc:alice"
            assert counter.count("/jwks") == 2

            # A flood of made-up kids within the floor: no request reaches the provider.
            flood = [idp.mint(header={"kid": secrets.token_hex(6)}) for _ in range(50)]
            results = await asyncio.gather(*(verifier.verify_bearer(t) for t in flood), return_exceptions=True)
            assert all(isinstance(r, AuthFailed) and "unknown key" in r.reason for r in results)
            assert counter.count("/jwks") == 2

            # Once the floor has passed, an unknown kid may cause exactly one more fetch.
            mono.value += 61
            results = await asyncio.gather(*(verifier.verify_bearer(t) for t in flood[:10]), return_exceptions=True)
            assert all(isinstance(r, AuthFailed) for r in results)
            assert counter.count("/jwks") == 3

            # The provider goes away: keys we know keep working past max_age; one attempt per floor.
            idp.stop()
            mono.value += 3601
            assert (await verifier.verify_bearer(rotated)).id == "oidc:alice"
            assert (await verifier.verify_bearer(rotated)).id == "oidc:alice"
            assert counter.count("/jwks") + counter.count("openid-configuration") == 3 + 1 + 1


@pytest.mark.anyio
async def test_idp_down_fails_fast_with_a_clear_error() -> None:
    sock = bound_socket()  # bound but not listening: connections are refused
    issuer = base_url(sock)
    token = _forge({"alg": "RS256", "kid": "k"}, {"iss": issuer, "sub": "x", "aud": "gw", "exp": time.time() + 60}, b"sig")
    try:
        settings = OIDCSettings(issuer=issuer, client_id="gw", timeout=2.0)
        async with make_verifier(settings) as (verifier, counter):
            started = time.monotonic()
            with pytest.raises(ProviderUnavailable, match="unreachable") as info:
                await verifier.verify_bearer(token)
            assert time.monotonic() - started < 1.5
            assert info.value.status == 503 and ("Retry-After", "5") in info.value.headers
            # Within the retry delay callers fail at once, without another attempt.
            with pytest.raises(ProviderUnavailable):
                await verifier.verify_bearer(token)
            assert len(counter.paths) == 1
    finally:
        sock.close()


@pytest.mark.anyio
async def test_slow_idp_is_cut_off_at_the_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    issuer = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    token = _forge({"alg": "RS256", "kid": "k"}, {"iss": issuer, "sub": "x", "aud": "gw", "exp": time.time() + 60}, b"sig")
    try:
        async with make_verifier(OIDCSettings(issuer=issuer, client_id="gw", timeout=0.5)) as (verifier, _):
            started = time.monotonic()
            results = await asyncio.gather(*(verifier.verify_bearer(token) for _ in range(5)), return_exceptions=True)
            elapsed = time.monotonic() - started
            assert all(isinstance(r, ProviderUnavailable) and "did not answer within 0.5 s" in r.reason for r in results)
            assert elapsed < 2.0  # five callers shared one bounded attempt
            assert len(accepted) == 1
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@needs_idp
@pytest.mark.anyio
async def test_discovery_issuer_must_match_exactly(idp: TestProvider) -> None:
    async with make_verifier(idp.oidc_settings(issuer=idp.issuer + "/")) as (verifier, _):
        token = idp.mint(iss=idp.issuer + "/")
        with pytest.raises(ProviderUnavailable, match=r"set auth\.oidc\.issuer"):
            await verifier.verify_bearer(token)


# ---------------------------------------------------------------- claim mapping (no provider)


def _verifier(**over: Any) -> OIDCVerifier:
    return OIDCVerifier(OIDCSettings(issuer="https://idp.test", client_id="gw", **over), client=httpx.AsyncClient())


@pytest.mark.parametrize(
    ("claims", "claim", "expected"),
    [
        ({"groups": ["a", "b"]}, "groups", ["a", "b"]),
        ({"groups": "a b"}, "groups", ["a", "b"]),
        ({"groups": "a, b,c"}, "groups", ["a", "b", "c"]),
        ({"groups": [1, "a", None]}, "groups", ["a"]),
        ({"realm_access": {"roles": ["admins"]}}, "realm_access.roles", ["admins"]),
        ({}, "groups", []),
        ({"groups": {"a": 1}}, "groups", []),
    ],
)
def test_claim_groups(claims: dict[str, Any], claim: str, expected: list[str]) -> None:
    assert claim_groups(claims, claim) == expected


def test_jwks_import_keeps_only_public_signature_keys() -> None:
    rsa = make_key("sig").as_dict(private=True)
    enc = {**make_key("enc").as_dict(private=False), "use": "enc"}
    oct_key = {"kty": "oct", "kid": "hmac", "k": b64url(b"a-shared-secret-of-some-length!!")}
    keys, keyless = _import_keys([rsa, enc, oct_key, {"kty": "RSA", "kid": "broken", "n": "x"}, "junk"])
    assert list(keys) == ["sig"] and keyless == []
    assert "d" not in keys["sig"].as_dict(private=False) and not keys["sig"].is_private


def test_principal_names_and_roles() -> None:
    v = _verifier(admin_groups=("admins",), groups_claim="roles")
    p = v.principal_from_claims({"sub": "u1", "preferred_username": "ann", "roles": "users admins"}, method="oidc")
    assert (p.id, p.name, p.role, p.method) == ("oidc:u1", "ann", "admin", "oidc")
    assert v.principal_from_claims({"sub": "u2"}).name == "u2"
    with pytest.raises(AuthFailed):
        v.principal_from_claims({"email": "no-sub@example.test"})


def test_hmac_and_none_are_never_accepted_even_if_configured() -> None:
    v = _verifier(algorithms=("HS256", "none", "RS256"))
    assert v.algorithms == ("RS256",)
    with pytest.raises(ValueError):
        _verifier(algorithms=("HS256",))


@pytest.mark.parametrize(
    ("value", "root", "expected"),
    [
        ("/protected?x=1", "", "/protected?x=1"),
        ("/", "", "/"),
        (None, "", "/"),
        ("//evil.example/x", "", "/"),
        ("/\\evil.example", "", "/"),
        ("https://evil.example/", "", "/"),
        ("javascript:alert(1)", "", "/"),
        ("protected", "", "/"),
        ("/a b", "", "/"),
        ("/x\r\nSet-Cookie: a=b", "", "/"),
        ("/pvs/page", "/pvs", "/pvs/page"),
        ("/other", "/pvs", "/pvs/"),
        ("/pvsevil", "/pvs", "/pvs/"),
    ],
)
def test_safe_next(value: str | None, root: str, expected: str) -> None:
    assert safe_next(value, root) == expected


def _request(path: str, accept: str | None, root_path: str = "") -> Request:
    headers = [(b"accept", accept.encode())] if accept is not None else []
    return Request({"type": "http", "method": "GET", "path": root_path + path, "root_path": root_path, "headers": headers, "query_string": b""})


@pytest.mark.parametrize(
    ("path", "accept", "expected"),
    [
        ("/", HTML["Accept"], True),
        ("/", "*/*", False),
        ("/", None, False),
        ("/", "application/json", False),
        ("/", "application/json, text/html;q=0.5", False),
        ("/", "text/html;q=0.9, application/json;q=0.5", True),
        ("/", "text/html;q=0", False),
        ("/api/v1/summary", HTML["Accept"], False),
        ("/cgi-bin/dl_cgi", HTML["Accept"], False),
        ("/vars", HTML["Accept"], False),
        ("/metrics", HTML["Accept"], False),
        ("/dashboard", HTML["Accept"], True),
    ],
)
def test_wants_html(path: str, accept: str | None, expected: bool) -> None:
    assert wants_html(_request(path, accept)) is expected
    assert wants_html(_request(path, accept, root_path="/pvs")) is expected


def test_principal_from_session() -> None:
    now = time.time()
    ident = {"sub": "alice", "name": "alice@example.test", "role": "admin", "exp": now + 60}
    p = principal_from_session({"oidc": ident}, now=now)
    assert p is not None and (p.id, p.role, p.method) == ("oidc:alice", "admin", "oidc")
    assert principal_from_session({"oidc": ident}, now=now + 61) is None
    assert principal_from_session({"oidc": {**ident, "role": "root"}}, now=now) is None
    assert principal_from_session({"oidc": "alice"}) is None
    assert principal_from_session({}) is None
    assert principal_from_session(None) is None


# ---------------------------------------------------------------- browser login


@needs_idp
def test_browser_login_session_and_logout(idp: TestProvider, app_url: str, clock: Clock) -> None:
    with httpx.Client(timeout=10) as browser:
        # A page without a session sends the browser to login; API clients get 401 JSON.
        r = browser.get(app_url + "/protected", headers=HTML)
        assert r.status_code == 303 and r.headers["location"] == "/auth/login?next=%2Fprotected"
        r = browser.get(app_url + "/api/v1/summary", headers=HTML)
        assert r.status_code == 401 and r.headers["content-type"] == PROBLEM_TYPE

        # /auth/login -> provider login form -> consent -> /auth/callback -> back to /protected.
        seen: list[httpx.Response] = []
        browser.event_hooks["response"] = [seen.append]
        r = browse(browser, "GET", app_url + "/protected", login="alice")
        browser.event_hooks["response"] = []
        assert r.url == app_url + "/protected" and r.status_code == 200
        assert r.json() == {"id": "oidc:alice", "name": "alice@example.test", "role": "admin", "method": "oidc"}

        # The authorization request used PKCE S256, state and nonce.
        auth = next(x for x in seen if str(x.request.url).startswith(idp.issuer + "/auth?"))
        params = urllib.parse.parse_qs(auth.request.url.query.decode())
        assert params["code_challenge_method"] == ["S256"] and params["code_challenge"][0]
        assert params["state"][0] and params["nonce"][0]
        assert params["redirect_uri"] == [app_url + "/auth/callback"]

        # The cookie: HttpOnly, SameSite=Lax, bounded; minimal content, refresh token sealed.
        callback = next(x for x in seen if x.request.url.path == "/auth/callback")
        cookie = callback.headers["set-cookie"].lower()
        assert cookie.startswith(OIDC_COOKIE) and "httponly" in cookie and "samesite=lax" in cookie and "max-age=3600" in cookie
        payload = session_payload(browser)
        assert set(payload) == {"oidc"}
        ident = payload["oidc"]
        assert set(ident) <= {"sub", "name", "email", "role", "iat", "exp", "pol", "rt", "ref", "sid", "chk"}
        assert ident["exp"] - ident["iat"] == 3600
        assert "rt" in ident and len(ident["rt"]) > 40

        # Logout: session cleared, RP-initiated logout at the provider, back to a signed-out page.
        r = browse(browser, "GET", app_url + "/auth/logout")
        assert r.url == app_url + "/auth/logout" and r.status_code == 200 and "signed out" in r.text
        assert OIDC_COOKIE not in browser.cookies or "oidc" not in session_payload(browser)
        r = browser.get(app_url + "/protected", headers={"Accept": "application/json"})
        assert r.status_code == 401
        # The provider's session is gone too: logging in again asks for credentials.
        r = browse(browser, "GET", app_url + "/auth/login")
        assert r.url.host == "127.0.0.1" and str(r.url).startswith(idp.issuer) and 'name="login"' in r.text


@needs_idp
def test_user_outside_the_allow_lists_gets_403(app_url: str, clock: Clock) -> None:
    with httpx.Client(timeout=10) as browser:
        r = login_as(browser, app_url, "bob")
        assert r.url.path == "/auth/callback" and r.status_code == 403
        assert r.headers["content-type"] == PROBLEM_TYPE and "bob@example.test" in r.json()["detail"]
        assert browser.get(app_url + "/protected").status_code == 401


@needs_idp
@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example"])
def test_next_never_leaves_the_site(app_url: str, clock: Clock, target: str) -> None:
    with httpx.Client(timeout=10) as browser:
        start = app_url + "/auth/login?" + urllib.parse.urlencode({"next": target})
        r = browse(browser, "GET", start, login="alice", stop=lambda url: url.startswith(app_url) and "/auth/callback" not in url)
        assert r.request.url.path == "/auth/callback" and r.headers["location"] == "/"


@needs_idp
def test_callback_rejects_forged_or_replayed_responses(idp: TestProvider, app_url: str, clock: Clock) -> None:
    with httpx.Client(timeout=10) as browser:
        r = browser.get(app_url + "/auth/callback", params={"code": "x", "state": "nope"})
        assert r.status_code == 400 and r.headers["content-type"] == PROBLEM_TYPE
        # A real code, but the response claims another issuer (mix-up): refused.
        r = browse(browser, "GET", app_url + "/auth/login", login="alice", stop=lambda url: "/auth/callback" in url)
        callback = r.headers["location"]
        forged = callback.replace("iss=", "iss=https%3A%2F%2Fevil.example&was=")
        assert browser.get(forged).status_code == 401
        assert browser.get(app_url + "/protected").status_code == 401
        # A login the provider refused (error=access_denied) is a 401, not a crash.
        r = browser.get(app_url + "/auth/callback", params={"error": "access_denied", "state": "x"})
        assert r.status_code == 401


@needs_idp
def test_session_cookie_cannot_be_forged(app_url: str, clock: Clock) -> None:
    with httpx.Client(timeout=10) as browser:
        login_as(browser, app_url, "alice")
        value = browser.cookies[OIDC_COOKIE]
        _, rest = value.split(".", 1)
        payload = session_payload(browser)
        payload["oidc"]["sub"] = "mallory"
        forged = base64.b64encode(json.dumps(payload).encode()).decode()
        browser.cookies.clear()
        browser.cookies.set(OIDC_COOKIE, f"{forged}.{rest}", domain="127.0.0.1")
        assert browser.get(app_url + "/protected").status_code == 401


@needs_idp
def test_session_refresh_follows_the_provider_and_ends_at_lifetime(idp: TestProvider, app_url: str, clock: Clock) -> None:
    with httpx.Client(timeout=10) as browser:
        login_as(browser, app_url, "alice")
        assert browser.get(app_url + "/protected").json()["role"] == "admin"
        ref = session_payload(browser)["oidc"]["ref"]
        try:
            # Demoted at the provider: the next refresh (access token near expiry) re-maps the role.
            idp.set_groups("alice", ["family"])
            clock.offset = ref - time.time() + 1
            r = browser.get(app_url + "/protected")
            assert r.json()["role"] == "viewer"
            assert session_payload(browser)["oidc"]["ref"] > ref
            # Removed from every allowed group: the next refresh ends the session.
            idp.set_groups("alice", ["guests"])
            clock.offset += 400
            assert browser.get(app_url + "/protected").status_code == 401
        finally:
            idp.set_groups("alice", ["family", "admins"])

    with httpx.Client(timeout=10) as browser:
        clock.offset = 0
        login_as(browser, app_url, "alice")
        exp = session_payload(browser)["oidc"]["exp"]
        clock.offset = exp - time.time() - 5
        assert browser.get(app_url + "/protected").status_code == 200  # refreshed, still within the lifetime
        clock.offset = exp - time.time() + 1
        assert browser.get(app_url + "/protected").status_code == 401  # the lifetime is absolute


@needs_idp
@pytest.mark.anyio
async def test_cookie_is_secure_when_https_only(idp: TestProvider) -> None:
    app = make_test_app(idp, clock=Clock(), https_only=True)
    transport = httpx.ASGITransport(app=app)
    async with app.state.http_client, httpx.AsyncClient(transport=transport, base_url="https://gw.test") as client:
        r = await client.get("/auth/login", params={"next": "/protected"})
        assert r.status_code == 302 and r.headers["location"].startswith(idp.issuer + "/auth?")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(r.headers["location"]).query)
        assert query["redirect_uri"] == ["https://gw.test/auth/callback"]
        cookie = r.headers["set-cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie and "samesite=lax" in cookie


# ---------------------------------------------------------------- sessions end server-side (issue 20)


@needs_idp
def test_a_replayed_cookie_is_refused_after_logout(app_url: str, clock: Clock) -> None:
    """Issue 20: after /auth/logout a copy of the session cookie still read protected pages."""
    with httpx.Client(timeout=10) as browser:
        login_as(browser, app_url, "alice")
        assert browser.get(app_url + "/protected").json()["role"] == "admin"
        stolen = browser.cookies[OIDC_COOKIE]
        browse(browser, "GET", app_url + "/auth/logout")
    with httpx.Client(timeout=10) as replay:
        replay.cookies.set(OIDC_COOKIE, stolen, domain="127.0.0.1")
        r = replay.get(app_url + "/protected")
        assert r.status_code == 401, r.text


@needs_idp
def test_a_new_login_ends_the_previous_one_in_that_browser(app_url: str, clock: Clock) -> None:
    with httpx.Client(timeout=10) as browser:
        login_as(browser, app_url, "alice")
        first = browser.cookies[OIDC_COOKIE]
        login_as(browser, app_url, "alice", path="/auth/login")
        assert browser.get(app_url + "/protected").status_code == 200
    with httpx.Client(timeout=10) as replay:
        replay.cookies.set(OIDC_COOKIE, first, domain="127.0.0.1")
        assert replay.get(app_url + "/protected").status_code == 401


@needs_idp
def test_removal_from_the_admin_group_takes_effect_within_the_recheck_interval(idp: TestProvider, app_url: str, clock: Clock) -> None:
    """Issue 20: a user removed from the admin group stayed admin until the cookie expired (8 h)."""
    with httpx.Client(timeout=10) as browser:
        login_as(browser, app_url, "alice")
        ident = session_payload(browser)["oidc"]
        assert browser.get(app_url + "/protected").json()["role"] == "admin"
        assert ident["ref"] - ident["chk"] <= RECHECK  # asked again within the interval, not the token's 240 s
        try:
            idp.set_groups("alice", ["family"])
            clock.offset = RECHECK - 5
            assert browser.get(app_url + "/protected").json()["role"] == "admin"  # not yet due
            clock.offset = RECHECK + 1
            assert browser.get(app_url + "/protected").json()["role"] == "viewer"
        finally:
            idp.set_groups("alice", ["family", "admins"])


class _StubVerifier:
    """Stands in for the provider when it cannot be reached (no network needed)."""

    policy_fingerprint = "policy-1"

    def __init__(self) -> None:
        self.refreshes = 0

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        self.refreshes += 1
        raise ProviderUnavailable("connection refused")


class _Now:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _stub_login(recheck: float = 300.0) -> tuple[_Login, _StubVerifier, SessionStore, _Now]:
    now = _Now()
    oidc = OIDCSettings(issuer="https://idp.test", client_id="gw", recheck_interval=recheck)
    store = SessionStore(SessionSigner(b"k" * 32), clock=now)
    verifier = _StubVerifier()
    login = _Login(AuthSettings(oidc=oidc), verifier, secret_key="s" * 32, clock=now, sessions=store)  # type: ignore[arg-type]
    return login, verifier, store, now


def _ident(login: _Login, store: SessionStore, *, refresh_token: str | None) -> dict[str, Any]:
    record = store.open("oidc:alice", 8 * 3600)
    principal = Principal("oidc:alice", "alice", "admin", "oidc")
    token = {"refresh_token": refresh_token} if refresh_token else {}
    return login._identity(principal, {"email": "a@x"}, token, iat=record.issued, exp=record.expires, sid=record.sid)


def test_an_unreachable_provider_cannot_stretch_a_role_past_twice_the_interval() -> None:
    login, verifier, store, now = _stub_login(recheck=300)
    ident = _ident(login, store, refresh_token="rt-1")
    session: dict[str, Any] = {"oidc": dict(ident)}
    for step in range(1, 12):  # asked every minute while the provider is down ...
        now.now += 60
        asyncio.run(login.maintain(session))
        if step * 60 < 600:
            assert principal_from_session(session, now=now.now) is not None, step
    # ... and after 2 x 300 s without an answer the session is over, and stays over.
    assert "oidc" not in session
    assert verifier.refreshes >= 4
    assert store.active(ident["sid"], "oidc:alice", ident["exp"]) is None


def test_without_a_refresh_token_the_role_lasts_one_interval() -> None:
    login, _, store, now = _stub_login(recheck=120)
    ident = _ident(login, store, refresh_token=None)
    session: dict[str, Any] = {"oidc": dict(ident)}
    now.now += 119
    asyncio.run(login.maintain(session))
    assert principal_from_session(session, now=now.now) is not None
    now.now += 2
    asyncio.run(login.maintain(session))
    assert "oidc" not in session
    # and that login's record is revoked: a copy of the old cookie is refused too
    replay: dict[str, Any] = {"oidc": dict(ident)}
    asyncio.run(login.maintain(replay))
    assert "oidc" not in replay


def test_a_revoked_oidc_session_is_refused() -> None:
    login, _, store, _ = _stub_login()
    ident = _ident(login, store, refresh_token="rt-1")
    session: dict[str, Any] = {"oidc": dict(ident)}
    asyncio.run(login.maintain(session))
    assert "oidc" in session
    asyncio.run(store.revoke(ident["sid"]))
    asyncio.run(login.maintain(session))
    assert "oidc" not in session
    # An identity without a recorded session (an old cookie format, or a forged id) is refused as well.
    orphan: dict[str, Any] = {"oidc": {**ident, "sid": "made-up"}}
    asyncio.run(login.maintain(orphan))
    assert "oidc" not in orphan
