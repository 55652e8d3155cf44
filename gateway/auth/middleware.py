"""Authentication and roles, as pure ASGI middleware.

Order of checks for a request:
1. Open paths (/healthz, /readyz, the OIDC login endpoints) pass untouched.
2. Credentials, in this order: Authorization (Bearer API key or JWT, Basic
   with the key as password), X-API-Key, the gateway's ``session`` cookie
   (from /auth?login), the OIDC browser session, a trusted front proxy's user
   header. Presented-but-wrong credentials count as a failure for the IP; an
   IP over ``ratelimit.auth_failures`` gets 429 for them (brute force) until
   its window passes, logged once per window, while valid credentials from it
   are still admitted. Two Authorization or X-API-Key fields: 400.
3. No credentials: a viewer if the IP is in ``allow_anonymous_from``; else
   limited per IP, then a browser asking for a page is sent to the OIDC
   login, anything else gets 401 with ``WWW-Authenticate`` (never a redirect).
4. The route's role: admin views need an admin (403 otherwise).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import LOGIN_COOKIE, PVS_LOGIN, Principal
from gateway.errors import GatewayError
from gateway.middleware.forwarded import Network, in_networks
from gateway.responses import send_problem
from gateway.routetable import RouteTable
from gateway.scopes import client_ip, request_cookie, request_state, route_path

log = logging.getLogger("gateway.auth")


# A presented API key -> its principal, or None.
KeyVerifier = Callable[[str], Principal | None]
# A session cookie's token and the client IP -> its principal, or None.
SessionVerifier = Callable[[str, str], Principal | None]


class PVSLoginCheck(Protocol):
    """The PVS's own LocalAPI login from the LAN (``gateway.local.PVSLogin``)."""

    def allowed(self, scope: Scope, user: str, password: str) -> bool: ...

    def principal(self, scope: Scope) -> Principal: ...
BearerVerifier = Callable[[str], Awaitable[Principal]]
ScopeVerifier = Callable[[Scope], Principal | None]



