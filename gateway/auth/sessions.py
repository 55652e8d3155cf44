"""Gateway sessions: signed tokens plus a server-side record, so a session can end.

Two layers:

* ``SessionSigner`` signs and checks tokens with itsdangerous (HMAC-SHA256,
  its own salt so a token can never be mistaken for anything else signed with
  the same secret). A token is ``base64url(payload) "." base64url(MAC)`` with
  the payload ``{"k": subject, "e": expiry (unix seconds), "n": session id,
  "i": issued}``. It carries no secret and no role.
* ``SessionStore`` keeps the server-side side of each session: session id ->
  subject (``key:<kid>``, ``oidc:<sub>``, ``pvs:<address>``), issued, expiry;
  and the revocation list. A token is honoured only while its record says so:

  - its signature holds and ``now < expiry`` (the lifetime is fixed at issue:
    nothing in this module extends a session, and the login endpoints refuse
    to mint a session from a session);
  - it was not revoked (``/auth?logout``, ``/auth/logout``);
  - this gateway issued it and still holds its record, **or**, with
    ``cluster.redis_url`` set, the shared revocation list was read from Redis
    within ``SYNC_FRESH`` seconds (then a session issued by another gateway,
    or by this one before a restart, is honoured too).

  Without Redis a restart therefore ends every session (fail closed: the
  revocation list lived in memory); LocalAPI clients log in again on 401, as
  they do when the PVS's own sessions time out. Whoever resolves a subject
  (``gateway.local.session_principal``) looks the key up again, so a revoked,
  rotated or expired key ends its sessions at once.

With Redis (``gateway.shared.Shared``) the revocation list is the sorted set
``pvsgw:sessions:revoked`` (member = session id, score = its expiry, pruned
past it). ``watch`` reads it every ``SYNC_INTERVAL`` seconds and sends
revocations made while Redis was away; a logout at one gateway therefore
reaches the others within about a second. While Redis is unreachable each
gateway carries on with what it issued itself.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar

from itsdangerous import BadData, Signer
from itsdangerous.encoding import base64_decode, base64_encode

from gateway.files import write_atomic

if TYPE_CHECKING:
    from redis.asyncio import Redis


class Shared(Protocol):
    """What the store needs of ``gateway.shared.Shared`` (kept as a protocol: no import upward)."""

    @property
    def configured(self) -> bool: ...

    async def run(self, op: Callable[[Redis], Awaitable[T]]) -> T | None: ...

__all__ = ["SECRET_BYTES", "Session", "SessionSigner", "SessionStore", "load_or_create_secret"]

log = logging.getLogger("gateway.sessions")
T = TypeVar("T")

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
_SALT = "pvs-gateway session v1"
# Generous for a kid or an OIDC subject; anything longer is refused before any work.
MAX_TOKEN_LENGTH = 1024
MAX_SUBJECT_LENGTH = 256
# itsdangerous pads base64 itself, so "token=" would verify too: only the canonical form is accepted.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

#: Redis sorted set of revoked session ids (score: the session's expiry, unix seconds).
REVOKED_KEY = "pvsgw:sessions:revoked"
#: Seconds between two reads of the shared revocation list.
SYNC_INTERVAL = 1.0
#: Sessions this gateway did not issue are honoured only while the shared list is this recent.
SYNC_FRESH = 5.0
#: Records kept at most; past it the session nearest its end is dropped (and so ends).
MAX_RECORDS = 20000


class SessionSigner:
    """Issues and verifies session tokens with one secret (itsdangerous, HMAC-SHA256)."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            # A short HMAC key can be brute-forced offline from a single cookie.
            raise ValueError(f"session secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        # A Signer over base64url(JSON): itsdangerous's serializer would zlib-compress some payloads ("." prefix).
        self._signer = Signer(secret, salt=_SALT, digest_method=hashlib.sha256)

    def __repr__(self) -> str:
        return "SessionSigner(<secret>)"

    def secret_for(self, purpose: str) -> str:
        """A separate key for another use (e.g. the OIDC cookie), derived so one secret file serves both."""
        return hmac.new(self._secret, b"pvs-gateway derive\x00" + purpose.encode(), hashlib.sha256).hexdigest()

    def issue(self, subject: str, lifetime: float, now: float | None = None, *, sid: str | None = None) -> str:
        """A cookie-safe token naming ``subject``, valid for ``lifetime`` seconds."""
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
            raise ValueError(f"session subject must be 1-{MAX_SUBJECT_LENGTH} characters")
        if not (math.isfinite(lifetime) and lifetime > 0):
            raise ValueError("session lifetime must be a positive number of seconds")
        issued = time.time() if now is None else now
        payload = {"k": subject, "e": round(issued + lifetime, 3), "n": sid or new_sid(), "i": round(issued, 3)}
        encoded = base64_encode(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        return self._signer.sign(encoded).decode("ascii")

    def claims(self, token: str, now: float | None = None) -> dict[str, Any] | None:
        """``{"k", "e", "n", "i"}`` of an authentic, unexpired token; None for anything else."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
            return None
        try:
            payload = json.loads(base64_decode(self._signer.unsign(token.encode("ascii"))))
        except (BadData, ValueError):  # ValueError: not JSON, or not UTF-8
            return None
        if not isinstance(payload, dict):
            return None
        subject, expires, sid = payload.get("k"), payload.get("e"), payload.get("n")
        if not isinstance(subject, str) or not subject or not isinstance(sid, str) or not sid:
            return None
        if not _is_number(expires) or (time.time() if now is None else now) >= expires:
            return None
        issued = payload.get("i")
        payload["i"] = issued if _is_number(issued) else 0.0
        return payload

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The subject of an authentic, unexpired token; None for anything else (no record checked)."""
        claims = self.claims(token, now)
        return claims["k"] if claims is not None else None


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def new_sid() -> str:
    return secrets.token_urlsafe(16)


@dataclass(frozen=True, slots=True)
class Session:
    """The server-side record of one session."""

    sid: str
    subject: str
    issued: float
    expires: float


class SessionStore:
    """Session records and revocations (see the module docstring); ``clock`` is wall time."""

    def __init__(
        self,
        signer: SessionSigner,
        *,
        shared: Shared | None = None,
        clock: Callable[[], float] = time.time,
        max_records: int = MAX_RECORDS,
    ) -> None:
        self.signer = signer
        self._shared = shared
        self._clock = clock
        self._max_records = max_records
        self._records: dict[str, Session] = {}
        self._revoked: dict[str, float] = {}  # sid -> expiry: revoked here
        self._unsent: dict[str, float] = {}  # revoked here, not yet in Redis
        self._shared_revoked: frozenset[str] = frozenset()  # the last list read from Redis
        self._synced_at = -math.inf
        self._evicted_logged = False

    def __repr__(self) -> str:
        return f"SessionStore({len(self._records)} sessions, {len(self._revoked)} revoked)"

    def secret_for(self, purpose: str) -> str:
        return self.signer.secret_for(purpose)

    def __len__(self) -> int:
        return len(self._records)

    # ------------------------------------------------------------ issue

    def open(self, subject: str, lifetime: float) -> Session:
        """Record a new session for ``subject`` ending ``lifetime`` seconds from now (no token)."""
        if not (math.isfinite(lifetime) and lifetime > 0):
            raise ValueError("session lifetime must be a positive number of seconds")
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
            raise ValueError(f"session subject must be 1-{MAX_SUBJECT_LENGTH} characters")
        now = self._clock()
        self._prune(now)
        session = Session(new_sid(), subject, round(now, 3), round(now + lifetime, 3))
        self._records[session.sid] = session
        return session

    def issue(self, subject: str, lifetime: float) -> tuple[Session, str]:
        """A new session for ``subject`` and its cookie token."""
        session = self.open(subject, lifetime)
        token = self.signer.issue(subject, session.expires - session.issued, session.issued, sid=session.sid)
        return session, token

    # ------------------------------------------------------------ check

    def verify(self, token: str) -> Session | None:
        """The live session a cookie token stands for, else None (forged, expired, revoked, unknown)."""
        now = self._clock()
        claims = self.signer.claims(token, now)
        if claims is None:
            return None
        return self._live(claims["n"], claims["k"], claims["i"], claims["e"], now)

    def active(self, sid: str, subject: str, expires: float) -> Session | None:
        """The live session ``sid`` (from a cookie signed elsewhere, e.g. the OIDC one), else None."""
        if not isinstance(sid, str) or not sid or not _is_number(expires):
            return None
        now = self._clock()
        if now >= expires:
            return None
        return self._live(sid, subject, 0.0, expires, now)

    def _live(self, sid: str, subject: str, issued: float, expires: float, now: float) -> Session | None:
        if sid in self._revoked or sid in self._shared_revoked:
            return None
        record = self._records.get(sid)
        if record is not None:
            if record.subject != subject or now >= record.expires:
                return None
            return record
        # Not issued here (another gateway, or this one before a restart): only Redis can vouch for it.
        if now - self._synced_at > SYNC_FRESH:
            return None
        return Session(sid, subject, issued, expires)

    # ------------------------------------------------------------ end

    async def revoke(self, sid: str, expires: float | None = None) -> bool:
        """End session ``sid`` here and, with Redis, everywhere; True if it was live."""
        if not isinstance(sid, str) or not sid:
            return False
        now = self._clock()
        record = self._records.pop(sid, None)
        if record is not None:
            until = record.expires
        else:
            until = expires if _is_number(expires) else now + 86400.0
        was_live = record is not None or (sid not in self._revoked and sid not in self._shared_revoked)
        if until > now:
            self._revoked[sid] = until
            self._unsent[sid] = until
        if self._shared is not None and self._shared.configured:
            await self.sync()
        return was_live

    async def revoke_token(self, token: str) -> Session | None:
        """End the session a cookie token stands for; the session it was, or None if it was not live."""
        session = self.verify(token)
        if session is None:
            return None
        await self.revoke(session.sid, session.expires)
        return session

    def _prune(self, now: float) -> None:
        if len(self._records) >= self._max_records:
            for sid in [s for s, r in self._records.items() if r.expires <= now]:
                del self._records[sid]
            if len(self._records) >= self._max_records:
                # Full of live sessions: the one nearest its end goes first.
                oldest = min(self._records.values(), key=lambda r: r.expires)
                del self._records[oldest.sid]
                if not self._evicted_logged:
                    self._evicted_logged = True
                    log.warning("sessions: more than %d live sessions; the oldest are ended", self._max_records)
        if len(self._revoked) >= self._max_records:
            self._revoked = {s: t for s, t in self._revoked.items() if t > now}
            self._unsent = {s: t for s, t in self._unsent.items() if t > now}

    # ------------------------------------------------------------ Redis

    async def sync(self) -> bool:
        """Send our revocations to Redis and read everyone's; False when Redis is absent or down."""
        if self._shared is None:
            return False
        now = self._clock()
        unsent = dict(self._unsent)

        async def op(redis: Redis) -> list[Any]:
            pipe = redis.pipeline(transaction=False)
            if unsent:
                pipe.zadd(REVOKED_KEY, unsent)
            pipe.zremrangebyscore(REVOKED_KEY, "-inf", now)
            pipe.zrangebyscore(REVOKED_KEY, now, "+inf")
            results: list[Any] = await pipe.execute()
            return results

        results = await self._shared.run(op)
        if results is None:
            return False
        for sid in unsent:
            self._unsent.pop(sid, None)
        self._shared_revoked = frozenset(m.decode() if isinstance(m, bytes) else str(m) for m in results[-1])
        self._synced_at = now
        return True

    async def watch(self, interval: float = SYNC_INTERVAL) -> None:
        """Keep the shared revocation list current (a background task; returns at once without Redis)."""
        if self._shared is None or not self._shared.configured:
            return
        while True:
            try:
                await self.sync()
            except Exception:  # Shared.run absorbs Redis trouble; anything else is a bug, logged, and the loop goes on
                log.exception("sessions: reading the shared revocation list failed")
            await asyncio.sleep(interval)


def load_or_create_secret(path: Path) -> bytes:
    """The session secret stored at ``path``, created (32 random bytes, 0600) if absent.

    Used when ``auth.session_secret`` is empty. Two processes starting together
    agree on one secret: the new file is published with ``os.link``, which
    fails if another process got there first. Gateways sharing a Redis must
    share this secret too (set ``auth.session_secret``) to honour each other's
    sessions.
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
