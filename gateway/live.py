"""Live power for every listener, from one source, and the record of it.

Sources, one at a time:
- LocalAPI firmware: the PVS's telemetry WebSocket, one upstream socket
  whatever the number of listeners (``gateway.telemetry``). With
  ``cluster.redis_url``, one for all the gateways on that Redis: the holder of
  a lease opens it and publishes each event on a Redis channel the others
  relay (``Feed._share_socket``);
- otherwise (legacy firmware, no socket, or telemetry off on the PVS): each
  new answer of the polled site resource in the cache (DeviceList, or
  ``/vars?match=/sys/``). The seam is the cache itself: the feed looks at the
  stored entry once a second (``peek``, never fetching) and publishes when it
  was replaced. While someone listens and no frames come, it asks for a
  refresh when the entry is stale, at most once per TTL, inside the upstream
  budget (the rule /metrics follows).

``GET /api/v1/live`` streams Server-Sent Events: ``event: power`` with the
normalized fields of /api/v1/summary, a comment line every ``live.heartbeat``
seconds, and ``retry:`` so browsers reconnect. Each listener has a queue of
``live.queue_size`` events: one that falls further behind, or whose
connection takes nothing for ``live.write_timeout``, is disconnected (the
others are not slowed: publishing never waits). Listeners are capped in
total and per identity (429 problem). A stream ends after
``live.max_duration`` and the client reconnects with its credentials, so a
revoked key or session stops streaming within that time.

``GET /api/v1/history`` answers what ``gateway.history`` recorded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.errors import PROBLEM_TYPE, GatewayError, problem_body
from gateway.history import FIELDS, History, HistoryError, parse_bounds
from gateway.normalize import SiteReading, iso, kw, num
from gateway.scopes import request_state
from gateway.settings import LiveSettings, Settings
from gateway.shared import Shared
from gateway.telemetry import IDLE_TIMEOUT, TelemetrySocket, socket_url

log = logging.getLogger("gateway.live")

WATCH_INTERVAL = 1.0  # seconds between looks at the cached site
ENABLE_VAR = "/sys/telemetryws/enable"
READ_ENABLE = f"/vars?name={ENABLE_VAR}&fmt=obj"
WRITE_ENABLE = f"/vars?set={ENABLE_VAR}=1&fmt=obj"
RETRY_MS = 5000  # EventSource reconnect delay
# cluster.redis_url: the gateway holding this lease holds the one telemetry socket and publishes on CHANNEL.
LEASE_KEY = "pvsgw:telemetry:holder"
CHANNEL = "pvsgw:live"
LEASE_SECONDS = 15.0
EVENT_FIELDS = FIELDS  # an event carries what a history sample records


# ---------------------------------------------------------------- what an event says


def from_frame(params: dict[str, Any], now: float) -> dict[str, Any]:
    """A telemetry frame's params -> the normalized fields (kW, kWh; net + importing)."""
    production = kw(params.get("pv_p"))
    net = kw(params.get("net_p"))
    consumption = kw(params.get("site_load_p"))
    if consumption is None and production is not None and net is not None:
        consumption = round(production + net, 4)
    soc = num(params.get("soc"))
    stamp = num(params.get("time"))
    return {
        "time": iso(stamp if stamp is not None else now),
        "production_kw": production,
        "consumption_kw": consumption,
        "net_kw": net,
        "battery_kw": kw(params.get("ess_p")),  # as the PVS signs it
        # The PVS reports a fraction (0..1) in /sys/livedata/soc; a value above 1 is taken as percent.
        "soc_percent": None if soc is None else round(soc * 100 if soc <= 1 else soc, 1),
        "lifetime_production_kwh": kw(params.get("pv_en")),
        "lifetime_consumption_kwh": kw(params.get("site_load_en")),
        "source": "telemetry",
    }


def from_site(site: SiteReading, fetched_at: float) -> dict[str, Any]:
    t = site.totals
    return {
        "time": iso(site.measured_at if site.measured_at is not None else fetched_at),
        "production_kw": t.production_kw,
        "consumption_kw": t.consumption_kw,
        "net_kw": t.net_kw,
        "battery_kw": None,
        "soc_percent": None,
        "lifetime_production_kwh": t.lifetime_production_kwh,
        "lifetime_consumption_kwh": t.lifetime_consumption_kwh,
        "lifetime_import_kwh": t.lifetime_import_kwh,
        "lifetime_export_kwh": t.lifetime_export_kwh,
        "source": "polled",
    }


