"""The proxied PVS paths: allowlist, then cache, then (maybe) the PVS.

Clients keep their URLs and change only scheme, host and port. What reaches
the PVS is rebuilt from the parsed request (see ``allowlist``); the client's
headers, credentials and cookies are never passed on.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

from gateway.allowlist import Resource, classify, vars_resource
from gateway.auth import Principal
from gateway.cache import Lookup, ResponseCache
from gateway.errors import GatewayError, RequestRejected
from gateway.responses import JSON, Header, send_prepared, send_problem
from gateway.settings import Settings
from gateway.upstream import Fetched, UpstreamClient

log = logging.getLogger("gateway.proxy")

LocalHandler = Callable[[Scope, Receive, Send, Resource], Awaitable[None]]
DEVICE_LIST_KEY = "/cgi-bin/dl_cgi?Command=DeviceList"


PROXIED_PATHS = frozenset({"/cgi-bin/dl_cgi", "/vars", "/auth"})


def is_proxied(path: str) -> bool:
    """Whether a route path (``gateway.scopes.route_path``) is the PVS's, answered by the ``Proxy``."""
    return path in PROXIED_PATHS or path.startswith("/cgi-bin/dl_cgi/")


class VarsAliases:
    """The LocalAPI's ``cache=<id>`` stored queries, kept by the gateway per caller.

    Forwarding ``cache=`` would store state on the PVS that any other client
    could read back; keeping the alias here keeps callers apart and the PVS
    untouched.
    """

    def __init__(self, limit: int = 1024) -> None:
        self._limit = limit
        self._aliases: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()

    def define(self, who: str, cache_id: str, selector: str) -> None:
        self._aliases[(who, cache_id)] = selector
        self._aliases.move_to_end((who, cache_id))
        while len(self._aliases) > self._limit:
            self._aliases.popitem(last=False)

    def resolve(self, who: str, cache_id: str) -> str | None:
        return self._aliases.get((who, cache_id))


class Proxy:
    def __init__(
        self,
        settings: Settings,
        *,
        cache: ResponseCache,
        upstream: UpstreamClient,
        local: dict[str, LocalHandler],
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._upstream = upstream
        self._local = local
        self._aliases = VarsAliases()
        self._max_params = settings.server.max_query_params

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            resource = self.resolve(scope)
            if resource.kind == "local":
                await self._local[resource.name](scope, receive, send, resource)
                return
            lookup = await self.lookup(resource)
        except GatewayError as exc:
            scope.setdefault("state", {})["gateway.detail"] = exc.detail
            await send_problem(send, exc, head=scope["method"] == "HEAD")
            return
        await send_prepared(send, *self._answer(scope, lookup))

    def _answer(self, scope: Scope, lookup: Lookup) -> tuple[int, list[Header], bytes]:
        scope.setdefault("state", {})["gateway.cache"] = lookup.cache_status
        entry = lookup.entry
        return entry.status, self._answer_headers(lookup), b"" if scope["method"] == "HEAD" else entry.body

    def _classify(self, scope: Scope) -> Resource:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        root = scope.get("root_path", "").encode()
        if root and raw_path.startswith(root):
            raw_path = raw_path[len(root) :]
        return classify(raw_path, scope.get("query_string", b""), max_params=self._max_params)

    def resolve(self, scope: Scope) -> Resource:
        resource = self._classify(scope)
        if resource.kind == "vars" and resource.cache_id is not None:
            who = _caller(scope)
            if resource.selector:
                self._aliases.define(who, resource.cache_id, resource.selector)
            else:
                selector = self._aliases.resolve(who, resource.cache_id)
                if selector is None:
                    raise RequestRejected(
                        f"unknown cache id {resource.cache_id!r}: define it first with match= or name= and cache=",
                        status=404,
                    )
                resource = vars_resource(selector, resource.fmt, resource.cache_id)
        return resource

    async def lookup(self, resource: Resource) -> Lookup:
        ttl = self._settings.ttl_for(resource.name)
        return await self._cache.get(resource.key, ttl, lambda: self.fetch(resource))

    async def fetch(self, resource: Resource) -> Fetched:
        fetched = await self._upstream.fetch(resource.target)
        if resource.key == DEVICE_LIST_KEY and fetched.status == 200:
            self._observe_uptime(fetched.body)
        return fetched

    def _observe_uptime(self, body: bytes) -> None:
        try:
            devices = json.loads(body).get("devices", [])
            pvs = next(d for d in devices if isinstance(d, dict) and d.get("DEVICE_TYPE") == "PVS")
            self._upstream.health.observe_uptime(float(pvs["dl_uptime"]))
        except (ValueError, TypeError, KeyError, StopIteration, AttributeError):
            pass  # a DeviceList without a PVS entry still serves its callers

    def _answer_headers(self, lookup: Lookup) -> list[Header]:
        entry = lookup.entry
        return [(b"content-type", JSON), (b"content-length", b"%d" % len(entry.body)), *self._headers(lookup)]

    def _headers(self, lookup: Lookup) -> list[Header]:
        entry = lookup.entry
        fresh_for = max(0, int(entry.ttl - lookup.age))
        headers: list[Header] = [
            (b"age", b"%d" % int(lookup.age)),
            (b"cache-status", lookup.cache_status.encode()),
            (b"cache-control", b"private, max-age=%d" % fresh_for),
            (b"last-modified", entry.last_modified),
        ]
        if lookup.error is not None:
            headers.append((b"proxy-status", lookup.error.proxy_status().encode()))
        return headers


def _caller(scope: Scope) -> str:
    principal: Principal | None = scope.get("state", {}).get("principal")
    return principal.id if principal is not None else "anonymous"
