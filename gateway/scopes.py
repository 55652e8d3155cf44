"""Small readings of an ASGI scope shared by several middlewares."""

from __future__ import annotations

from starlette.types import Scope


def route_path(scope: Scope) -> str:
    """The path inside the app: ``scope["path"]`` without a ``root_path`` prefix."""
    return strip_root(scope["path"], scope.get("root_path", ""))


def strip_root(path: str, root: str) -> str:
    """A full path (Starlette's ``scope["path"]``, which includes ``root_path``) without ``root``."""
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def client_ip(scope: Scope) -> str:
    """The client's address as resolved by the forwarded-header middleware."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
