"""Requests on PVS paths that the gateway answers itself, never forwarding them.

``Command=Start``/``Stop`` open and close the PVS's installer "configuration
session"; the Prometheus exporter calls them around every scrape, so they are
answered here. ``/auth?login`` is the LocalAPI login: clients written for it
send Basic credentials whose password is now a gateway API key, and get a
gateway session cookie; the PVS's own password never reaches them.
"""

from __future__ import annotations

import json

from starlette.types import Receive, Scope, Send

from gateway.allowlist import Resource
from gateway.auth import Principal
from gateway.auth.sessions import SessionSigner
from gateway.cache import ResponseCache
from gateway.errors import GatewayError
from gateway.proxy import DEVICE_LIST_KEY, LocalHandler
from gateway.pvsbody import dumps
from gateway.responses import send_bytes, send_problem

_SUPERVISOR_FIELDS = ("SERIAL", "MODEL", "SWVER", "HWVER", "BUILD")


def session_control(cache: ResponseCache) -> LocalHandler:
    async def handle(scope: Scope, receive: Receive, send: Send, resource: Resource) -> None:
        body: dict[str, object] = {"result": "succeed"}
        if resource.name == "Start":
            supervisor = _supervisor_from_cache(cache)
            if supervisor:
                body["supervisor"] = supervisor
        await send_bytes(send, 200, dumps(body), [(b"cache-control", b"no-store")], head=scope["method"] == "HEAD")

    return handle


def _supervisor_from_cache(cache: ResponseCache) -> dict[str, str]:
    entry = cache.peek(DEVICE_LIST_KEY)
    if entry is None or entry.status != 200:
        return {}
    try:
        devices = json.loads(entry.body).get("devices", [])
        pvs = next(d for d in devices if d.get("DEVICE_TYPE") == "PVS")
    except (ValueError, AttributeError, StopIteration):
        return {}
    return {k: str(pvs[k]) for k in _SUPERVISOR_FIELDS if k in pvs}


def login(signer: SessionSigner, lifetime: float) -> LocalHandler:
    async def handle(scope: Scope, receive: Receive, send: Send, resource: Resource) -> None:
        state = scope.get("state", {})
        head = scope["method"] == "HEAD"
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        if resource.name == "auth.logout":
            cookie = f"session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}"
            await send({"type": "http.response.start", "status": 204, "headers": [(b"set-cookie", cookie.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        principal: Principal | None = state.get("principal")
        if principal is None or principal.method not in ("api_key", "session"):
            error = state.get("auth_error") or GatewayError("send Basic credentials whose password is an API key", status=401)
            error.headers = [("WWW-Authenticate", 'Basic realm="pvs-gateway", charset="UTF-8"')]
            await send_problem(send, error, head=head)
            return
        kid = principal.id.removeprefix("key:")
        token = signer.issue(kid, lifetime)
        cookie = f"session={token}; Path=/; Max-Age={int(lifetime)}; HttpOnly; SameSite=Strict{secure}"
        await send_bytes(
            send,
            200,
            dumps({"session": token}),
            [(b"set-cookie", cookie.encode()), (b"cache-control", b"no-store")],
            head=head,
        )

    return handle
