"""LocalAPI firmware: ``/auth`` sessions and the ``/vars`` varserver front end.

/vars follows tjmonk/fcgi_vars (which the PVS builds on): ``cache=``/
``clearcache=`` select a named query store first, then ``name=``, ``match=``
and ``set=`` add variables to it in query order; a bare ``cache=<id>``
re-reads what was stored. Unlike upstream, a request is validated as a whole
before any write takes effect, and PVS behaviour is kept where it differs
(``fmt=``, 400 on an empty match, 401 without a session).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import string
import time
from typing import TYPE_CHECKING, Any

from .httpio import Request, Response, json_response
from .vartree import MAX_CACHES, PUBLIC_VARS, WRITABLE_VARS

if TYPE_CHECKING:
    from .device import Device

LOGIN_USER = "ssm_owner"
SESSION_ALPHABET = string.ascii_letters + string.digits
MAX_SESSIONS = 1000
MAX_POST = 1024  # fcgi_vars' default POST limit


def vars_error(status: int, description: str, code: int) -> Response:
    return json_response(status, {"status": status, "description": description, "errorcode": f"0x{code:04x}"})


class SessionStore:
    """Session ids with an inactivity timeout (real seconds, never scaled)."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._last_used: dict[str, float] = {}

    def create(self) -> str:
        self._expire()
        if len(self._last_used) >= MAX_SESSIONS:  # a small device: the oldest session goes
            del self._last_used[min(self._last_used, key=self._last_used.__getitem__)]
        sid = "".join(secrets.choice(SESSION_ALPHABET) for _ in range(64))
        self._last_used[sid] = time.monotonic()
        return sid

    def touch(self, sid: str | None) -> bool:
        """True if ``sid`` is a live session; using it restarts its timeout."""
        if not sid:
            return False
        last = self._last_used.get(sid)
        now = time.monotonic()
        if last is None or now - last >= self._ttl:
            self._last_used.pop(sid, None)
            return False
        self._last_used[sid] = now
        return True

    def drop(self, sid: str | None) -> None:
        if sid:
            self._last_used.pop(sid, None)

    def clear(self) -> None:
        self._last_used.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, last in self._last_used.items() if now - last >= self._ttl]:
            del self._last_used[sid]

    def __len__(self) -> int:
        self._expire()
        return len(self._last_used)


def session_cookie(request: Request) -> str | None:
    for header in (v for k, v in request.headers if k == "cookie"):
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "session":
                return value.strip().strip('"')
    return None


def has_session(device: Device, request: Request) -> bool:
    return device.sessions.touch(session_cookie(request))


def handle_auth(device: Device, request: Request) -> Response:
    keys = [k for k, _ in request.params()]
    if "login" in keys:
        if not _credentials_ok(request.header("authorization"), device.options.serial[-5:]):
            return vars_error(401, "Unauthorized", 0x0001)
        sid = device.sessions.create()
        return json_response(200, {"session": sid}, [("Set-Cookie", f"session={sid}; Secure; HttpOnly")])
    if "logout" in keys:
        device.sessions.drop(session_cookie(request))
        return Response(204, content_type=None)
    return vars_error(400, "Bad request", 0x0016)


def _credentials_ok(header: str | None, password: str) -> bool:
    scheme, _, encoded = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return False
    user, sep, given = decoded.partition(":")
    ok_user = hmac.compare_digest(user.encode(), LOGIN_USER.encode())
    ok_password = hmac.compare_digest(given.encode(), password.encode())
    return bool(sep) and ok_user and ok_password


def vars_keys(request: Request) -> list[str]:
    """Counter keys for a /vars request: always "vars", plus the writes it attempts."""
    params = _vars_params(request) or []
    keys = ["vars"]
    names = {k for k, _ in params}
    keys += [f"vars.{k}" for k in ("set", "clearcache") if k in names]
    return keys


def _vars_params(request: Request) -> list[tuple[str, str]] | None:
    """Parameters from the query (GET) or the body (POST); None if the POST body is unusable."""
    if request.method == "POST":
        if not 0 < len(request.body) <= MAX_POST:
            return None
        return request.form()
    return request.params()


def handle_vars(device: Device, request: Request) -> Response:
    if request.method not in ("GET", "HEAD", "POST"):
        return vars_error(405, "Method Not Allowed", 0x005F)
    params = _vars_params(request)
    if params is None:
        return vars_error(413, "Invalid Content-Length", 0x0007)
    authed = has_session(device, request)
    store = device.vars
    tree = store.tree(device.model.snapshot(), device.uptime())
    obj = any(k == "fmt" and v[:1].lower() == "o" for k, v in params)

    cache_id: str | None = None
    clear = False
    for key, value in params:
        if key in ("cache", "clearcache"):
            cache_id, clear = value, clear or key == "clearcache"

    names: list[str] = []
    sets: list[tuple[str, str]] = []
    for key, value in params:
        if key == "name":
            for name in filter(None, value.split(",")):
                if name not in tree:
                    return _no_session(authed) or vars_error(400, "Bad request", 0x0002)
                names.append(name)
        elif key == "match":
            found = [n for n in tree if value in n]
            if not found:
                return _no_session(authed) or vars_error(400, "Bad request", 0x0002)
            names += found
        elif key == "set":
            if not authed:
                return vars_error(401, "Unauthorized", 0x0001)
            for pair in filter(None, value.split(",")):
                name, sep, new = pair.partition("=")
                if not sep or name not in tree:
                    return vars_error(400, "Bad request", 0x0016)
                if name not in WRITABLE_VARS:
                    return vars_error(403, "Forbidden", 0x000D)
                sets.append((name, new))
                names.append(name)

    public_only = cache_id is None and names and all(n in PUBLIC_VARS for n in names)
    if not authed and not public_only:
        return vars_error(401, "Unauthorized", 0x0001)

    for name, new in sets:
        store.set(name, new)
        tree[name] = new
        device.record_write(f"vars set {name}={new}")
    if cache_id is not None:
        if cache_id not in store.caches and len(store.caches) >= MAX_CACHES:
            return vars_error(400, "Bad request", 0x000C)
        cached = store.caches.setdefault(cache_id, [])
        if clear:
            cached.clear()
            device.record_write(f"vars clearcache {cache_id}")
        cached.extend(n for n in dict.fromkeys(names) if n not in cached)
        selected = [n for n in cached if n in tree]
    else:
        selected = list(dict.fromkeys(names))
    return json_response(200, _render(tree, selected, obj))


def _render(tree: dict[str, Any], names: list[str], obj: bool) -> dict[str, Any]:
    if obj:
        return {n: tree[n] for n in names}
    return {"values": [{"name": n, "value": tree[n]} for n in names], "count": len(names)}


def _no_session(authed: bool) -> Response | None:
    # Without a session the device refuses before it looks anything up.
    return None if authed else vars_error(401, "Unauthorized", 0x0001)
