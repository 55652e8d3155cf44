"""API keys: format, hashed storage, hot-path verification and the CLI's admin functions.

A key looks like ``pvsgw_<kid>_<secret>``: ``kid`` is 8 lowercase base32 characters,
a public id that is safe in logs, lists and rate-limit buckets; ``secret`` is 32 random
bytes, base64url without padding. The key file (JSON, mode 0600) holds only
``sha256:<hex>`` of the whole key. A 256-bit random secret cannot be guessed, so a
slow password hash (bcrypt, as Caddy and Traefik use for htpasswd) would only spend
CPU on every request; and unlike Kong's plaintext keys (Kong#5437) a leaked file
gives nothing away.

File, owned by the CLI (``pvs-gateway keys ...``)::

    {"version": 1, "keys": [{"id": "k7f3a9qz", "name": "phone", "role": "viewer",
      "hash": "sha256:...", "created": "2025-01-02T03:04:05Z", "expires": null,
      "revoked": null, "rate_limit": null}]}

The running gateway only reads it (``KeyStore.reload_if_changed``), and refuses it
while group or others may write it, as ssh refuses such a key file. Last-used times
live in memory and go to ``<stem>.state.json`` next to it (``{kid: iso}``) at most
once a minute and on shutdown, so requests never rewrite the key file (SD-card wear
on a Pi, and no write race with the CLI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.auth import ROLES, Principal
from gateway.files import flocked, remove_stale_temps, write_atomic

__all__ = [
    "KEY_PREFIX",
    "KeyRecord",
    "KeyStore",
    "KeyStoreError",
    "add_key",
    "file_problems",
    "key_id",
    "list_keys",
    "lock_path_for",
    "revoke_key",
    "rotate_key",
    "state_path_for",
]

log = logging.getLogger("gateway.keys")

KEY_PREFIX = "pvsgw_"
FILE_VERSION = 1
HASH_SCHEME = "sha256:"
# 32 bytes -> 43 base64url characters; 8 base32 characters = 40 bits of kid.
_SECRET_BYTES = 32
_KEY_RE = re.compile(r"pvsgw_([a-z2-7]{8})_[A-Za-z0-9_-]{43}")
_KEY_LENGTH = len(KEY_PREFIX) + 8 + 1 + 43
_KID_RE = re.compile(r"[a-z2-7]{8}")
_NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
# Compared against when the kid is unknown, so unknown and wrong keys cost the same.
_DUMMY_DIGEST = hashlib.sha256(b"pvs-gateway unknown key").digest()
# How long a CLI command waits for another one to release the key file.
LOCK_TIMEOUT = 10.0
# A temp file older than this cannot belong to a write still going on (they take milliseconds).
STALE_TEMP_AGE = 60.0
MAX_EXPIRES_DAYS = 36500


class KeyStoreError(Exception):
    """A key-file operation failed; ``message`` is fit to show a user as-is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------- records


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    # A naive datetime is taken as UTC rather than local time: the file says UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else _utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an ISO-8601 time string")
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError:
        raise ValueError(f"{what} is not an ISO-8601 time ({value!r})") from None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key as stored: everything but the secret."""

    id: str
    name: str
    role: str
    hash: str
    created: datetime
    expires: datetime | None = None
    revoked: datetime | None = None
    rate_limit: str | None = None

    def status(self, now: datetime | None = None) -> str:
        """"active", "expired" or "revoked" (revocation wins)."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and _utc(now or _now()) >= self.expires:
            return "expired"
        return "active"

    def is_active(self, now: datetime | None = None) -> bool:
        return self.status(now) == "active"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "hash": self.hash,
            "created": _iso(self.created),
            "expires": _iso(self.expires),
            "revoked": _iso(self.revoked),
            "rate_limit": self.rate_limit,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> KeyRecord:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: must be an object")
        kid = data.get("id")
        if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
            raise ValueError(f"{where}.id: must be 8 lowercase base32 characters")
        where = f"{where} ({kid})"
        name = data.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"{where}.name: must be 1-64 characters of A-Z a-z 0-9 . _ @ -")
        role = data.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}")
        digest = data.get("hash")
        if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
            raise ValueError(f"{where}.hash: must be 'sha256:' and 64 lowercase hex digits")
        rate_limit = data.get("rate_limit")
        if rate_limit is not None and not isinstance(rate_limit, str):
            raise ValueError(f"{where}.rate_limit: must be a string or null")
        expires = data.get("expires")
        revoked = data.get("revoked")
        return cls(
            id=kid,
            name=name,
            role=str(role),
            hash=digest,
            created=_parse_time(data.get("created"), f"{where}.created"),
            expires=None if expires is None else _parse_time(expires, f"{where}.expires"),
            revoked=None if revoked is None else _parse_time(revoked, f"{where}.revoked"),
            rate_limit=rate_limit,
        )


