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
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from gateway.errors import UpstreamError
from gateway.settings import CacheSettings
from gateway.upstream import Fetched

log = logging.getLogger("gateway.cache")
NAME = "pvs-gateway"


@dataclass(slots=True)
class Entry:
    status: int
    body: bytes
    stored: float  # monotonic
    fetched_at: float  # wall clock
    ttl: float
    last_modified: bytes  # precomputed HTTP-date of fetched_at
    # The proxy's answer head for this entry, kept for as long as it stays the same (a second
    # at most: Age and the freshness fields count seconds); see Proxy._answer_headers.
    answer_memo: Any = None
    # (whole seconds of freshness left, the Cache-Status text of a hit then): made once a second.
    hit_status: tuple[int, str] | None = None

    @property
    def size(self) -> int:
        return len(self.body) + 200


@dataclass(slots=True)
class Lookup:
    entry: Entry
    age: float
    cache_status: str
    error: UpstreamError | None = None  # set when stale was served because the PVS failed


class CacheStats:
    __slots__ = ("hits", "misses", "stale_revalidating", "stale_on_error", "collapsed", "stored", "evicted", "refresh_failures")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


Fetch = Callable[[], Awaitable[Fetched]]


class ResponseCache:
    def __init__(
        self,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        is_failing: Callable[[], bool] = lambda: False,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._is_failing = is_failing
        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Task[Entry]] = {}
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
                left = int(entry.ttl - age)
                status = entry.hit_status
                if status is None or status[0] != left:
                    status = entry.hit_status = (left, f"{NAME}; hit; ttl={left}")
                return Lookup(entry, age, status[1])
        return None

    def count_hit(self, key: str) -> None:
        self._entries.move_to_end(key)
        self.stats.hits += 1

    async def get(self, key: str, ttl: float, fetch: Fetch) -> Lookup:
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
            fresh = await asyncio.shield(task)
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
        return Lookup(fresh, 0.0, f"{NAME}; fwd={fwd}; fwd-status={fresh.status}{extra}")

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

    def _filled(self, task: asyncio.Task[Entry]) -> None:
        # Retrieve the outcome so a failed background refresh is counted, not reported as lost.
        if not task.cancelled() and task.exception() is not None:
            self.stats.refresh_failures += 1

    async def _fill(self, key: str, ttl: float, fetch: Fetch) -> Entry:
        try:
            fetched = await fetch()
        finally:
            self._inflight.pop(key, None)
        entry_ttl = ttl if fetched.status == 200 else min(ttl, self._settings.error_ttl)
        entry = Entry(
            fetched.status,
            fetched.body,
            self._clock(),
            fetched.fetched_at,
            entry_ttl,
            formatdate(fetched.fetched_at, usegmt=True).encode(),
        )
        self._store(key, entry)
        return entry

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
        while len(self._entries) > self._settings.max_entries or self._bytes > self._settings.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
            self.stats.evicted += 1

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
