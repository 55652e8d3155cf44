"""Signed session tokens for the gateway's own login cookie.

``/auth?login`` (LocalAPI-compatible: Basic credentials whose password is an API
key) answers with a ``session`` cookie; later OIDC logins may reuse the same
signer. A token is ``base64url(payload) "." base64url(HMAC-SHA256)`` with the
payload ``{"k": kid, "e": expiry (unix seconds), "n": random nonce}``. It carries
no secret and no role: whoever checks it looks the kid up again, so revoking or
rotating a key ends its sessions too.

The MAC covers a fixed context string as well as the payload, so a token can
never be mistaken for anything else signed with the same secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import time
from pathlib import Path

from gateway.files import write_atomic

__all__ = ["SECRET_BYTES", "SessionSigner", "load_or_create_secret"]

log = logging.getLogger("gateway.sessions")

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
_CONTEXT = b"pvs-gateway session v1\x00"
# Generous for a kid or an OIDC subject; anything longer is refused before any work.
MAX_TOKEN_LENGTH = 1024
MAX_SUBJECT_LENGTH = 256
_B64_RE = re.compile(r"[A-Za-z0-9_-]+")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issues and verifies session tokens with one HMAC secret."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            # A short HMAC key can be brute-forced offline from a single cookie.
            raise ValueError(f"session secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "SessionSigner(<secret>)"

    def secret_for(self, purpose: str) -> str:
        """A separate key for another use (e.g. the OIDC cookie), derived so one secret file serves both."""
        return hmac.new(self._secret, b"pvs-gateway derive\x00" + purpose.encode(), hashlib.sha256).hexdigest()

    def _sign(self, payload_b64: str) -> str:
        mac = hmac.new(self._secret, _CONTEXT + payload_b64.encode("ascii"), hashlib.sha256)
        return _b64(mac.digest())

    def issue(self, kid: str, lifetime: float, now: float | None = None) -> str:
        """A cookie-safe token naming ``kid``, valid for ``lifetime`` seconds."""
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_SUBJECT_LENGTH:
            raise ValueError(f"session subject must be 1-{MAX_SUBJECT_LENGTH} characters")
        if not (math.isfinite(lifetime) and lifetime > 0):
            raise ValueError("session lifetime must be a positive number of seconds")
        issued = time.time() if now is None else now
        payload = {"k": kid, "e": round(issued + lifetime, 3), "n": _b64(secrets.token_bytes(12))}
        payload_b64 = _b64(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        return f"{payload_b64}.{self._sign(payload_b64)}"

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The kid of an authentic, unexpired token; None for anything else."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            return None
        payload_b64, dot, signature = token.partition(".")
        if not dot or not _B64_RE.fullmatch(payload_b64) or not _B64_RE.fullmatch(signature):
            return None
        # Compare the encoded MACs: constant time, and no room for alternative encodings.
        if not hmac.compare_digest(self._sign(payload_b64).encode("ascii"), signature.encode("ascii")):
            return None
        try:
            payload = json.loads(_unb64(payload_b64))
        except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError all are
            return None
        if not isinstance(payload, dict):
            return None
        kid = payload.get("k")
        expires = payload.get("e")
        if not isinstance(kid, str) or not kid:
            return None
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            return None
        if (time.time() if now is None else now) >= expires:
            return None
        return kid


def load_or_create_secret(path: Path) -> bytes:
    """The session secret stored at ``path``, created (32 random bytes, 0600) if absent.

    Used when ``auth.session_secret`` is empty, so sessions survive restarts. Two
    processes starting together agree on one secret: the new file is published
    with ``os.link``, which fails if another process got there first.
    """
    path = Path(path)
    for _ in range(3):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None and len(data) >= SECRET_BYTES:
            _tighten(path)
            return data
        if data is not None:
            log.warning("session secret %s is too short; replacing it (existing sessions end)", path)
        secret = secrets.token_bytes(SECRET_BYTES)
        if _publish(path, secret, replace_existing=data is not None):
            log.info("created session secret %s", path)
            return secret
    raise OSError(f"cannot create session secret {path}")


def _tighten(path: Path) -> None:
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("session secret %s had mode %o; setting 0600", path, mode)
            os.chmod(path, 0o600)


def _publish(path: Path, secret: bytes, *, replace_existing: bool) -> bool:
    """Write ``secret`` to ``path`` atomically; False if another process created it first."""
    return write_atomic(path, secret, replace=replace_existing)