def encode(event: dict[str, Any]) -> bytes:
    return b"event: power\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


# ---------------------------------------------------------------- listeners


class Full(Exception):
    def __init__(self, detail: str, limit: int, policy: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.limit = limit
        self.policy = policy


class Listener:
    """One stream's pending events: bounded; past the bound it is marked to be dropped."""

    def __init__(self, identity: str, size: int) -> None:
        self.identity = identity
        self._size = size
        self._pending: collections.deque[bytes] = collections.deque()
        self.ready = asyncio.Event()
        self.overflowed = False

    def offer(self, chunk: bytes) -> None:
        if len(self._pending) >= self._size:
            self.overflowed = True  # never buffered beyond the bound
        else:
            self._pending.append(chunk)
        self.ready.set()

    def take(self) -> bytes:
        out = b"".join(self._pending)
        self._pending.clear()
        self.ready.clear()
        return out


class Hub:
    def __init__(self, settings: LiveSettings) -> None:
        self._settings = settings
        self._listeners: set[Listener] = set()
        self._per_identity: collections.Counter[str] = collections.Counter()
        self.latest: bytes | None = None
        self.published = 0
        self.dropped = 0  # disconnected for not reading
        self.refused = 0  # over a cap

    def __len__(self) -> int:
        return len(self._listeners)

    def subscribe(self, identity: str) -> Listener:
        s = self._settings
        if len(self._listeners) >= s.max_listeners:
            self.refused += 1
            raise Full("too many live listeners on this gateway; try again later", s.max_listeners, "live-total")
        if self._per_identity[identity] >= s.max_listeners_per_identity:
            self.refused += 1
            raise Full(
                f"at most {s.max_listeners_per_identity} live streams per identity; close one first",
                s.max_listeners_per_identity,
                "live-identity",
            )
        listener = Listener(identity, s.queue_size)
        self._listeners.add(listener)
        self._per_identity[identity] += 1
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.discard(listener)
            self._per_identity[listener.identity] -= 1
            if self._per_identity[listener.identity] <= 0:
                del self._per_identity[listener.identity]

    def publish(self, event: dict[str, Any]) -> None:
        chunk = encode(event)
        self.latest = chunk
        self.published += 1
        for listener in self._listeners:
            listener.offer(chunk)


class Stalled(Exception):
    pass


class LiveEndpoint:
    """``GET /api/v1/live``: an ASGI app, so a stalled connection can be given up on."""

    def __init__(self, hub: Hub, settings: LiveSettings) -> None:
        self._hub = hub
        self._settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = request_state(scope).principal
        identity = principal.id if principal is not None else "anonymous"
        try:
            listener = self._hub.subscribe(identity)
        except Full as exc:
            await _refuse(send, exc)
            return
        try:
            await self._stream(scope, receive, send, listener)
        finally:
            self._hub.unsubscribe(listener)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, listener: Listener) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx; Traefik streams text/event-stream unbuffered
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope.get("method") == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        s = self._settings
        loop = asyncio.get_running_loop()
        end = loop.time() + s.max_duration
        gone = loop.create_task(_until_disconnect(receive))
        try:
            await self._write(send, f"retry: {RETRY_MS}\n: connected\n\n".encode() + (self._hub.latest or b""))
            while (left := end - loop.time()) > 0:
                waiter = loop.create_task(listener.ready.wait())
                try:
                    await asyncio.wait({waiter, gone}, timeout=min(s.heartbeat, left), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if gone.done():
                    return  # the client left
                if listener.overflowed:
                    raise Stalled(f"more than {s.queue_size} events behind")
                await self._write(send, listener.take() or b": keep-alive\n\n")
            await self._write(send, b": stream ends; reconnect\n\n", more=False)
        except Stalled as exc:
            self._hub.dropped += 1
            log.warning("live: disconnected a listener (%s) that does not read: %s", listener.identity, exc)
        finally:
            gone.cancel()

    async def _write(self, send: Send, chunk: bytes, *, more: bool = True) -> None:
        try:
            async with asyncio.timeout(self._settings.write_timeout):
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
        except TimeoutError:
            raise Stalled(f"its connection took nothing for {self._settings.write_timeout:g} s") from None


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _refuse(send: Send, exc: Full) -> None:
    body = problem_body(429, exc.detail)
    headers = [
        (b"content-type", PROBLEM_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"30"),
        # draft-ietf-httpapi-ratelimit-headers: a quota of concurrent streams, none left.
        (b"ratelimit-policy", f'"{exc.policy}";q={exc.limit};qu="concurrent-requests"'.encode()),
        (b"ratelimit", f'"{exc.policy}";r=0;t=30'.encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------- the feed


class Feed:
    """Turns whatever source is live into events and history samples."""

    def __init__(
        self,
        settings: Settings,
        *,
        hub: Hub,
        history: History,
        upstream: Any,
        peek: Callable[[], tuple[SiteReading, float] | None],
        refresh: Callable[[], None],
        shared: Shared | None = None,
    ) -> None:
        self._settings = settings
        self._hub = hub
        self.history = history
        self._upstream = upstream
        self._peek = peek
        self._refresh = refresh
        self._shared = shared
        up = settings.upstream
        self.socket = (
            TelemetrySocket(
                socket_url(up.url, up.ws_port),
                on_frame=self.frame,
                backoff_initial=min(up.backoff_initial, 5.0),
                backoff_max=max(up.backoff_max, 5.0),
            )
            if up.ws_port and up.firmware != "legacy"
            else None
        )
        self._seen: float | None = None  # fetched_at of the last polled entry handled
        self._telemetry_at = float("-inf")  # monotonic, the last telemetry event (own or relayed)
        self._id = secrets.token_hex(8)  # this gateway, in the cluster's lease
        self.holder: bool | None = None  # holds the cluster's one socket; None: on its own (no Redis)
        self._pending: set[asyncio.Task[Any]] = set()
        self.values: dict[str, Any] = {}  # the newest value of each field, whichever source
        self._new_data = asyncio.Event()

    def streaming(self) -> bool:
        """Telemetry is arriving, here or relayed (then polled refreshes are not published)."""
        return time.monotonic() - self._telemetry_at < IDLE_TIMEOUT

    def frame(self, params: dict[str, Any]) -> None:
        event = from_frame(params, time.time())
        self._telemetry_at = time.monotonic()
        self._hub.publish(event)
        self._remember(event)
        if self.holder and self._shared is not None:
            message = json.dumps({"from": self._id, "event": event}, separators=(",", ":"))
            task = asyncio.get_running_loop().create_task(self._shared.run(lambda r: r.publish(CHANNEL, message)))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def relayed(self, event: dict[str, Any]) -> None:
        """An event another gateway's socket received (cluster.redis_url)."""
        self._telemetry_at = time.monotonic()
        self._hub.publish(event)
        self._remember(event)

    def polled(self, site: SiteReading, fetched_at: float) -> None:
        event = from_site(site, fetched_at)
        if not self.streaming():
            self._hub.publish(event)
        self._remember(event)

    def _remember(self, event: dict[str, Any]) -> None:
        self.values.update({k: v for k, v in event.items() if v is not None})
        self._new_data.set()

    async def run(self) -> None:
        self.history.open()
        try:
            await asyncio.gather(self._watch(), self._subscribe(), self._record())
        finally:
            self.history.close()
            if self._shared is not None:
                await self._shared.aclose()

    async def _watch(self) -> None:
        while True:
            found = self._peek()
            if found is not None and found[1] != self._seen:
                self._seen = found[1]
                self.polled(*found)
            if len(self._hub) and not self.streaming():
                # Someone listens and no frames come. At most once per TTL, inside the budget; while
                # the firmware is unknown this is the cheap read that tells it (and so starts the socket).
                self._refresh()
            await asyncio.sleep(WATCH_INTERVAL)

    async def _record(self) -> None:
        while True:
            await self._new_data.wait()
            self._new_data.clear()
            if self.history.due():
                await self.history.offer(dict(self.values))

    async def _subscribe(self) -> None:
        if self.socket is None:
            return
        while self._upstream.firmware is None:
            await asyncio.sleep(WATCH_INTERVAL)
        if self._upstream.firmware != "localapi":
            log.info("live: legacy firmware has no telemetry socket; the live stream follows the polled data")
            return
        if self._settings.upstream.enable_telemetry:
            await self._enable_telemetry()
        if self._shared is None:
            await self.socket.run()
        else:
            await self._share_socket(self.socket)

    async def _share_socket(self, socket: TelemetrySocket) -> None:
        """With Redis: one socket for the whole cluster, held by the gateway that holds the lease.

        The holder publishes each event on a Redis channel; the others relay it to
        their listeners. A holder that stops renewing (stopped, crashed, cut off)
        loses the lease within ``LEASE_SECONDS`` and another takes over. While
        Redis is unreachable every gateway holds its own socket, as alone.
        """
        own: asyncio.Task[None] | None = None
        relay: asyncio.Task[None] | None = None
        try:
            while True:
                held = await self._shared.run(self._hold) if self._shared is not None else None
                if held is not self.holder:
                    log.info("live: %s", _ROLES[held])
                self.holder = held
                if held is not False and own is None:
                    own = asyncio.get_running_loop().create_task(socket.run(), name="telemetry-socket")
                elif held is False and own is not None:
                    await _stop(own)
                    own, socket.state = None, "idle"
                if held is False and (relay is None or relay.done()):
                    relay = asyncio.get_running_loop().create_task(self._relay(), name="telemetry-relay")
                elif held is not False and relay is not None:
                    await _stop(relay)
                    relay = None
                await asyncio.sleep(LEASE_SECONDS / 3)
        finally:
            for task in (own, relay):
                if task is not None:
                    await _stop(task)
            if self.holder and self._shared is not None:
                await self._shared.run(self._release)  # a clean stop hands the socket over at once

    async def _release(self, redis: Any) -> None:
        if await redis.get(LEASE_KEY) == self._id.encode():
            await redis.delete(LEASE_KEY)

    async def _hold(self, redis: Any) -> bool:
        ms = int(LEASE_SECONDS * 1000)
        if await redis.set(LEASE_KEY, self._id, nx=True, px=ms):
            return True
        if await redis.get(LEASE_KEY) == self._id.encode():
            await redis.pexpire(LEASE_KEY, ms)
            return True
        return False

    async def _relay(self) -> None:
        # Only with cluster.redis_url, which `check` refuses without the redis client installed.
        from redis.exceptions import RedisError

        assert self._shared is not None
        redis = self._shared.client()
        if redis is None:
            return
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                try:
                    body = json.loads(message["data"])
                except (ValueError, TypeError):
                    continue
                if isinstance(body, dict) and body.get("from") != self._id and isinstance(body.get("event"), dict):
                    self.relayed(body["event"])
        except (RedisError, OSError, TimeoutError) as exc:  # the lease loop starts a new relay (or its own socket)
            log.warning("live: relay of the cluster's telemetry stopped (%s)", type(exc).__name__)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _enable_telemetry(self) -> None:
        """At start, once: turn the PVS's telemetry on if it is off (the gateway's only write).

        Gateways starting together on one Redis: only the one that claims it checks and writes.
        """
        if self._shared is not None:
            claim = f"{LEASE_KEY}:enable"
            if await self._shared.run(lambda r: r.set(claim, self._id, nx=True, ex=600)) is False:
                log.info("telemetry: another gateway of the cluster checks the PVS's telemetry setting")
                return
        delay = 5.0
        while True:
            try:
                fetched = await self._upstream.fetch(READ_ENABLE)
                if fetched.status != 200:
                    log.warning("telemetry: the PVS has no %s (HTTP %d); not enabling it", ENABLE_VAR, fetched.status)
                    return
                if str(json.loads(fetched.body).get(ENABLE_VAR, "")).strip() == "1":
                    log.info("telemetry: already on at the PVS")
                    return
                written = await self._upstream.fetch(WRITE_ENABLE)
                if written.status == 200:
                    log.warning("telemetry: turned on at the PVS (upstream.enable_telemetry = true; the only write)")
                else:
                    log.warning("telemetry: the PVS refused to turn telemetry on (HTTP %d)", written.status)
                return
            except (GatewayError, ValueError, AttributeError) as exc:
                log.warning("telemetry: cannot check the PVS's telemetry setting yet (%s); retrying", _detail(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 300.0)


_ROLES = {
    True: "this gateway holds the cluster's telemetry socket",
    False: "relaying the telemetry socket another gateway holds",
    None: "Redis unreachable: this gateway holds its own telemetry socket",
}


async def _stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _detail(exc: Exception) -> str:
    return exc.detail if isinstance(exc, GatewayError) else type(exc).__name__


# ---------------------------------------------------------------- history API and metrics


class HistoryAPI:
    def __init__(self, history: History, clock: Callable[[], float] = time.time) -> None:
        self._history = history
        self._clock = clock

    async def answer(self, request: Request) -> Response:
        params = request.query_params
        unknown = set(params) - {"since", "until"}
        try:
            if unknown:
                raise HistoryError(f"unknown parameter {min(unknown)!r} (use since and until)")
            since, until = parse_bounds(params.get("since"), params.get("until"), self._clock())
        except HistoryError as exc:
            request_state(request.scope).detail = str(exc)
            return Response(problem_body(400, str(exc)), 400, media_type=PROBLEM_TYPE)
        samples = await self._history.query(since, until)
        body = {
            "since": iso(since),
            "until": iso(until),
            "interval_s": self._history.interval,
            "recording": self._history.enabled,
            "samples": samples,
        }
        return JSONResponse(body, headers={"Cache-Control": "private, no-cache"})


class LiveCollector:
    def __init__(self, hub: Hub, feed: Feed) -> None:
        self._hub = hub
        self._feed = feed

    def collect(self) -> Iterator[Metric]:
        p = "pvsgw_"
        hub, feed, sock = self._hub, self._feed, self._feed.socket
        yield GaugeMetricFamily(f"{p}live_listeners", "Open /api/v1/live streams", value=len(hub))
        yield CounterMetricFamily(f"{p}live_events", "Live events published", value=hub.published)
        yield CounterMetricFamily(f"{p}live_dropped", "Live listeners disconnected for not reading", value=hub.dropped)
        yield CounterMetricFamily(f"{p}live_refused", "Live listeners refused over a cap (429)", value=hub.refused)
        if sock is not None:
            state = GaugeMetricFamily(f"{p}telemetry_socket_state", "The upstream telemetry socket's state", labels=["state"])
            for name in ("idle", "connecting", "open", "waiting"):
                state.add_metric([name], 1.0 if sock.state == name else 0.0)
            yield state
            yield CounterMetricFamily(f"{p}telemetry_reconnects", "Upstream telemetry sockets reopened", value=sock.reconnects)
            yield CounterMetricFamily(f"{p}telemetry_frames", "Telemetry frames received from the PVS", value=sock.frames)
            yield CounterMetricFamily(
                f"{p}telemetry_frames_rejected", "Telemetry frames that were not power notifications", value=sock.rejected_frames
            )
        yield GaugeMetricFamily(f"{p}history_rows", "Samples in the local history file", value=feed.history.rows)


# ---------------------------------------------------------------- wiring


@dataclass(frozen=True)
class Live:
    routes: list[Route]
    background: list[Callable[[], Coroutine[Any, Any, None]]]
    collector: LiveCollector
    feed: Feed
    hub: Hub


def build(
    settings: Settings,
    *,
    upstream: Any,
    peek: Callable[[], tuple[SiteReading, float] | None],
    refresh: Callable[[], None],
    shared: Shared | None = None,
) -> Live:
    """Routes, the background task and the metrics of live data and history (no I/O until run)."""
    h = settings.history
    shared = shared if shared is not None and shared.configured else None
    history = History(
        settings.path(h.path) if h.path else None,
        interval=h.interval,
        retention_days=h.retention_days,
        shared=shared,
    )
    hub = Hub(settings.live)
    feed = Feed(settings, hub=hub, history=history, upstream=upstream, peek=peek, refresh=refresh, shared=shared)
    routes = [
        Route("/api/v1/live", LiveEndpoint(hub, settings.live)),
        Route("/api/v1/history", HistoryAPI(history).answer),
    ]
    return Live(routes, [feed.run], LiveCollector(hub, feed), feed, hub)