def _hash_key(full_key: str) -> str:
    return HASH_SCHEME + hashlib.sha256(full_key.encode("ascii")).hexdigest()


def _new_key(taken: set[str]) -> tuple[str, str]:
    """A fresh (kid, full key) whose kid is not in ``taken``."""
    while True:
        # 5 bytes are exactly 8 base32 characters, no padding.
        kid = base64.b32encode(secrets.token_bytes(5)).decode("ascii").lower()
        if kid not in taken:
            break
    secret = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii").rstrip("=")
    return kid, f"{KEY_PREFIX}{kid}_{secret}"


def key_id(presented: str) -> str | None:
    """The kid of a well-formed key, else None; safe to log (never the secret)."""
    if len(presented) != _KEY_LENGTH:
        return None
    match = _KEY_RE.fullmatch(presented)
    return match.group(1) if match else None


# ---------------------------------------------------------------- files


def state_path_for(path: Path) -> Path:
    """``keys.json`` -> ``keys.state.json`` (last-used times, written by the gateway)."""
    return path.with_name(f"{path.stem}.state.json")


def lock_path_for(path: Path) -> Path:
    """``keys.json`` -> ``keys.json.lock`` (serializes CLI writers)."""
    return path.with_name(f"{path.name}.lock")


def _parse_file(raw: bytes) -> list[KeyRecord]:
    """Strictly parse a key file; ValueError names the first problem."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    if data.get("version") != FILE_VERSION:
        raise ValueError(f"unsupported version {data.get('version')!r} (expected {FILE_VERSION})")
    items = data.get("keys")
    if not isinstance(items, list):
        raise ValueError("'keys' must be a list")
    records = [KeyRecord.from_json(item, f"keys[{i}]") for i, item in enumerate(items)]
    ids: set[str] = set()
    names: set[str] = set()
    for record in records:
        if record.id in ids:
            raise ValueError(f"duplicate key id {record.id}")
        if record.name in names:
            raise ValueError(f"duplicate key name {record.name!r}")
        ids.add(record.id)
        names.add(record.name)
    return records


def _read_records(path: Path) -> list[KeyRecord]:
    """For the CLI: a missing file is empty; a corrupt one is an error, never overwritten."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeyStoreError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return _parse_file(raw)
    except ValueError as exc:
        raise KeyStoreError(f"{path} is corrupt ({exc}); fix or restore it before changing keys") from None


def _atomic_write(path: Path, content: bytes) -> None:
    write_atomic(path, content)


