"""Who is calling: the identity every credential form resolves to."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("viewer", "admin")
# ``Principal.method`` of a caller admitted with the PVS's own LocalAPI password (gateway.local).
PVS_LOGIN = "pvs_login"

# The gateway's two session cookies: the LocalAPI-compatible login's (gateway.local) and the
# OIDC browser login's (gateway.auth.oidc_login). Named here so every layer that reads them agrees.
LOGIN_COOKIE = "session"
OIDC_COOKIE = "pvsgw_session"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated (or anonymously admitted) caller.

    ``id`` is stable and safe to log ("key:k7f3a9qz", "oidc:<sub>", "anon:192.0.2.1");
    ``name`` is the human label (key name, e-mail); ``method`` says how it was proven.
    """

    id: str
    name: str
    role: str
    method: str
    rate_limit: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
