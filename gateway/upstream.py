"""Talking to the PVS: one client, inside the budget, errors mapped once.

Every request the gateway sends goes through ``UpstreamClient.fetch``: the
health gate (back-off), the global budget (concurrency, pacing, queue), the
LocalAPI session (login, reuse, re-login on 401/403), a size cap on the
answer, and the translation of transport errors into the gateway's error
tree with RFC 9209 ``Proxy-Status`` types. Nothing else opens a connection
to the PVS.

A request that times out is not abandoned at the PVS's expense: the caller
gets its 504 after ``upstream.timeout``, but the exchange goes on holding its
budget slot until the PVS answers (the answer still fills the cache, see
``StillWorking``) or ``upstream.busy_hold`` more seconds pass. A caller that
hangs up does not cut the exchange short either.

With a ``Shared`` Redis, the detected firmware and the LocalAPI session are
shared: one login serves every gateway (logins happen inside the cluster-wide
budget, so they do not race).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from gateway import __version__
from gateway.budget import Slot, UpstreamBudget
from gateway.errors import (
    Overloaded,
    UpstreamBadResponse,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamUnavailable,
)
from gateway.health import UpstreamHealth
from gateway.pinning import ClosedWithoutAnswer
from gateway.pvsbody import dumps, parse_json_object, strip_secret_vars
from gateway.settings import UpstreamSettings
from gateway.shared import Shared, key

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.upstream")

MAX_BODY_BYTES = 8 * 1024 * 1024  # the largest real answer (GridProfileRefresh) is ~55 KB
PROBE_TARGET = "/vars?name=/sys/info/serialnum&fmt=obj"
SERIAL_VAR = "/sys/info/serialnum"
SESSION_KEY = key("pvs", "session")  # hash: session, at (Unix time of the login)
FIRMWARE_KEY = key("pvs", "firmware")  # hash: firmware, serial
FIRMWARE_KEEP = 3600  # seconds


@dataclass(frozen=True, slots=True)
class Fetched:
    """A usable PVS answer: 200 with a JSON object, or a 4xx to pass on."""

    status: int
    body: bytes
    fetched_at: float  # wall clock, when the PVS answered


def error_kind(exc: UpstreamError) -> str:
    """A short label for metrics and logs."""
    return {
        "UpstreamTimeout": "timeout",
        "StillWorking": "timeout",
        "UpstreamConnectTimeout": "connect_timeout",
        "UpstreamRefused": "refused",
        "UpstreamUnavailable": "unavailable",
        "UpstreamBadResponse": "bad_response",
        "UpstreamTLSError": "tls",
        "PinMismatchError": "tls",
        "LoginFailed": "login",
    }.get(type(exc).__name__, "error")


class LoginFailed(UpstreamBadResponse):
    pass


class AlreadyFilled(Exception):
    """The request got its slot, but what it was for is no longer needed (see ``still_needed``)."""


# Set by the cache around a fill, and asked once the request has its slot: a resource filled
# while the request waited for the PVS (a late answer, another gateway) is not fetched again.
still_needed: contextvars.ContextVar[Callable[[], Awaitable[bool]] | None] = contextvars.ContextVar(
    "still_needed", default=None
)


class StillWorking(UpstreamTimeout):
    """The caller's time is up but the PVS may still answer: ``late`` resolves to that answer."""

    def __init__(self, detail: str, *, late: asyncio.Future[Any], **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.late = late


class UpstreamClient:
    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        transport: httpx.AsyncBaseTransport,
        budget: UpstreamBudget,
        health: UpstreamHealth,
        shared: Shared | None = None,
    ) -> None:
        self._settings = settings
        self.budget = budget
        self.health = health
        self._shared = shared if shared is not None and shared.configured else None
        self._http = httpx.AsyncClient(
            base_url=settings.url,
            transport=transport,
            # The caller waits ``timeout``; the exchange itself may go on for ``busy_hold`` more.
            timeout=httpx.Timeout(settings.timeout + settings.busy_hold, connect=settings.connect_timeout),
            headers={"User-Agent": f"pvs-gateway/{__version__}", "Accept": "application/json"},
            follow_redirects=False,
        )
        self.firmware: str | None = None if settings.firmware == "auto" else settings.firmware
        self.serial = settings.serial
        self._session: str | None = None
        self._session_at = 0.0
        self.last_request_mono = 0.0
        self.requests = 0
        self.late_answers = 0  # answers that came after their caller's timeout (and filled the cache)
        self._background: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        await self.budget.aclose()
        await self._http.aclose()

    async def fetch(self, target: str) -> Fetched:
        """GET ``target`` (an allowlisted, canonical path+query) from the PVS."""
        await self.health.pull()
        self.health.check()
        try:
            async with self.budget.slot() as slot:
                needed = still_needed.get()
                if needed is not None and not await needed():
                    raise AlreadyFilled(target)
                fetched = await self._fetch_in_slot(target, slot)
        except Overloaded:
            raise  # our own queue, not the PVS's fault
        except UpstreamError as exc:
            await self.health.record_failure(error_kind(exc), exc.detail)
            raise
        await self.health.record_success()
        return fetched

    # -------------------------------------------------------------- internals

    async def _fetch_in_slot(self, target: str, slot: Slot) -> Fetched:
        try:
            if self.firmware is None and not await self._adopt_firmware():
                await self._detect_firmware(slot)
            if self.firmware == "localapi" and self._session_expired() and not await self._adopt_session():
                await self._login(slot)
        except StillWorking as exc:  # a probe or login: its late answer is of no use to the caller
            raise UpstreamTimeout(exc.detail, retry_after=exc.retry_after) from None
        response = await self._send_for(target, slot)
        if self.firmware == "localapi" and response.status_code in (401, 403):
            # Sessions expire and vanish on reboot: log in again once (unless another gateway
            # already has: its new session is the cluster's), then give up.
            await self._forget_session()
            if not await self._adopt_session():
                await self._login(slot)
            response = await self._send_for(target, slot)
        return self._interpret(response, target)

    async def _send_for(self, target: str, slot: Slot) -> _Answer:
        try:
            return await self._send(target, slot)
        except StillWorking as exc:
            late = self._late(exc.late, target)
            slot.keep_until(late)  # released once the answer is interpreted (and stored by the cache)
            raise StillWorking(exc.detail, late=late, retry_after=exc.retry_after) from None

    def _late(self, exchange: asyncio.Future[Any], target: str) -> asyncio.Future[Fetched]:
        """What the PVS finally answers to a timed-out request, as the caller would have had it."""

        async def interpret() -> Fetched:
            answer: _Answer = await exchange
            return self._interpret(answer, target)

        def done(task: asyncio.Future[Fetched]) -> None:
            if not task.cancelled() and task.exception() is None:
                self.late_answers += 1
                recorded = asyncio.get_running_loop().create_task(self.health.record_success())
                self._background.add(recorded)
                recorded.add_done_callback(self._background.discard)

        task = asyncio.get_running_loop().create_task(interpret(), name=f"late {target}")
        task.add_done_callback(done)
        return task

    def _session_expired(self) -> bool:
        age = time.monotonic() - self._session_at
        return self._session is None or age > self._settings.session_max_age

    async def _send(self, target: str, slot: Slot, *, auth: str | None = None) -> _Answer:
        await self.budget.pace()
        headers = {}
        if auth:
            headers["Authorization"] = auth
        elif self._session and self.firmware == "localapi":
            headers["Cookie"] = f"session={self._session}"
        self.last_request_mono = time.monotonic()
        self.requests += 1
        # The exchange runs as its own task: neither the caller's timeout nor its hanging up
        # cuts it short while the PVS works on it, and its slot stays held until it ends.
        exchange = asyncio.get_running_loop().create_task(self._exchange(target, headers), name=f"pvs {target}")
        try:
            async with asyncio.timeout(self._settings.timeout):
                return await asyncio.shield(exchange)
        except TimeoutError:
            slot.keep_until(exchange)
            exchange.add_done_callback(_retrieve)
            raise StillWorking("the PVS did not answer in time", late=exchange, retry_after=10) from None
        except asyncio.CancelledError:
            slot.keep_until(exchange)
            exchange.add_done_callback(_retrieve)
            raise

    async def _exchange(self, target: str, headers: dict[str, str]) -> _Answer:
        try:
            async with self._http.stream("GET", target, headers=headers) as response:
                body = await _read_capped(response)
                return _Answer(response.status_code, body, response.headers.get("set-cookie", ""))
        except UpstreamError:
            raise
        except httpx.HTTPError as exc:
            raise map_transport_error(exc, self._settings.url) from None
        finally:
            # Silence (for the keep-alive) counts from the end of the last exchange.
            self.last_request_mono = time.monotonic()

    def _interpret(self, answer: _Answer, target: str) -> Fetched:
        status = answer.status_code
        if status == 200:
            body, value = parse_json_object(answer.body)
            if target.startswith("/vars"):
                value, removed = strip_secret_vars(value)
                if removed:
                    body = dumps(value)
            return Fetched(200, body, time.time())
        if status in (401, 403):
            hint = (
                "the LocalAPI login was not accepted"
                if self.firmware == "localapi"
                else "this firmware may need the LocalAPI: set upstream.firmware = \"localapi\" (or \"auto\")"
            )
            raise UpstreamBadResponse(f"the PVS refused the gateway (HTTP {status}); {hint}", received_status=status)
        if 400 <= status < 500:
            # The PVS is alive and said no (e.g. 400 for a match without devices): pass it on.
            try:
                body, _ = parse_json_object(answer.body)
            except UpstreamBadResponse:
                body = dumps({"status": status, "description": "the PVS refused this request"})
            return Fetched(status, body, time.time())
        if status == 503:
            raise UpstreamUnavailable("the PVS is busy (HTTP 503)", received_status=status, retry_after=10)
        raise UpstreamBadResponse(f"the PVS answered HTTP {status}", received_status=status)

    async def _detect_firmware(self, slot: Slot) -> None:
        """LocalAPI firmware answers a few /vars reads without a session; legacy does not."""
        answer = await self._send(PROBE_TARGET, slot)
        firmware = "legacy"
        if answer.status_code == 200:
            try:
                _, value = parse_json_object(answer.body)
            except UpstreamBadResponse:
                value = {}
            if SERIAL_VAR in value:
                firmware = "localapi"
                self.serial = self.serial or str(value[SERIAL_VAR])
        log.info("PVS firmware detected: %s", firmware)
        self.firmware = firmware
        if self._shared is not None:
            mapping = {"firmware": firmware, "serial": self.serial}

            async def publish(redis: Redis) -> None:
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.hset(FIRMWARE_KEY, mapping=mapping)  # type: ignore[arg-type]
                    pipe.expire(FIRMWARE_KEY, FIRMWARE_KEEP)  # a firmware update is noticed within the hour
                    await pipe.execute()

            await self._shared.run(publish)

    async def _adopt_firmware(self) -> bool:
        """The firmware another gateway detected (one probe for the cluster, not one each)."""
        if self._shared is None:
            return False
        found = await self._shared.run(lambda r: r.hgetall(FIRMWARE_KEY))
        firmware = _text((found or {}).get(b"firmware"))
        if firmware not in ("legacy", "localapi"):
            return False
        self.firmware = firmware
        self.serial = self.serial or _text((found or {}).get(b"serial"))
        log.info("PVS firmware (from the cluster): %s", firmware)
        return True

    async def _adopt_session(self) -> bool:
        """The LocalAPI session another gateway (or this one, before) logged in with."""
        if self._shared is None:
            return False
        found = await self._shared.run(lambda r: r.hgetall(SESSION_KEY))
        session = _text((found or {}).get(b"session"))
        if not session:
            return False
        age = max(0.0, time.time() - float(_text((found or {}).get(b"at")) or 0))
        if age > self._settings.session_max_age:
            return False
        self._session = session
        self._session_at = time.monotonic() - age
        return True

    async def _forget_session(self) -> None:
        """Drop a session the PVS refused, here and (if it is still the shared one) in Redis."""
        refused, self._session = self._session, None
        if self._shared is not None and refused:

            async def op(redis: Redis) -> None:
                if (await redis.hget(SESSION_KEY, "session")) == refused.encode():
                    await redis.delete(SESSION_KEY)

            await self._shared.run(op)

    async def _learn_serial(self, slot: Slot) -> None:
        answer = await self._send(PROBE_TARGET, slot)
        if answer.status_code == 200:
            _, value = parse_json_object(answer.body)
            self.serial = str(value.get(SERIAL_VAR, ""))
        if len(self.serial) < 5:
            raise LoginFailed("cannot log in to the PVS: set upstream.serial or upstream.password")

    async def _login(self, slot: Slot) -> None:
        password = self._settings.password.get()
        if not password:
            if not self.serial:
                await self._learn_serial(slot)
            password = self.serial[-5:]
        token = base64.b64encode(f"ssm_owner:{password}".encode()).decode()
        answer = await self._send("/auth?login", slot, auth=f"basic {token}")
        if answer.status_code != 200:
            raise LoginFailed(
                f"the PVS refused the gateway's LocalAPI login (HTTP {answer.status_code}): "
                "check upstream.serial or upstream.password",
                received_status=answer.status_code,
            )
        session = _session_from(answer)
        if not session:
            raise LoginFailed("the PVS accepted the login but sent no session")
        self._session = session
        self._session_at = time.monotonic()
        log.info("logged in to the PVS LocalAPI")
        if self._shared is not None:
            ttl_ms = int(self._settings.session_max_age * 1000)

            async def publish(redis: Redis) -> None:
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.hset(SESSION_KEY, mapping={"session": session, "at": repr(time.time())})
                    pipe.pexpire(SESSION_KEY, ttl_ms)
                    await pipe.execute()

            await self._shared.run(publish)