def _write_records(path: Path, records: list[KeyRecord]) -> None:
    """Replace the key file (the caller holds ``_locked``, so any temp file left is a killed writer's)."""
    document = {"version": FILE_VERSION, "keys": [r.to_json() for r in records]}
    remove_stale_temps(path)
    try:
        _atomic_write(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise KeyStoreError(f"cannot write {path}: {exc.strerror or exc}; nothing was changed") from None


@contextlib.contextmanager
def _locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive flock on the sidecar lock file (two CLI runs never lose a write).

    The lock is on a separate file because the key file itself is replaced, not
    rewritten: a lock on the old inode would not exclude a writer of the new one.
    """
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            stack.enter_context(flocked(lock_path_for(path), timeout=timeout))
        except TimeoutError:
            raise KeyStoreError(f"{path} is locked by another 'pvs-gateway keys' command; try again") from None
        except OSError as exc:
            raise KeyStoreError(f"cannot lock {lock_path_for(path)}: {exc.strerror or exc}") from None
        yield


def _writable_by_others(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def _writable_problem(path: Path) -> str:
    return f"{path} is writable by group or others, so anyone who can write it can add keys; run: chmod 600 {path}"


def file_problems(path: Path) -> list[str]:
    """What ``check`` and ``serve`` refuse in a key file: unreadable, corrupt, writable by others.

    A missing file is no problem (no keys yet). Each problem is one line naming the file.
    """
    path = Path(path)
    try:
        st = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"cannot read {path}: {exc.strerror or exc}"]
    problems = []
    if _writable_by_others(st.st_mode):
        problems.append(_writable_problem(path))
    try:
        _parse_file(raw)
    except (ValueError, RecursionError) as exc:
        problems.append(f"{path} is corrupt ({exc}); fix it or restore it from a backup")
    return problems


def _read_state(path: Path) -> dict[str, str]:
    """Last-used times; a missing or damaged state file only loses those times."""
    try:
        data = json.loads(state_path_for(path).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable key usage file %s: %s", state_path_for(path), exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


# ---------------------------------------------------------------- admin (CLI)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise KeyStoreError(
            f"invalid key name {name!r}: use 1-64 characters of letters, digits, '.', '_', '@' or '-'"
        )


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise KeyStoreError(f"invalid role {role!r}: use one of {', '.join(ROLES)}")


def _check_rate_limit(rate_limit: str | None) -> None:
    if rate_limit is None:
        return
    from gateway.settings import _rate  # the same syntax check as [ratelimit]

    problem = _rate(rate_limit) if isinstance(rate_limit, str) else "must be a string"
    if problem:
        raise KeyStoreError(f"invalid rate limit: {problem}")


def _find(records: list[KeyRecord], name: str) -> int:
    for i, record in enumerate(records):
        if record.name == name:
            return i
    close = difflib.get_close_matches(name, [r.name for r in records], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise KeyStoreError(f"no key named {name!r}{hint}")


def add_key(
    path: Path,
    name: str,
    role: str = "viewer",
    expires_days: float | None = None,
    rate_limit: str | None = None,
) -> tuple[KeyRecord, str]:
    """Create a key; return its record and the full key (the only time it exists)."""
    path = Path(path)
    _check_name(name)
    _check_role(role)
    _check_rate_limit(rate_limit)
    if expires_days is not None and not (0 < expires_days <= MAX_EXPIRES_DAYS):
        raise KeyStoreError(f"invalid expiry: days must be between 1 and {MAX_EXPIRES_DAYS} (got {expires_days})")
    with _locked(path):
        records = _read_records(path)
        for existing in records:
            if existing.name == name:
                status = existing.status()
                how = "'keys rotate --expires-days N'" if status == "expired" else "'keys rotate'"
                hint = "" if status == "active" else f" ({status}; {how} reissues it)"
                raise KeyStoreError(f"a key named {name!r} already exists{hint}")
        kid, full_key = _new_key({r.id for r in records})
        created = _now().replace(microsecond=0)
        record = KeyRecord(
            id=kid,
            name=name,
            role=role,
            hash=_hash_key(full_key),
            created=created,
            expires=(
                None if expires_days is None else (created + timedelta(days=expires_days)).replace(microsecond=0)
            ),
            rate_limit=rate_limit,
        )
        _write_records(path, [*records, record])
    log.info("added key %s (%s, role %s)", kid, name, role)
    return record, full_key


def list_keys(path: Path, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every key, in file order, with status and last use; times as ISO strings; never a secret."""
    path = Path(path)
    records = _read_records(path)
    usage = _read_state(path)
    now = _utc(now or _now())
    return [
        {
            "id": r.id,
            "name": r.name,
            "role": r.role,
            "created": _iso(r.created),
            "expires": _iso(r.expires),
            "revoked": _iso(r.revoked),
            "rate_limit": r.rate_limit,
            "last_used": usage.get(r.id),
            "status": r.status(now),
        }
        for r in records
    ]


def revoke_key(path: Path, name: str) -> KeyRecord:
    """Revoke a key by name. Revoking twice keeps the first revocation time."""
    path = Path(path)
    with _locked(path):
        records = _read_records(path)
        i = _find(records, name)
        if records[i].revoked is not None:
            return records[i]
        records[i] = replace(records[i], revoked=_now().replace(microsecond=0))
        _write_records(path, records)
    log.info("revoked key %s (%s)", records[i].id, name)
    return records[i]


def rotate_key(path: Path, name: str, expires_days: float | None = None) -> tuple[KeyRecord, str]:
    """Replace a key's secret: a new key (new kid) with the same name, role, rate limit and expiry.

    The old kid disappears from the file, so the old key stops working as soon as
    the gateway reloads. The expiry is kept, not restarted: rotating replaces a
    secret, it does not extend a guest's key. Extending is an explicit
    ``expires_days`` (counted from now); an expired key can only be reissued so.
    A revoked key is reissued (its name is kept for it).
    """
    path = Path(path)
    if expires_days is not None and not (0 < expires_days <= MAX_EXPIRES_DAYS):
        raise KeyStoreError(f"invalid expiry: days must be between 1 and {MAX_EXPIRES_DAYS} (got {expires_days})")
    with _locked(path):
        records = _read_records(path)
        i = _find(records, name)
        old = records[i]
        created = _now().replace(microsecond=0)
        expires: datetime | None
        if expires_days is not None:
            expires = (created + timedelta(days=expires_days)).replace(microsecond=0)
        elif old.expires is not None and old.expires <= created:
            raise KeyStoreError(
                f"key {name!r} expired at {_iso(old.expires)}; rotating keeps the expiry, "
                "so give a new one: keys rotate NAME --expires-days N"
            )
        else:
            expires = old.expires
        kid, full_key = _new_key({r.id for r in records})
        records[i] = KeyRecord(
            id=kid,
            name=old.name,
            role=old.role,
            hash=_hash_key(full_key),
            created=created,
            expires=expires,
            rate_limit=old.rate_limit,
        )
        _write_records(path, records)
    log.info("rotated key %s -> %s (%s)", old.id, kid, name)
    return records[i], full_key


# ---------------------------------------------------------------- the gateway's view


class KeyStore:
    """The running gateway's read-only view of the key file, plus last-used tracking.

    ``verify`` is a dict lookup and one SHA-256; the file is re-read only when its
    (inode, mtime, size) changes. The index is swapped with one assignment, so
    readers never need a lock even while ``watch`` reloads in a worker thread.
    """

    def __init__(self, path: Path, *, flush_interval: float = 60.0) -> None:
        self.path = Path(path)
        self.state_path = state_path_for(self.path)
        self.flush_interval = flush_interval
        # The index with its cache of keys already verified against it (SHA-256 digest ->
        # (record, expiry as a timestamp)), swapped together in one assignment: a key verified
        # against an index that a reload just replaced lands in that old index's cache, never
        # in the new one, so a revoked key cannot outlive the reload that removed it.
        self._current: tuple[dict[str, tuple[KeyRecord, bytes]], dict[bytes, tuple[KeyRecord, float]]] = ({}, {})
        self._principals: dict[str, tuple[KeyRecord, Principal]] = {}
        # None: never looked; "missing": no file; else (inode, mtime_ns, size, mode).
        self._signature: object = None
        self._usage: dict[str, float] = {}  # kid -> last use, seconds since the epoch
        self._dirty = False
        self._usage_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last_flush = time.monotonic()
        # A `keys add` killed mid-write may have left its temp file behind.
        remove_stale_temps(self.path, older_than=STALE_TEMP_AGE)
        self.reload_if_changed()

    def __len__(self) -> int:
        return len(self._index)

    # -- loading

    def reload_if_changed(self) -> bool:
        """Re-read the key file if it changed; True when the keys in use were replaced.

        Synchronous and never raises (SIGHUP and the watcher call it): a file that
        cannot be used is one log line naming it, and the keys loaded before stay.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._signature == "missing":
                return False
            had_keys = bool(self._index)
            self._signature = "missing"
            self._set_index({})
            if had_keys:
                log.warning("key file %s is gone: no API keys are accepted", self.path)
            else:
                log.info("no key file at %s: no API keys are accepted", self.path)
            return had_keys
        except OSError as exc:
            log.error("cannot stat key file %s: %s; keeping the keys loaded", self.path, exc)
            return False
        signature = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)  # mode: `chmod 600` is a change
        if signature == self._signature:
            return False
        # Remember the signature even if the content is bad: one error per bad version,
        # not one every poll.
        self._signature = signature
        if _writable_by_others(st.st_mode):
            log.error("refusing key file: %s (keeping the %d keys loaded before)", _writable_problem(self.path), len(self._index))
            return False
        try:
            records = _parse_file(self.path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            log.error(
                "key file %s is unreadable or corrupt (%s); keeping the %d keys loaded before",
                self.path,
                exc,
                len(self._index),
            )
            return False
        self._set_index({r.id: (r, bytes.fromhex(r.hash[len(HASH_SCHEME) :])) for r in records})
        log.info("loaded %d API keys from %s", len(records), self.path)
        return True

    def _set_index(self, index: dict[str, tuple[KeyRecord, bytes]]) -> None:
        self._current = (index, {})

    @property
    def _index(self) -> dict[str, tuple[KeyRecord, bytes]]:
        return self._current[0]

    # -- per request

    def verify(self, presented: str, now: datetime | None = None) -> KeyRecord | None:
        """The record of a valid, active key, else None (malformed, unknown, wrong,
        expired and revoked all look the same to the caller). Records the use.

        A key that verified once is found again by its SHA-256 digest (a poller presents
        the same key on every request), skipping the parse and the clock conversions;
        its expiry is still checked every time, and a reload empties the cache.
        """
        if not isinstance(presented, str):
            return None
        index, verified = self._current
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        if now is None:
            known = verified.get(digest)
            if known is not None:
                t = time.time()
                if t < known[1]:
                    self._note_use_each_second(known[0].id, t)
                    return known[0]
        kid = key_id(presented)
        if kid is None:
            return None
        entry = index.get(kid)
        # Always one constant-time compare, so timing does not tell unknown from wrong.
        matches = hmac.compare_digest(digest, entry[1] if entry else _DUMMY_DIGEST)
        if entry is None or not matches:
            return None
        record = entry[0]
        now = _now() if now is None else _utc(now)  # one clock read serves the expiry check and the last-used time
        status = record.status(now)
        if status != "active":
            log.debug("key %s (%s) refused: %s", kid, record.name, status)
            return None
        if len(verified) < 4 * len(index) + 64:  # "active" above: neither revoked nor expired
            verified[digest] = (record, record.expires.timestamp() if record.expires is not None else math.inf)
        self._note_use(kid, now.timestamp())
        return record

    def holds(self, record: KeyRecord) -> Callable[[], bool]:
        """For a record ``verify`` just returned: a check that it still would, without the key.

        True while the store is not reloaded (revoking, rotating or editing keys
        reloads it) and the key has not expired; each True records a use, as
        ``verify`` does. For a caller that knows it holds the same presented key
        again (``gateway.auth.middleware``: the same bytes on one connection).
        """
        current = self._current
        expires = record.expires.timestamp() if record.expires is not None else math.inf
        kid = record.id

        def still() -> bool:
            if self._current is not current:
                return False
            t = time.time()
            if t >= expires:
                return False
            self._note_use_each_second(kid, t)
            return True

        return still

    def lookup(self, kid: str, now: datetime | None = None) -> KeyRecord | None:
        """The active record for ``kid`` (e.g. from a session cookie), else None.

        A session must die with its key: revoked, expired or rotated away gives None.
        """
        entry = self._index.get(kid)
        if entry is None or not entry[0].is_active(now):
            return None
        return entry[0]

    def principal(self, record: KeyRecord) -> Principal:
        # Records are immutable and replaced on reload, so one Principal per record serves every request.
        # Looked up by id (a str, its hash cached) and checked to be the same record object.
        cached = self._principals.get(record.id)
        if cached is not None and cached[0] is record:
            return cached[1]
        if len(self._principals) > 4 * len(self) + 64:
            self._principals.clear()
        principal = Principal(
            id=f"key:{record.id}",
            name=record.name,
            role=record.role,
            method="api_key",
            rate_limit=record.rate_limit,
        )
        self._principals[record.id] = (record, principal)
        return principal

    # -- last used

    def record_use(self, kid: str, now: datetime | None = None) -> None:
        """Note a use in memory; ``flush_usage`` writes it out later."""
        self._note_use(kid, _utc(now or _now()).timestamp())

    def _note_use_each_second(self, kid: str, when: float) -> None:
        # For uses recognised without hashing: last-used times are kept to the second
        # (and written out far less often), so a poller's every request need not take the lock.
        if when - self._usage.get(kid, 0.0) >= 1.0:
            self._note_use(kid, when)

    def _note_use(self, kid: str, when: float) -> None:
        with self._usage_lock:
            self._usage[kid] = when
            self._dirty = True

    def flush_usage(self, force: bool = False) -> bool:
        """Write last-used times to the state file if any changed and the interval
        passed (or ``force``). True when the file was written."""
        with self._flush_lock:
            if not self._dirty:
                return False
            if not force and time.monotonic() - self._last_flush < self.flush_interval:
                return False
            with self._usage_lock:
                usage = dict(self._usage)
                self._dirty = False
            try:
                merged = _read_state(self.path)
                for kid, when in usage.items():
                    iso = _iso(datetime.fromtimestamp(when, UTC))
                    assert iso is not None
                    # ISO-8601 UTC strings in one format sort as times do.
                    if iso > merged.get(kid, ""):
                        merged[kid] = iso
                # Drop kids that were rotated away or removed, so the file cannot grow forever.
                known = set(self._index)
                if known:
                    merged = {k: v for k, v in merged.items() if k in known}
                self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _atomic_write(self.state_path, (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode())
            except OSError as exc:
                with self._usage_lock:
                    self._dirty = True  # try again next time
                log.error("cannot write key usage file %s: %s", self.state_path, exc)
                return False
            self._last_flush = time.monotonic()
            return True

    async def watch(self, interval: float = 2.0) -> None:
        """Background task: pick up CLI changes and flush usage; flushes on cancel."""
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    # File I/O (and fsync on an SD card) stays off the event loop.
                    await asyncio.to_thread(self.reload_if_changed)
                    await asyncio.to_thread(self.flush_usage)
                except Exception:
                    log.exception("key file watcher failed; retrying")
        finally:
            try:
                self.flush_usage(force=True)
            except Exception:
                log.exception("final key usage flush failed")
