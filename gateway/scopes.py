"""Small readings of an ASGI scope shared by several middlewares, and the typed per-request state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from starlette.types import Scope

from gateway.auth import Principal
from gateway.errors import GatewayError


def route_path(scope: Scope) -> str:
    """The path inside the app: ``scope["path"]`` without a ``root_path`` prefix."""
    return strip_root(scope["path"], scope.get("root_path", ""))


def strip_root(path: str, root: str) -> str:
    """A full path (Starlette's ``scope["path"]``, which includes ``root_path``) without ``root``."""
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def request_cookie(scope: Scope, name: str) -> str | None:
    """The first non-empty value of cookie ``name`` in the request's Cookie fields, or None."""
    for key, value in scope["headers"]:
        if key != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            found, _, text = part.strip().partition("=")
            if found == name and text:
                return text
    return None


def client_ip(scope: Scope) -> str:
    """The client's address as resolved by the forwarded-header middleware."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@dataclass(slots=True)
class RequestState:
    """What the layers of one request tell each other, kept at ``scope["state"]["gateway"]``.

    Set by: ``request_id`` the access log; ``peer_trusted`` the forwarded-header
    middleware (the direct peer is a configured proxy); ``principal`` and
    ``auth_error`` authentication; ``headers`` any layer with a field for the
    answer (rate limits), added by the guard; ``status`` the guard, as the answer
    starts; ``detail`` whoever refuses; ``cache_status`` the proxy.
    """

    request_id: str = ""
    peer_trusted: bool = False
    principal: Principal | None = None
    auth_error: GatewayError | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    status: int | None = None  # None until the answer starts
    detail: str | None = None
    cache_status: str = "-"


def request_state(scope: Scope) -> RequestState:
    """The request's ``RequestState``, made on first use."""
    state = scope.setdefault("state", {})
    found = state.get("gateway")
    if found is None:
        found = state["gateway"] = RequestState()
    return cast(RequestState, found)
