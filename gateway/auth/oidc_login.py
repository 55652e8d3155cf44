"""Browser login with OpenID Connect (authlib's Starlette client) and the login session.

Mounting it (``gateway/app.py``)::

    verifier = OIDCVerifier(settings.auth.oidc, client=http_client)
    login = oidc_routes(settings.auth, verifier, secret_key=secret, https_only=True)
    app = Starlette(
        routes=[*login.routes, ...],
        middleware=[..., forwarded-headers, *login.middleware, auth, ratelimit, ...],
    )

and, in the auth layer, ``principal_from_session(scope.get("session") or {})``.
For a request without credentials, answer ``login_redirect(request)`` when
``wants_html(request)``, else 401 problem+json.

``oidc_routes`` returns ``OIDCLogin(routes, middleware)``:

* ``routes``: ``GET /auth/login`` (``oidc_login``), ``GET /auth/callback``
  (``oidc_callback``), ``GET /auth/logout`` (``oidc_logout``). Paths are
  relative to the app, so ``root_path`` applies; HEAD works as GET.
* ``middleware``: ``SessionMiddleware`` (cookie ``pvsgw_session``, signed with
  ``secret_key`` by itsdangerous, ``HttpOnly``, ``SameSite=Lax``, ``Secure``
  when ``https_only``, ``Max-Age`` = the login lifetime) followed by
  ``OIDCSessionMiddleware``, which ends expired sessions, drops sessions made
  under a different policy (issuer, client or allow-lists changed), and
  refreshes identities whose refresh is due. Both must sit outside (before)
  the gateway's auth middleware.

Flow: ``/auth/login?next=/path`` redirects to the provider with the
authorization code flow, PKCE (S256), ``state`` and ``nonce`` (authlib keeps
them in the session). ``next`` must be a same-site path (``/...``, not
``//host`` or ``/\\host``, no scheme, under ``root_path``); anything else
falls back to the app root. ``/auth/callback`` checks the ``iss`` response
parameter when present (RFC 9207), lets authlib exchange the code (checking
state and the ID token's nonce), re-verifies the ID token with the
verifier's algorithm allow-list, merges userinfo claims (``sub`` must match),
and maps them with ``OIDCVerifier.principal_from_claims``: not admitted ->
403 problem+json. The redirect URI is ``request.url_for("oidc_callback")``:
scheme, host and ``root_path`` come from the scope, which the gateway's
forwarded-header middleware rewrites for trusted proxies only; nothing here
reads X-Forwarded-*. Register ``<base>/auth/callback`` as the redirect URI
and ``<base>/auth/logout`` as the post-logout redirect URI at the provider.

The session stores only ``{"oidc": {sub, name, email, role, iat, exp, pol,
sid, chk, ref, [rt]}}`` plus authlib's transient login state. ``exp`` is
absolute: ``iat + min(auth.session_lifetime, auth.oidc.session_lifetime)``;
nothing extends it. ``sid`` names the login's server-side record in the
gateway's ``SessionStore`` (``gateway.auth.sessions``): ``/auth/logout``
revokes it, so a replayed copy of the cookie is refused afterwards (and, as
for every gateway session, a restart without ``cluster.redis_url`` ends it).

**Group changes take effect within ``auth.oidc.recheck_interval``** (default
300 s). ``chk`` is when the provider last confirmed the identity, ``ref`` when
it is asked again: ``chk + recheck_interval``, or sooner when the access
token expires sooner. Then the identity is refreshed at the token endpoint
with the refresh token (stored encrypted: AES-GCM, key derived from
``secret_key``; the cookie itself is only signed) and re-mapped: a demoted
user gets the new role, a refused refresh or a user no longer allowed ends
the session. Without a refresh token there is no way to ask, so the session
ends at ``ref`` (the browser logs in again; request the provider's
``offline_access`` scope to avoid it). An unreachable provider is asked again
every minute, and once the identity is ``2 × recheck_interval`` old without a
confirmation the session ends: the bound holds even while the provider is
down.

``/auth/logout`` revokes and clears the session and, if the provider advertises an
``end_session_endpoint``, redirects there (RP-initiated logout, with
``client_id`` and ``post_logout_redirect_uri`` = ``<base>/auth/logout``);
coming back, or without a session, it shows a small "signed out" page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import math
import secrets
import time
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import httpx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import OIDC_COOKIE, ROLES, Principal
from gateway.auth.oidc import (
    AuthFailed,
    Forbidden,
    OIDCError,
    OIDCVerifier,
    ProviderUnavailable,
)
from gateway.auth.sessions import SessionSigner, SessionStore
from gateway.errors import PROBLEM_TYPE, problem_body
from gateway.settings import AuthSettings

with warnings.catch_warnings():
    # authlib prefers the httpx2 fork and warns once on import when it finds
    # httpx instead; the gateway deliberately pins httpx 0.28 (pyproject.toml).
    warnings.filterwarnings("ignore", message="The httpx module is deprecated", category=DeprecationWarning)
    from authlib.integrations.starlette_client import OAuth, OAuthError

log = logging.getLogger("gateway.auth.oidc")

SESSION_KEY = "oidc"
#: Refresh this long before the access token would expire ...
REFRESH_MARGIN = 60.0
#: ... but not more often than this, and after this long when the provider gives no expiry.
MIN_REFRESH_INTERVAL = 60.0
DEFAULT_REFRESH_INTERVAL = 300.0
#: After the provider could not be reached for a refresh, try again after this long.
REFRESH_RETRY = 60.0
#: Paths that are API endpoints: never redirected to a login page.
API_PATHS = ("/api/", "/cgi-bin/", "/vars", "/auth/verify", "/metrics", "/stats", "/healthz", "/readyz")
_METADATA_KEYS = ("issuer", "authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri", "end_session_endpoint")


class OIDCLogin(NamedTuple):
    """What the app mounts: ``routes`` and ``middleware`` (in this order, outside auth)."""

    routes: list[Route]
    middleware: list[Middleware]


# ---------------------------------------------------------------- helpers for the auth layer


def principal_from_session(session: Mapping[str, Any] | None, *, now: float | None = None) -> Principal | None:
    """The signed-in identity in a (Starlette) session, or None if absent, malformed or expired."""
    ident = session.get(SESSION_KEY) if session else None
    if not isinstance(ident, dict):
        return None
    sub, name, role, exp = ident.get("sub"), ident.get("name"), ident.get("role"), ident.get("exp")
    if not (isinstance(sub, str) and sub and isinstance(name, str) and role in ROLES):
        return None
    if not isinstance(exp, (int, float)) or (time.time() if now is None else now) >= exp:
        return None
    return Principal(id=f"oidc:{sub}", name=name, role=role, method="oidc")


def wants_html(request: Request, *, api_paths: tuple[str, ...] = API_PATHS) -> bool:
    """True when a browser asks for a page: redirect it to login rather than answer 401.

    Accept must name ``text/html`` (or XHTML) explicitly with a quality at least
    that of ``application/json`` (``*/*`` alone, as curl sends, is not enough),
    and the path must not be an API path (``api_paths``, after ``root_path``).
    """
    path = _app_path(request)
    if any(path == p.rstrip("/") or path.startswith(p) for p in api_paths):
        return False
    html_q, json_q = 0.0, 0.0
    for item in request.headers.get("accept", "").split(","):
        media, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media in ("text/html", "application/xhtml+xml"):
            html_q = max(html_q, q)
        elif media in ("application/json", "application/problem+json"):
            json_q = max(json_q, q)
    return html_q > 0 and html_q >= json_q


def login_redirect(request: Request) -> RedirectResponse:
    """303 to ``/auth/login?next=<this page>`` (for browsers without a session)."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = str(request.url_for("oidc_login").include_query_params(next=here))
    return RedirectResponse(_relative(target), status_code=303, headers={"Cache-Control": "no-store"})


def safe_next(value: str | None, root_path: str = "") -> str:
    """``value`` if it is a same-site path under ``root_path``, else ``root_path + "/"``."""
    fallback = (root_path or "") + "/"
    if not value or len(value) > 2048 or not value.startswith("/") or value.startswith("//"):
        return fallback
    if "\\" in value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return fallback  # browsers read "/\\evil" as "//evil"; no whitespace or controls
    parts = urllib.parse.urlsplit(value)
    if parts.scheme or parts.netloc:
        return fallback
    if root_path and not (parts.path == root_path or parts.path.startswith(root_path + "/")):
        return fallback
    return value


def _app_path(request: Request) -> str:
    root = request.scope.get("root_path", "")
    path = request.url.path
    return path[len(root) :] if root and path.startswith(root) else path


def _relative(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))


def _problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(problem_body(status, detail), status_code=status, media_type=PROBLEM_TYPE, headers={"Cache-Control": "no-store", **(headers or {})})


def _error_response(exc: OIDCError) -> Response:
    return _problem(exc.status, exc.detail, dict(exc.headers))


# ---------------------------------------------------------------- refresh-token sealing


class _Sealer:
    """AES-GCM with a key derived from the session secret: refresh tokens never sit readable in the cookie."""

    def __init__(self, secret_key: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pvs-gateway oidc refresh token v1").derive(secret_key.encode())
        self._aead = AESGCM(key)

    def seal(self, value: str) -> str:
        nonce = secrets.token_bytes(12)
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, value.encode(), b"rt")).decode()

    def open(self, value: str) -> str | None:
        try:
            raw = base64.urlsafe_b64decode(value)
            return self._aead.decrypt(raw[:12], raw[12:], b"rt").decode()
        except (ValueError, InvalidTag, UnicodeDecodeError):
            return None


# ---------------------------------------------------------------- the login itself


class _Login:
    def __init__(
        self, settings: AuthSettings, verifier: OIDCVerifier, *, secret_key: str, clock: Callable[[], float], sessions: SessionStore
    ) -> None:
        self.settings = settings
        self.oidc = settings.oidc
        self.verifier = verifier
        self.clock = clock
        self.sessions = sessions
        self.lifetime = min(settings.session_lifetime, settings.oidc.session_lifetime)
        self.recheck = settings.oidc.recheck_interval
        self.sealer = _Sealer(secret_key)
        oauth = OAuth()
        oauth.register(
            name="oidc",
            client_id=self.oidc.client_id,
            client_secret=self.oidc.client_secret.get(),
            client_kwargs={
                "scope": " ".join(self.oidc.scopes),
                "code_challenge_method": "S256",
                "token_endpoint_auth_method": "client_secret_basic",
                "timeout": self.oidc.timeout,
            },
        )
        self.client = oauth.create_client("oidc")
        # Recent refresh outcomes by refresh-token hash, so parallel requests share one refresh.
        self._recent: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def _prime(self) -> dict[str, Any]:
        """Hand authlib the verifier's validated metadata (only the endpoints) and keys.

        authlib is given no ``server_metadata_url``: it would pass every key of
        the discovery document to its HTTP client as keyword arguments.
        """
        metadata = await self.verifier.discovery()
        for name in ("authorization_endpoint", "token_endpoint"):
            if not isinstance(metadata.get(name), str):
                raise ProviderUnavailable(f"the provider's discovery document has no {name}")
        self.client.server_metadata.update(
            {k: metadata[k] for k in _METADATA_KEYS if isinstance(metadata.get(k), str)},
            jwks=await self.verifier.jwks(),
            id_token_signing_alg_values_supported=list(self.verifier.algorithms),
        )
        return metadata

    # ------------------------------------------------------------ routes

    async def login(self, request: Request) -> Response:
        try:
            await self._prime()
        except OIDCError as exc:
            return _error_response(exc)
        root = request.scope.get("root_path", "")
        request.session["_oidc_next"] = safe_next(request.query_params.get("next"), root)
        redirect_uri = str(request.url_for("oidc_callback"))
        response = await self.client.authorize_redirect(request, redirect_uri)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def callback(self, request: Request) -> Response:
        try:
            metadata = await self._prime()
            iss = request.query_params.get("iss")
            if iss is not None and iss != metadata.get("issuer"):
                raise AuthFailed("the authorization response comes from another issuer (iss mismatch)")
            try:
                token = await self.client.authorize_access_token(request, leeway=int(self.oidc.leeway))
            except OAuthError as exc:
                if exc.error == "mismatching_state":
                    return _problem(400, "This login link expired or was opened in another browser; start again at /auth/login.")
                raise AuthFailed(f"login failed at the identity provider: {exc.error}" + (f" ({exc.description})" if exc.description else "")) from None
            if not isinstance(token.get("id_token"), str) or "userinfo" not in token:
                # authlib puts "userinfo" there only after checking the ID token and its nonce.
                raise AuthFailed("the provider returned no ID token (is 'openid' in auth.oidc.scopes?)")
            claims = await self._claims(token)
            if not isinstance(claims.get("sub"), str):
                raise AuthFailed("the provider gave no subject (sub) for this login")
            principal = self.verifier.principal_from_claims(claims, method="oidc")
        except Forbidden as exc:
            request.session.clear()
            return _error_response(exc)
        except OIDCError as exc:
            return _error_response(exc)
        except Exception as exc:
            log.warning("OIDC callback failed: %s: %s", type(exc).__name__, exc)
            if _is_network_error(exc):
                return _error_response(ProviderUnavailable(f"the identity provider could not be reached: {type(exc).__name__}"))
            return _error_response(AuthFailed("login failed: the identity provider's answer did not verify"))
        next_url = safe_next(request.session.get("_oidc_next"), request.scope.get("root_path", ""))
        await self._end(request.session)  # a previous identity in this browser ends here
        request.session.clear()  # drop authlib's state too
        record = self.sessions.open(principal.id, self.lifetime)
        request.session[SESSION_KEY] = self._identity(principal, claims, token, iat=record.issued, exp=record.expires, sid=record.sid)
        log.info("OIDC login: %s as %s", principal.id, principal.role)
        return RedirectResponse(next_url, status_code=303, headers={"Cache-Control": "no-store"})

    async def logout(self, request: Request) -> Response:
        had_identity = isinstance(request.session.get(SESSION_KEY), dict)
        await self._end(request.session)  # server-side: a replayed copy of the cookie is refused from now on
        request.session.clear()
        if had_identity:
            try:
                metadata = await self.verifier.discovery()
            except OIDCError:
                metadata = {}
            end = metadata.get("end_session_endpoint")
            if isinstance(end, str) and end.startswith(("https://", "http://")):
                params = {
                    "client_id": self.oidc.client_id,
                    "post_logout_redirect_uri": str(request.url_for("oidc_logout")),
                }
                sep = "&" if urllib.parse.urlsplit(end).query else "?"
                return RedirectResponse(end + sep + urllib.parse.urlencode(params), status_code=303, headers={"Cache-Control": "no-store"})
        login = html.escape(_relative(str(request.url_for("oidc_login"))))
        page = f"<!doctype html><title>Signed out</title><p>You are signed out of pvs-gateway.</p><p><a href=\"{login}\">Sign in again</a></p>"
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------ identity

    async def _claims(self, token: Mapping[str, Any], *, sub: str | None = None) -> dict[str, Any]:
        """Verified ID-token claims merged with userinfo (ID token wins; ``sub`` must agree).

        Empty when the token response has neither an ID token nor an access
        token that userinfo accepts (possible on refresh).
        """
        id_claims: dict[str, Any] = {}
        id_token = token.get("id_token")
        if isinstance(id_token, str):
            id_claims = await self.verifier.verify_id_token(id_token)
        expected_sub = id_claims.get("sub") or sub
        info: dict[str, Any] = {}
        access_token = token.get("access_token")
        if isinstance(access_token, str):
            try:
                info = await self.verifier.userinfo(access_token)
            except AuthFailed as exc:
                log.info("OIDC: userinfo refused the access token (%s); using the ID token alone", exc.reason)
        if info and info.get("sub") != expected_sub:
            raise AuthFailed("userinfo describes a different subject than the ID token")
        merged = {**info, **id_claims}
        if sub is not None and merged and merged.get("sub") != sub:
            raise AuthFailed("the refreshed identity has a different subject")
        return merged

    def _identity(
        self, principal: Principal, claims: Mapping[str, Any], token: Mapping[str, Any], *, iat: float, exp: float, sid: str
    ) -> dict[str, Any]:
        """The cookie's identity, just confirmed by the provider (``chk`` = now)."""
        email = claims.get("email")
        now = self.clock()
        ident: dict[str, Any] = {
            "sub": principal.id.removeprefix("oidc:"),
            "name": principal.name,
            "email": email if isinstance(email, str) else None,
            "role": principal.role,
            "iat": int(iat),
            "exp": int(exp),
            "pol": self.verifier.policy_fingerprint,
            "sid": sid,
            "chk": int(now),
            "ref": int(now + self.recheck),
        }
        refresh_token = token.get("refresh_token")
        if isinstance(refresh_token, str) and refresh_token:
            ident["rt"] = self.sealer.seal(refresh_token)
            ident["ref"] = int(now + min(self.recheck, _refresh_interval(token.get("expires_in"))))
        return ident

    async def _end(self, session: Mapping[str, Any]) -> None:
        """Revoke the session's server-side record (logout, or a refresh that ended it)."""
        ident = session.get(SESSION_KEY)
        if isinstance(ident, dict) and isinstance(ident.get("sid"), str):
            exp = ident.get("exp")
            await self.sessions.revoke(ident["sid"], exp if isinstance(exp, (int, float)) else None)

    async def maintain(self, session: dict[str, Any]) -> None:
        """End expired, revoked or stale-policy sessions; re-check the identity when due."""
        ident = session.get(SESSION_KEY)
        if not isinstance(ident, dict):
            return
        now = self.clock()
        exp, sub, sid = ident.get("exp"), ident.get("sub"), ident.get("sid")
        if not isinstance(exp, (int, float)) or now >= exp or ident.get("pol") != self.verifier.policy_fingerprint:
            session.pop(SESSION_KEY, None)
            return
        if not isinstance(sid, str) or self.sessions.active(sid, f"oidc:{sub}", exp) is None:
            session.pop(SESSION_KEY, None)  # logged out (or a cookie from before sessions were recorded)
            return
        ref = ident.get("ref")
        if isinstance(ref, (int, float)) and now < ref:
            return
        sealed = ident.get("rt")
        refresh_token = self.sealer.open(sealed) if isinstance(sealed, str) else None
        if refresh_token is None:
            # No way to ask the provider again: the identity's time is up (module docstring).
            log.info("OIDC session of oidc:%s ended: no refresh token to re-check its groups", sub)
            await self._end(session)
            session.pop(SESSION_KEY, None)
            return
        key = hashlib.sha256(refresh_token.encode()).hexdigest()
        recent = self._recent.get(key)
        if recent is not None and recent[0] > now:
            outcome = recent[1]
        else:
            outcome = await self._refresh(ident, refresh_token, now)
            self._remember(key, now, outcome)
        if outcome is None:
            await self._end(session)
            session.pop(SESSION_KEY, None)
        else:
            session[SESSION_KEY] = outcome

    async def _refresh(self, ident: dict[str, Any], refresh_token: str, now: float) -> dict[str, Any] | None:
        """The refreshed identity, the same one retried later (IdP down), or None (session over)."""
        try:
            token = await self.verifier.refresh(refresh_token)
            token = {"refresh_token": refresh_token, **token}  # the provider may keep the old one
            claims = await self._claims(token, sub=ident["sub"])
            if not claims:
                # The provider accepted the refresh (the account is still good) but told us nothing new.
                rt = self.sealer.seal(token["refresh_token"])
                ref = now + min(self.recheck, _refresh_interval(token.get("expires_in")))
                return {**ident, "rt": rt, "chk": int(now), "ref": int(ref)}
            principal = self.verifier.principal_from_claims(claims, method="oidc")
        except ProviderUnavailable as exc:
            checked = ident.get("chk")
            if not isinstance(checked, (int, float)) or now - checked >= 2 * self.recheck:
                log.warning("OIDC session of oidc:%s ended: its groups could not be re-checked for %.0f s (%s)",
                            ident.get("sub"), 2 * self.recheck, exc.reason)
                return None
            log.warning("OIDC refresh for oidc:%s postponed: %s", ident.get("sub"), exc.reason)
            return {**ident, "ref": int(now + min(REFRESH_RETRY, self.recheck))}
        except (AuthFailed, Forbidden) as exc:
            log.info("OIDC session of oidc:%s ended at refresh: %s", ident.get("sub"), exc.reason)
            return None
        return self._identity(principal, claims, token, iat=ident["iat"], exp=ident["exp"], sid=ident["sid"])

    def _remember(self, key: str, now: float, outcome: dict[str, Any] | None) -> None:
        if len(self._recent) > 1024:
            self._recent = {k: v for k, v in self._recent.items() if v[0] > now}
        self._recent[key] = (now + REFRESH_RETRY, outcome)


def _refresh_interval(expires_in: Any) -> float:
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and math.isfinite(expires_in):
        return max(MIN_REFRESH_INTERVAL, float(expires_in) - REFRESH_MARGIN)
    return DEFAULT_REFRESH_INTERVAL


def _is_network_error(exc: BaseException) -> bool:
    return isinstance(exc, (httpx.TransportError, TimeoutError))


class OIDCSessionMiddleware:
    """Keeps the login session honest before the auth layer reads it (see module docstring)."""

    def __init__(self, app: ASGIApp, *, login: _Login) -> None:
        self.app = app
        self.login = login

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            session = scope.get("session")
            if session and SESSION_KEY in session:
                await self.login.maintain(session)
        await self.app(scope, receive, send)


def oidc_routes(
    settings: AuthSettings,
    verifier: OIDCVerifier,
    *,
    secret_key: str,
    https_only: bool,
    cookie_path: str = "/",
    clock: Callable[[], float] = time.time,
    sessions: SessionStore | None = None,
) -> OIDCLogin:
    """Routes and middleware for the browser login (see the module docstring).

    ``secret_key`` signs the session cookie and seals refresh tokens (keep it
    stable across restarts, at least 32 random bytes); ``https_only`` marks the
    cookie ``Secure`` (false only for plain-HTTP tests); ``cookie_path`` is
    the cookie's ``Path`` (the ``root_path`` when mounted under one);
    ``sessions`` holds the logins' server-side records (the gateway's store,
    shared with ``/auth?login``; a private one, on ``clock``, when omitted).
    """
    if len(secret_key) < 16:
        raise ValueError("the session secret must be at least 16 characters")
    if sessions is None:
        sessions = SessionStore(SessionSigner(secret_key.encode()), clock=clock)
    login = _Login(settings, verifier, secret_key=secret_key, clock=clock, sessions=sessions)
    routes = [
        Route("/auth/login", login.login, methods=["GET"], name="oidc_login"),
        Route("/auth/callback", login.callback, methods=["GET"], name="oidc_callback"),
        Route("/auth/logout", login.logout, methods=["GET"], name="oidc_logout"),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=secret_key,
            session_cookie=OIDC_COOKIE,
            max_age=max(60, int(login.lifetime)),
            path=cookie_path or "/",
            same_site="lax",
            https_only=https_only,
        ),
        Middleware(OIDCSessionMiddleware, login=login),
    ]
    return OIDCLogin(routes=routes, middleware=middleware)
