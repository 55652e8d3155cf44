"""Identity from a front auth proxy (oauth2-proxy / Authelia style), opt-in.

With ``server.proxy_user_header`` set (e.g. ``"Remote-User"``), a request
whose *direct peer* is in ``server.trusted_proxies`` and that carries that
header is admitted as the named user. Role: admin when one of the groups in
``server.proxy_groups_header`` (comma-separated, e.g. ``Remote-Groups``) is in
``auth.oidc.admin_groups``, else viewer.

Fail closed:
* The header is believed only when ``ForwardedMiddleware`` recorded that the
  direct peer is trusted (``RequestState.peer_trusted``); the
  client IP in ``scope["client"]`` cannot be used for that, it has already
  been replaced by the forwarded one. From anyone else the header is ignored
  (the request is treated as carrying no credentials).
* A user header that appears more than once, or is empty, is ignored.
* The proxy must set or *replace* the header on every route to the gateway
  (Traefik ForwardAuth's ``authResponseHeaders`` does: it deletes the
  client's copy first); a route that passes a client's header through
  makes it spoofable. Hence opt-in.

Credentials the client presents itself (API key, cookies) still win: they
are checked first by ``Authenticator``.
"""

from __future__ import annotations

import re

from starlette.types import Scope

from gateway.auth import Principal
from gateway.auth.middleware import ScopeVerifier
from gateway.scopes import request_state
from gateway.settings import Settings

_MAX_NAME = 256
# Printable, no separators that would confuse logs or the identity id.
_NAME = re.compile(r"[^\x00-\x1f\x7f\s][^\x00-\x1f\x7f]*")


def front_proxy_verifier(settings: Settings) -> ScopeVerifier | None:
    """The ``(scope) -> Principal | None`` check, or None when not configured."""
    if not settings.server.proxy_user_header or not settings.server.trusted_proxies:
        return None
    return FrontProxyIdentity(
        settings.server.proxy_user_header,
        settings.server.proxy_groups_header,
        settings.auth.oidc.admin_groups,
    )


class FrontProxyIdentity:
    def __init__(self, user_header: str, groups_header: str, admin_groups: tuple[str, ...]) -> None:
        self.user_header = user_header.strip().lower().encode("latin-1")
        self.groups_header = groups_header.strip().lower().encode("latin-1") if groups_header.strip() else None
        self.admin_groups = frozenset(admin_groups)

    def __call__(self, scope: Scope) -> Principal | None:
        if not request_state(scope).peer_trusted:
            return None
        users: list[str] = []
        groups: list[str] = []
        for name, value in scope["headers"]:
            if name == self.user_header:
                users.append(value.decode("utf-8", "replace").strip())
            elif self.groups_header is not None and name == self.groups_header:
                groups += [g.strip() for g in value.decode("utf-8", "replace").split(",") if g.strip()]
        if len(users) != 1:
            return None  # absent, or ambiguous (two proxies, or one passed a client's copy through)
        user = users[0]
        if not user or len(user) > _MAX_NAME or not _NAME.fullmatch(user):
            return None
        role = "admin" if self.admin_groups.intersection(groups) else "viewer"
        return Principal(id=f"proxy:{user}", name=user, role=role, method="front_proxy")