@dataclass(frozen=True, slots=True)
class _Answer:
    status_code: int
    body: bytes
    set_cookie: str


def _session_from(answer: _Answer) -> str | None:
    for part in answer.set_cookie.split(";"):
        name, _, value = part.strip().partition("=")
        if name == "session" and value:
            return value
    try:
        value = json.loads(answer.body).get("session")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Collect the outcome of an exchange nobody waits for any more (no "never retrieved" warning)."""
    if not task.cancelled():
        task.exception()


async def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise UpstreamBadResponse(f"the PVS sent more than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def map_transport_error(exc: httpx.HTTPError, url: str) -> UpstreamError:
    """Translate an httpx error into the gateway's tree, once, here."""
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamConnectTimeout(f"connecting to the PVS at {url} timed out", retry_after=10)
    if isinstance(exc, httpx.ConnectError):
        if _caused_by(exc, ssl.SSLError):
            return UpstreamTLSError(f"TLS with the PVS failed: {exc}")
        return UpstreamRefused(f"cannot connect to the PVS at {url}: {exc or 'refused'}", retry_after=10)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout("the PVS did not answer in time", retry_after=10)
    if isinstance(exc, ClosedWithoutAnswer):  # told apart by the PVS's transport (gateway.pinning)
        return UpstreamUnavailable("the PVS closed the connection without answering (rebooting?)", retry_after=10)
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamBadResponse(f"the PVS sent an incomplete answer: {exc}")
    if isinstance(exc, httpx.NetworkError):
        return UpstreamUnavailable(f"the connection to the PVS failed: {exc}", retry_after=10)
    return UpstreamBadResponse(f"unexpected answer from the PVS: {exc}")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is among the exceptions that led to ``exc`` (its cause and context chain)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