class AuthFailed(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class AmbiguousCredentials(GatewayError):
    """Two credential fields: proxies and servers disagree on which one counts, so neither does."""

    status = 400


class FailureGate:
    """Per-IP failed-credential counting (brute force), backed by ``limits``."""

    def __init__(
        self,
        hit: Callable[[str], Awaitable[bool]],
        blocked: Callable[[str], Awaitable[float]],
    ) -> None:
        self._hit = hit
        self._blocked = blocked
        self._logged: dict[str, float] = {}

    async def retry_after(self, ip: str) -> float:
        """Seconds until ``ip`` may try again; 0 when it is not blocked."""
        wait = await self._blocked(ip)
        if wait > 0:
            now = time.monotonic()
            # Once per block, never per request: an attacker must not be able to fill the logs.
            if now >= self._logged.get(ip, 0.0):
                if len(self._logged) > 10000:
                    self._logged.clear()
                self._logged[ip] = now + wait
                log.warning("too many failed credentials from %s: refusing it for %.0f s", ip, wait)
        return wait

    async def failed(self, ip: str) -> None:
        await self._hit(ip)


class DeferredJWT:
    """A bearer token that looks like a JWT: verifying it may need the provider's keys (an await)."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token


class Authenticator:
    """Turns a request's credentials into a Principal (or None when it has none)."""

    def __init__(
        self,
        *,
        api_key: KeyVerifier | None,
        session: SessionVerifier | None,
        bearer_jwt: BearerVerifier | None = None,
        browser_session: ScopeVerifier | None = None,
        front_proxy: ScopeVerifier | None = None,
        pvs_login: PVSLoginCheck | None = None,
    ) -> None:
        self._pvs_login = pvs_login
        self._api_key = api_key
        self._session = session
        self._bearer_jwt = bearer_jwt
        self._browser_session = browser_session
        self._front_proxy = front_proxy

    async def authenticate(self, scope: Scope) -> Principal | None:
        found = self.identify(scope)
        if isinstance(found, DeferredJWT):
            assert self._bearer_jwt is not None
            return await self._bearer_jwt(found.token)
        return found

    def identify(self, scope: Scope) -> Principal | DeferredJWT | None:
        """Everything ``authenticate`` does that needs no await; a bearer JWT is handed back to verify.

        Raises ``AuthFailed`` for presented-but-wrong credentials.
        """
        authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is not None:
                    raise AmbiguousCredentials("more than one Authorization field: send exactly one")
                authorization = value
            elif name == b"x-api-key":
                if api_key is not None:
                    raise AmbiguousCredentials("more than one X-API-Key field: send exactly one")
                api_key = value
        credential = authorization if authorization is not None else api_key
        if credential is not None:
            if authorization is not None:
                return self._from_authorization(authorization.decode("latin-1"), scope)
            return self._key(credential.decode("latin-1").strip())
        if self._session is not None:
            token = request_cookie(scope, LOGIN_COOKIE)
            if token:
                principal = self._session(token, client_ip(scope))
                if principal is None:
                    raise AuthFailed("the session has expired or was revoked: log in again")
                return principal
        if self._browser_session is not None:
            principal = self._browser_session(scope)
            if principal is not None:
                return principal
        if self._front_proxy is not None:
            return self._front_proxy(scope)
        return None

    def _from_authorization(self, value: str, scope: Scope) -> Principal | DeferredJWT:
        scheme, _, credentials = value.strip().partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "bearer":
            if credentials.startswith("pvsgw_") or self._bearer_jwt is None or credentials.count(".") != 2:
                return self._key(credentials)
            return DeferredJWT(credentials)
        if scheme == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise AuthFailed("malformed Basic credentials") from None
            user, sep, password = decoded.partition(":")
            if not sep:
                raise AuthFailed("malformed Basic credentials")
            if self._pvs_login is not None and self._pvs_login.allowed(scope, user, password):
                return self._pvs_login.principal(scope)
            return self._key(password)
        raise AuthFailed("unsupported Authorization scheme: use Bearer or Basic")

    def _key(self, presented: str) -> Principal:
        verified = self._api_key(presented) if self._api_key is not None else None
        if verified is None:
            raise AuthFailed("invalid, expired or revoked API key")
        return verified


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        gate: FailureGate,
        anonymous_from: tuple[Network, ...],
        routes: RouteTable,
        login_redirect: Callable[[Scope], Response | None] | None = None,
        unauthenticated_limit: Callable[[Scope], Awaitable[Any]] | None = None,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.gate = gate
        self.anonymous_from = anonymous_from
        self.routes = routes
        self.login_redirect = login_redirect
        # Requests that will get a 401 never reach the rate-limit middleware: limit them by IP here.
        self.unauthenticated_limit = unauthenticated_limit
        self._challenge = [
            ("WWW-Authenticate", 'Bearer realm="pvs-gateway"'),
            ("WWW-Authenticate", 'Basic realm="pvs-gateway", charset="UTF-8"'),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        access = self.routes.policy(path).access
        if access == "open":
            await self.app(scope, receive, send)
            return
        state = request_state(scope)
        ip = client_ip(scope)
        head = scope["method"] == "HEAD"

        try:
            principal = await self.authenticator.authenticate(scope)
        except GatewayError as exc:
            # 401: bad credentials (counted per IP); 400: ambiguous credentials; 403: valid but
            # not allowed; 503: the identity provider is unreachable, not the caller's fault.
            state.detail = exc.detail
            if exc.status == 401:
                # An address past the failure limit gets 429 for further failures only: a valid
                # key or token from it is still admitted (keys are unguessable; the lock-out
                # stops guessing, not the household behind the same address).
                wait = await self.gate.retry_after(ip)
                if wait > 0:
                    await send_problem(send, _blocked(wait), head=head)
                    return
                await self.gate.failed(ip)
                if access == "self":
                    state.auth_error = exc
                    await self.app(scope, receive, send)
                    return
                if not exc.headers:
                    exc.headers = list(self._challenge)
            await send_problem(send, exc, head=head)
            return
        if principal is not None and principal.method == PVS_LOGIN:
            # The PVS's 5-character password is a weak secret: it stays locked out like a guess.
            wait = await self.gate.retry_after(ip)
            if wait > 0:
                await send_problem(send, _blocked(wait), head=head)
                return
        if principal is None and self.anonymous_from and in_networks(ip, self.anonymous_from):
            principal = _anonymous(ip)
        if principal is None:
            if access == "self":
                await self.app(scope, receive, send)
                return
            if self.unauthenticated_limit is not None:
                verdict = await self.unauthenticated_limit(scope)
                if verdict is not None and not verdict.allowed:
                    await send_problem(send, verdict.problem(), head=head)
                    return
            if self.login_redirect is not None:
                response = self.login_redirect(scope)
                if response is not None:
                    await response(scope, receive, send)
                    return
            await send_problem(send, AuthFailed("credentials required: an API key or a login", headers=self._challenge), head=head)
            return
        state.principal = principal
        if access == "admin" and not principal.is_admin:
            state.detail = "admin role required"
            await send_problem(send, Forbidden(f"{path} needs the admin role; {principal.name} is a {principal.role}"), head=head)
            return
        await self.app(scope, receive, send)


def _anonymous(ip: str) -> Principal:
    return Principal(f"anon:{ip}", "anonymous", "viewer", "anonymous")


def _blocked(wait: float) -> GatewayError:
    return GatewayError(
        "too many failed credentials from your address; wait before trying again",
        status=429,
        headers=[("Retry-After", str(max(1, round(wait))))],
        extra={"violated-policies": ["auth_failures"]},
    )
