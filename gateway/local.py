"""Requests on PVS paths that the gateway answers itself, never forwarding them.

``Command=Start``/``Stop`` open and close the PVS's installer "configuration
session"; the Prometheus exporter calls them around every scrape, so they are
answered here. ``/auth?login`` is the LocalAPI login: clients written for it
send Basic credentials whose password is a gateway API key (or, from
``auth.allow_anonymous_from`` only, the PVS's own ``ssm_owner`` password) and
get a gateway session cookie; the gateway's own PVS session never reaches
them. A session ends at ``/auth?logout``, when its key does, or at its
lifetime; it cannot renew itself (``gateway.auth.sessions``).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence

from starlette.types import Receive, Scope, Send

from gateway.allowlist import AUTH_PATH, Resource
from gateway.auth import LOGIN_COOKIE, PVS_LOGIN, Principal
from gateway.auth.keys import KeyStore
from gateway.auth.sessions import SessionStore
from gateway.cache import Lookup, ResponseCache
from gateway.errors import GatewayError
from gateway.middleware.forwarded import in_networks, parse_networks
from gateway.poller import start_supervisor
from gateway.proxy import LocalHandler
from gateway.pvsbody import dumps
from gateway.responses import send_bytes, send_problem
from gateway.scopes import client_ip, request_cookie, request_state, route_path
from gateway.settings import UpstreamSettings

log = logging.getLogger("gateway.auth")



def session_control(cache: ResponseCache, lookup: Callable[[Resource], Awaitable[Lookup]] | None = None) -> LocalHandler:
    """``Command=Start``/``Stop``, answered here: Start with the PVS's ``supervisor`` object, read
    through the cache (``lookup``) even when the cache is cold."""

    async def handle(scope: Scope, receive: Receive, send: Send, resource: Resource) -> None:
        body: dict[str, object] = {"result": "succeed"}
        if resource.name == "Start":
            supervisor = await start_supervisor(cache, lookup)
            if supervisor:
                body["supervisor"] = supervisor
        await send_bytes(send, 200, dumps(body), [(b"cache-control", b"no-store")], head=scope["method"] == "HEAD")

    return handle


PVS_USER = "ssm_owner"
#: Login answers that hand out a session: only real credentials may ask (a session cannot renew itself).
_LOGIN_METHODS = ("api_key", PVS_LOGIN)


class PVSLogin:
    """The PVS's own LocalAPI login, accepted from ``auth.allow_anonymous_from`` only (SPEC §2).

    LAN clients configured for the PVS (homebridge-pvs6, scripts) send
    ``GET /auth?login`` with Basic ``ssm_owner:<password>``; the password is
    ``upstream.password`` if set, else the last five characters of the serial
    (``upstream.serial``, or the one the gateway learned from the PVS). Those
    addresses already read as anonymous viewers, so the login gives nothing
    more: a viewer session. From anywhere else these credentials are just
    wrong credentials (401, counted as a failure), because anyone on the PVS's
    network can read the serial.
    """

    def __init__(self, upstream: UpstreamSettings, anonymous_from: Sequence[str], serial: Callable[[], str] = lambda: "") -> None:
        self._upstream = upstream
        self._networks = parse_networks(anonymous_from)
        self._learned_serial = serial

    def password(self) -> str:
        """The LocalAPI password, or "" when none is known (then no PVS login is accepted)."""
        configured = self._upstream.password.get()
        if configured:
            return configured
        serial = self._upstream.serial or self._learned_serial() or ""
        return serial[-5:] if len(serial) >= 5 else ""

    def from_lan(self, ip: str) -> bool:
        """True if ``ip`` is in ``auth.allow_anonymous_from``."""
        return in_networks(ip, self._networks)

    def allowed(self, scope: Scope, user: str, password: str) -> bool:
        """True when ``user:password`` (Basic) on this ``/auth?login`` request is the PVS login from the LAN.

        For the auth middleware: call it on ``/auth`` before treating the
        password as an API key; True means "admit as ``principal(scope)``",
        not a failure.
        """
        if not self._networks or route_path(scope) != AUTH_PATH or scope.get("query_string") not in (b"login", b"login="):
            return False
        expected = self.password()
        if not expected or not self.from_lan(client_ip(scope)):
            return False
        ok_user = hmac.compare_digest(user.encode(), PVS_USER.encode())
        ok_password = hmac.compare_digest(password.encode(), expected.encode())
        return ok_user and ok_password

    def principal(self, scope: Scope) -> Principal:
        return Principal(f"pvs:{client_ip(scope)}", PVS_USER, "viewer", PVS_LOGIN)


def session_principal(store: SessionStore, keys: KeyStore, pvs: PVSLogin | None = None) -> Callable[..., Principal | None]:
    """``session(token, ip=None)``: the caller a ``session`` cookie stands for, or None.

    A key's session lives only while the key does (revoked, rotated or expired:
    refused at once). A PVS-login session is a viewer, and when the caller's
    address is given it must still be one of ``auth.allow_anonymous_from``.
    """

    def session(token: str, ip: str | None = None) -> Principal | None:
        found = store.verify(token)
        if found is None:
            return None
        kind, _, rest = found.subject.partition(":")
        if kind == "key":
            record = keys.lookup(rest)
            if record is None:
                return None
            keys.record_use(record.id)
            p = keys.principal(record)
            return Principal(p.id, p.name, p.role, "session", p.rate_limit)
        if kind == "pvs" and pvs is not None:
            if ip is not None and not pvs.from_lan(ip):
                return None
            return Principal(found.subject, PVS_USER, "viewer", "session")
        return None

    return session


def login(store: SessionStore, lifetime: float, pvs: PVSLogin | None = None) -> LocalHandler:
    """``/auth?login`` and ``/auth?logout``, answered as the PVS does (SPEC §3)."""

    async def handle(scope: Scope, receive: Receive, send: Send, resource: Resource) -> None:
        state = request_state(scope)
        head = scope["method"] == "HEAD"
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        if resource.name == "auth.logout":
            token = request_cookie(scope, LOGIN_COOKIE)
            if token:
                ended = await store.revoke_token(token)
                if ended is not None:
                    log.info("session of %s ended at logout", ended.subject)
            cookie = f"{LOGIN_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}"
            await send({"type": "http.response.start", "status": 204, "headers": [(b"set-cookie", cookie.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        principal = state.principal
        if principal is None or principal.method not in _LOGIN_METHODS:
            if principal is not None and principal.method == "session":
                error = GatewayError("a session cannot renew itself: log in with credentials (Basic, the password an API key)", status=401)
            else:
                error = state.auth_error or GatewayError("send Basic credentials whose password is an API key", status=401)
            error.headers = [("WWW-Authenticate", 'Basic realm="pvs-gateway", charset="UTF-8"')]
            await send_problem(send, error, head=head)
            return
        _, token = store.issue(principal.id, lifetime)  # "key:<kid>" or "pvs:<address>": see session_principal
        cookie = f"{LOGIN_COOKIE}={token}; Path=/; Max-Age={int(lifetime)}; HttpOnly; SameSite=Strict{secure}"
        await send_bytes(
            send,
            200,
            dumps({"session": token}),
            [(b"set-cookie", cookie.encode()), (b"cache-control", b"no-store")],
            head=head,
        )

    return handle

