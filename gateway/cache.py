"""The response cache: what keeps a 10-second, crash-prone PVS usable.

For each canonical resource key:
- fresh (age < ttl): served from memory;
- stale but within the revalidation window: served at once while exactly one
  background refresh runs (RFC 5861 stale-while-revalidate);
- missing or too old: one upstream fetch, however many callers are waiting
  (single flight: the fetch runs as its own task, so a caller hanging up does
  not cancel it for the others);
- the fetch fails: the last good answer is served while younger than
  ``max_stale`` (stale-if-error), marked as such; past it the error goes out.

Every answer carries an honest RFC 9211 ``Cache-Status``. Memory is bounded
by entry count and bytes (least recently used out first).

With a ``Shared`` Redis the memory cache is the first level and Redis the
second, shared by every gateway (SPEC §2 ``[cluster]``):
- every answer fetched is written to Redis (kept ``ttl + max_stale``), so a
  gateway whose own copy is missing or stale takes a newer one from there
  before it thinks of the PVS;
- a fill takes a per-resource lock in Redis (``Lease``: it expires if its
  holder dies, and is renewed while the fetch runs), so one fetch per resource
  is in flight cluster-wide; the other gateways poll Redis for its result (or
  its failure, then serve stale if they can) instead of fetching too.
While Redis is unreachable each gateway fills its own cache as before.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING

from gateway.errors import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.settings import CacheSettings
from gateway.shared import Lease, Shared
from gateway.shared import key as shared_key
from gateway.upstream import AlreadyFilled, Fetched, StillWorking, still_needed

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.cache")
NAME = "pvs-gateway"
LOCK_TTL = 5.0  # a fill's lock, renewed while it runs: a dead holder frees it within this
POLL_MIN, POLL_MAX = 0.02, 0.2  # seconds between looks at Redis while another gateway fills
RECHECK = 0.2  # a stale local entry asks Redis for a newer copy at most this often


@dataclass(slots=True)
class Entry:
    status: int
    body: bytes
    stored: float  # monotonic
    fetched_at: float  # wall clock
    ttl: float
    last_modified: bytes  # precomputed HTTP-date of fetched_at

    @property
    def size(self) -> int:
        return len(self.body) + 200


@dataclass(slots=True)
class Lookup:
    entry: Entry
    age: float
    cache_status: str
    error: UpstreamError | None = None  # set when stale was served because the PVS failed


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale_revalidating: int = 0
    stale_on_error: int = 0
    collapsed: int = 0
    stored: int = 0
    evicted: int = 0
    refresh_failures: int = 0
    from_cluster: int = 0  # entries another gateway fetched, taken from Redis

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


Fetch = Callable[[], Awaitable[Fetched]]


class ResponseCache:
    def __init__(
        self,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        is_failing: Callable[[], bool] = lambda: False,
        shared: Shared | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._wall = wall
        self._is_failing = is_failing
        self._shared = shared if shared is not None and shared.configured else None
        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Task[Entry]] = {}
        self._checked: dict[str, float] = {}  # key -> when Redis was last asked for a newer copy
        self._late: set[asyncio.Task[None]] = set()
        self._landed: dict[str, asyncio.Event] = {}  # set when an entry for the key is stored
        self._bytes = 0
        self.stats = CacheStats()

    # -------------------------------------------------------------- reading

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: str) -> Entry | None:
        """The stored entry, whatever its age; never fetches."""
        return self._entries.get(key)

    def age(self, entry: Entry) -> float:
        return max(0.0, self._clock() - entry.stored)

    def fresh(self, key: str) -> Lookup | None:
        """The lookup of a fresh entry, not yet counted (``count_hit`` does); None if missing or stale."""
        entry = self._entries.get(key)
        if entry is not None:
            age = self._clock() - entry.stored
            if age < entry.ttl:
                return Lookup(entry, age, f"{NAME}; hit; ttl={int(entry.ttl - age)}")
        return None

    def count_hit(self, key: str) -> None:
        self._entries.move_to_end(key)
        self.stats.hits += 1

    async def get(self, key: str, ttl: float, fetch: Fetch) -> Lookup:
        found = self.fresh(key)
        if found is None and self._shared is not None and key not in self._inflight:
            await self._adopt_newer(key)
            found = self.fresh(key)
        if found is not None:
            self.count_hit(key)
            return found
        entry = self._entries.get(key)
        if entry is not None:
            age = self._clock() - entry.stored
            if entry.status == 200 and age < self._swr_limit(entry):
                self.refresh(key, ttl, fetch)
                self.stats.stale_revalidating += 1
                over = int(age - entry.ttl) + 1
                if self._is_failing():
                    return Lookup(entry, age, f"{NAME}; fwd=stale; ttl=-{over}; detail=pvs-failing")
                return Lookup(entry, age, f"{NAME}; hit; ttl=-{over}; detail=revalidating")
        task = self._inflight.get(key)
        collapsed = task is not None
        if task is None:
            task = self._start(key, ttl, fetch)
        if collapsed:
            self.stats.collapsed += 1
        else:
            self.stats.misses += 1
        try:
            fresh = await self._wait_for_fill(key, task)
        except UpstreamError as exc:
            stale = self._entries.get(key)
            if stale is not None and stale.status == 200:
                age = self._clock() - stale.stored
                if age <= self._settings.max_stale:
                    self.stats.stale_on_error += 1
                    over = int(age - stale.ttl) + 1
                    return Lookup(stale, age, f"{NAME}; fwd=stale; ttl=-{over}; detail=pvs-error", exc)
            raise
        fwd = "stale" if entry is not None else "miss"
        extra = "; collapsed" if collapsed else "; stored"
        return Lookup(fresh, self.age(fresh), f"{NAME}; fwd={fwd}; fwd-status={fresh.status}{extra}")

    def _swr_limit(self, entry: Entry) -> float:
        return min(entry.ttl + self._settings.stale_while_revalidate, self._settings.max_stale)

    # -------------------------------------------------------------- filling

    def refresh(self, key: str, ttl: float, fetch: Fetch) -> None:
        """Start a background refresh of ``key`` unless one is already running."""
        if key not in self._inflight:
            self._start(key, ttl, fetch)

    def _start(self, key: str, ttl: float, fetch: Fetch) -> asyncio.Task[Entry]:
        task = asyncio.get_running_loop().create_task(self._fill(key, ttl, fetch), name=f"cache-fill {key}")
        self._inflight[key] = task
        task.add_done_callback(self._filled)
        return task

    async def _wait_for_fill(self, key: str, task: asyncio.Task[Entry]) -> Entry:
        """The fill's entry, or a fresh one stored before it ends (a late answer, another gateway's).

        A fill waiting for its turn at the PVS finds the entry fresh when its turn comes and
        does not fetch (``still_needed``); its callers need not wait for that turn.
        """
        landed = self._landed.setdefault(key, asyncio.Event())
        waiter = asyncio.ensure_future(landed.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)  # never cancels the fill
        finally:
            waiter.cancel()
        if not task.done():
            found = self.fresh(key)
            if found is not None:
                return found.entry
        return await asyncio.shield(task)

    def _filled(self, task: asyncio.Task[Entry]) -> None:
        # Retrieve the outcome so a failed background refresh is counted, not reported as lost.
        if not task.cancelled() and task.exception() is not None:
            self.stats.refresh_failures += 1

    async def _fill(self, key: str, ttl: float, fetch: Fetch) -> Entry:
        try:
            if self._shared is None:
                return await self._fetch_and_store(key, ttl, fetch)
            return await self._fill_shared(self._shared, key, ttl, fetch)
        finally:
            self._inflight.pop(key, None)
            self._landed.pop(key, None)  # its waiters see the fill's own outcome

    async def _fetch_and_store(self, key: str, ttl: float, fetch: Fetch) -> Entry:
        async def needed() -> bool:
            if self.fresh(key) is None and self._shared is not None:
                await self._adopt_newer(key, force=True)
            return self.fresh(key) is None

        token = still_needed.set(needed)
        try:
            fetched = await fetch()
        except StillWorking as exc:
            # The caller's time is up, but the PVS's answer, when it comes, still serves the next one.
            self._on_late(key, ttl, exc.late)
            raise
        except AlreadyFilled:
            entry = self._entries.get(key)  # fresh when needed() looked
            if entry is not None:
                return entry
            return await self._fetch_and_store(key, ttl, fetch)  # evicted since (a full cache): fetch after all
        finally:
            still_needed.reset(token)
        return await self._keep(key, ttl, fetched)

    async def _keep(self, key: str, ttl: float, fetched: Fetched) -> Entry:
        entry = self._entry(ttl, fetched)
        self._store(key, entry)
        await self._publish(key, entry)
        return entry

    def _entry(self, ttl: float, fetched: Fetched) -> Entry:
        entry_ttl = ttl if fetched.status == 200 else min(ttl, self._settings.error_ttl)
        age = max(0.0, self._wall() - fetched.fetched_at)
        return Entry(
            fetched.status,
            fetched.body,
            self._clock() - age,
            fetched.fetched_at,
            entry_ttl,
            formatdate(fetched.fetched_at, usegmt=True).encode(),
        )

    def _on_late(self, key: str, ttl: float, late: asyncio.Future[Fetched]) -> None:
        # Stored in the done-callback itself, before the slot it held can go to a fill
        # queued for the same resource (which then finds it fresh and does not fetch).
        def landed(done: asyncio.Future[Fetched]) -> None:
            if done.cancelled() or done.exception() is not None:
                return  # the late answer failed too; its caller was told already
            entry = self._entry(ttl, done.result())
            if entry.fetched_at <= _fetched_at(self._entries.get(key)):
                return  # something newer came in meanwhile
            self._store(key, entry)
            task = asyncio.get_running_loop().create_task(self._publish(key, entry), name=f"cache-late {key}")
            self._late.add(task)
            task.add_done_callback(self._late.discard)

        late.add_done_callback(landed)

    # -------------------------------------------------------------- cluster

    async def _fill_shared(self, shared: Shared, key: str, ttl: float, fetch: Fetch) -> Entry:
        """One fetch per resource cluster-wide: fetch under the resource's lock, or wait for its holder's."""
        known = self._entries.get(key)
        since = known.fetched_at if known is not None else 0.0
        began = self._wall()
        lock = Lease(shared, shared_key("cache", "lock", key), LOCK_TTL)
        pause = POLL_MIN
        while True:
            got = await lock.acquire()
            if got is None:
                return await self._fetch_and_store(key, ttl, fetch)  # Redis unreachable: fetch alone
            if got:
                return await self._fetch_locked(shared, lock, key, ttl, fetch, since)
            await asyncio.sleep(pause)
            pause = min(POLL_MAX, pause * 2)
            entry = await self._read_shared(key)
            if entry is not None and entry.fetched_at > since:
                self.stats.from_cluster += 1
                self._store(key, entry)
                return entry
            await self._raise_shared_failure(shared, key, began)

    async def _fetch_locked(self, shared: Shared, lock: Lease, key: str, ttl: float, fetch: Fetch, since: float) -> Entry:
        async def renew() -> None:
            while True:
                await asyncio.sleep(LOCK_TTL / 3)
                await lock.renew()

        renewer = asyncio.get_running_loop().create_task(renew(), name=f"cache-lock {key}")
        try:
            # Another gateway may have filled it between our look and our lock.
            entry = await self._read_shared(key)
            if entry is not None and entry.fetched_at > since and self._clock() - entry.stored < entry.ttl:
                self.stats.from_cluster += 1
                self._store(key, entry)
                return entry
            try:
                return await self._fetch_and_store(key, ttl, fetch)
            except UpstreamError as exc:
                failure = {"at": repr(self._wall()), "status": str(exc.status), "detail": exc.detail}
                await shared.run(lambda r: _write_failure(r, key, failure, max(LOCK_TTL, self._settings.error_ttl)))
                raise
        finally:
            renewer.cancel()
            await lock.release()

    async def _raise_shared_failure(self, shared: Shared, key: str, began: float) -> None:
        """Raise what the gateway that held the lock met, if it failed since we began waiting."""
        found = await shared.run(lambda r: r.hgetall(shared_key("cache", "failed", key)))
        values = {_text(k): _text(v) for k, v in (found or {}).items()}
        if float(values.get("at") or 0) < began:
            return
        detail = f"{values.get('detail', 'the PVS failed')} (seen by another gateway)"
        status = values.get("status")
        kind = UpstreamTimeout if status == "504" else UpstreamUnavailable if status == "503" else UpstreamBadResponse
        raise kind(detail, retry_after=10)

    async def _adopt_newer(self, key: str, *, force: bool = False) -> None:
        """Take the cluster's copy of ``key`` when it is newer than ours (asked at most every RECHECK s)."""
        now = self._clock()
        if not force and now - self._checked.get(key, -RECHECK) < RECHECK:
            return
        self._checked[key] = now
        if len(self._checked) > 4 * self._settings.max_entries:
            self._checked.clear()
        entry = await self._read_shared(key, newer_than=_fetched_at(self._entries.get(key)))
        if entry is not None:
            self.stats.from_cluster += 1
            self._store(key, entry)

    async def _read_shared(self, key: str, newer_than: float = 0.0) -> Entry | None:
        """The entry Redis holds for ``key`` if newer than ``newer_than`` (wall clock); else None."""
        assert self._shared is not None

        async def op(redis: Redis) -> Entry | None:
            name = shared_key("cache", "entry", key)
            fetched_at = await redis.hget(name, "fetched_at")
            if fetched_at is None or float(fetched_at) <= newer_than:
                return None  # the body (tens of KB) is read only when it is worth having
            status, body, at, ttl = await redis.hmget(name, ["status", "body", "fetched_at", "ttl"])
            if status is None or body is None or at is None or ttl is None:
                return None
            stamp = float(at)
            age = max(0.0, self._wall() - stamp)
            return Entry(int(status), _bytes(body), self._clock() - age, stamp, float(ttl), formatdate(stamp, usegmt=True).encode())

        return await self._shared.run(op)

    async def _publish(self, key: str, entry: Entry) -> None:
        if self._shared is None:
            return
        keep_ms = int((entry.ttl + self._settings.max_stale + 60) * 1000)
        fields = {"status": str(entry.status), "body": entry.body, "fetched_at": repr(entry.fetched_at), "ttl": repr(entry.ttl)}

        async def op(redis: Redis) -> None:
            name = shared_key("cache", "entry", key)
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hset(name, mapping=fields)  # type: ignore[arg-type]
                pipe.pexpire(name, keep_ms)
                await pipe.execute()

        await self._shared.run(op)

    def _store(self, key: str, entry: Entry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        if entry.size > self._settings.max_bytes // 4:
            log.warning("not caching %s: %d bytes is too large for the cache", key, entry.size)
            return
        self._entries[key] = entry
        self._bytes += entry.size
        self.stats.stored += 1
        landed = self._landed.pop(key, None)
        if landed is not None:
            landed.set()
        while len(self._entries) > self._settings.max_entries or self._bytes > self._settings.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
            self.stats.evicted += 1

    async def aclose(self) -> None:
        for task in [*self._inflight.values(), *self._late]:
            task.cancel()
        self._inflight.clear()


async def _write_failure(redis: Redis, key: str, failure: dict[str, str], seconds: float) -> None:
    name = shared_key("cache", "failed", key)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(name, mapping=failure)  # type: ignore[arg-type]
        pipe.pexpire(name, int(seconds * 1000))
        await pipe.execute()


def _fetched_at(entry: Entry | None) -> float:
    return entry.fetched_at if entry is not None else 0.0


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")
