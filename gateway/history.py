"""Recorded site data: at most one sample per ``history.interval``, kept ``history.retention_days``.

Samples are offered whenever new data arrives (a telemetry frame, a refresh
of the polled site). One is written when at least ``interval`` seconds have
passed since the last one, so the record holds the newest data at each
interval and nothing while no new data comes. ``time`` is when the sample was
recorded (UTC), the key of the row.

Storage is SQLite (standard library) in WAL mode, one narrow row per sample
(about 100 bytes with the index: see tests/test_history.py for the measured
size of a day). With ``cluster.redis_url`` set, every sample is also added to
a Redis sorted set scored by time, and at most one gateway records each
interval (a ``SET NX`` claim), so every gateway answers the same history:
reads take Redis's samples and fill its gaps (an outage) with local ones.
While Redis is down, each gateway records and answers locally.

Every problem with the file (cannot open, corrupt, disk full) is logged as
one line naming the file, and history is then off; the gateway carries on.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from gateway.shared import Shared

log = logging.getLogger("gateway.history")

# The fields of a sample, in order; all numbers or None. ``time`` (Unix seconds) is the key.
FIELDS = (
    "production_kw",
    "consumption_kw",
    "net_kw",
    "battery_kw",
    "soc_percent",
    "lifetime_production_kwh",
    "lifetime_consumption_kwh",
    "lifetime_import_kwh",
    "lifetime_export_kwh",
)
REDIS_KEY = "pvsgw:history"
CLAIM_KEY = "pvsgw:history:claim"
PRUNE_EVERY = 3600.0  # seconds between deletions of samples past retention
MAX_SAMPLES = 50_000  # one answer at most (a month at one a minute); older ones are left out


class HistoryError(ValueError):
    """A bad query (the route answers 400)."""


class History:
    def __init__(
        self,
        path: Path | None,
        *,
        interval: float,
        retention_days: float,
        shared: Shared | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.interval = interval
        self.retention = retention_days * 86400.0
        self._shared = shared if shared is not None and shared.configured else None
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._last_write = float("-inf")
        self._last_prune = float("-inf")
        self.rows = 0  # in the local file
        self.written = 0

    def open(self) -> None:
        """Open (or create) the file; on failure one line is logged and recording stays off."""
        if self.path is not None and self._db is None:
            self._open(self.path)

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def _open(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut loses at most the last samples
            columns = ", ".join(f"{name} REAL" for name in FIELDS)
            db.execute(f"CREATE TABLE IF NOT EXISTS samples (time REAL PRIMARY KEY, {columns}) WITHOUT ROWID")
            self.rows = int(db.execute("SELECT count(*) FROM samples").fetchone()[0])
            last = db.execute("SELECT max(time) FROM samples").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            log.error("history: cannot use %s (%s); recording is off", path, _reason(exc))
            return
        self._db = db
        if last is not None:
            self._last_write = float(last)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -------------------------------------------------------------- writing

    def due(self) -> bool:
        return self.enabled and self._clock() - self._last_write >= self.interval

    async def offer(self, values: dict[str, Any]) -> bool:
        """Record ``values`` (new data) if a sample is due; True if it was recorded here."""
        if not self.due():
            return False
        now = self._clock()
        self._last_write = now
        at = float(int(now))  # whole seconds, as answered: ISO bounds then match samples exactly
        row: dict[str, float | None] = {"time": at, **{name: _number(values.get(name)) for name in FIELDS}}
        if self._shared is not None and await self._shared.run(lambda redis: self._claim(redis, now)) is False:
            return False  # another gateway recorded this interval (its sample is in Redis)
        self._insert(row)
        if self._shared is not None:
            text = json.dumps(row, separators=(",", ":"))
            await self._shared.run(lambda redis: self._add_shared(redis, at, text))
        return True

    async def _claim(self, redis: Redis, now: float) -> bool:
        """The first gateway to claim this interval's slot records it."""
        slot = int(now // self.interval)
        return bool(await redis.set(f"{CLAIM_KEY}:{slot}", "1", nx=True, ex=max(1, int(self.interval * 2))))

    async def _add_shared(self, redis: Redis, at: float, text: str) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zadd(REDIS_KEY, {text: at})
            pipe.zremrangebyscore(REDIS_KEY, "-inf", at - self.retention)
            await pipe.execute()

    def _insert(self, row: dict[str, float | None]) -> None:
        db = self._db
        assert db is not None
        names = ("time", *FIELDS)
        try:
            db.execute(
                f"INSERT OR REPLACE INTO samples ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [row[n] for n in names],
            )
            self.rows += 1
            self.written += 1
            at = row["time"] or 0.0
            if at - self._last_prune >= PRUNE_EVERY:
                self._last_prune = at
                gone = db.execute("DELETE FROM samples WHERE time < ?", (at - self.retention,)).rowcount
                self.rows -= max(0, gone)
        except sqlite3.Error as exc:
            log.error("history: cannot write to %s (%s); recording is off", self.path, _reason(exc))
            self.close()

    # -------------------------------------------------------------- reading

    async def query(self, since: float, until: float) -> list[dict[str, Any]]:
        """Samples with since <= time <= until, oldest first, ``time`` in ISO 8601 UTC."""
        local = self._select(since, until)
        shared = None
        if self._shared is not None:
            shared = await self._shared.run(
                lambda redis: redis.zrangebyscore(REDIS_KEY, since, until, start=0, num=MAX_SAMPLES)
            )
        rows = local if shared is None else _merge(_parse(shared), local, self.interval)
        return [{"time": iso(r["time"]), **{n: r.get(n) for n in FIELDS}} for r in rows[:MAX_SAMPLES]]

    def _select(self, since: float, until: float) -> list[dict[str, Any]]:
        if self._db is None:
            return []
        try:
            cursor = self._db.execute(
                f"SELECT time, {', '.join(FIELDS)} FROM samples WHERE time BETWEEN ? AND ? ORDER BY time LIMIT ?",
                (since, until, MAX_SAMPLES),
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
        except sqlite3.Error as exc:
            log.error("history: cannot read %s (%s)", self.path, _reason(exc))
            return []


def _parse(members: list[Any]) -> list[dict[str, Any]]:
    out = []
    for member in members:
        try:
            row = json.loads(member)
            if isinstance(row, dict) and isinstance(row.get("time"), (int, float)):
                out.append(row)
        except (ValueError, TypeError):
            continue  # not ours: skipped, never a 500
    return out


def _merge(shared: list[dict[str, Any]], local: list[dict[str, Any]], interval: float) -> list[dict[str, Any]]:
    """Redis's samples, plus local ones where Redis has none within an interval (recorded during an outage)."""
    times = sorted(r["time"] for r in shared)
    extra = []
    for row in local:
        i = bisect.bisect_left(times, row["time"])
        near = [times[j] for j in (i - 1, i) if 0 <= j < len(times)]
        if all(abs(t - row["time"]) >= interval / 2 for t in near):
            extra.append(row)
    return sorted(shared + extra, key=lambda r: r["time"])


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_bounds(since: str | None, until: str | None, now: float) -> tuple[float, float]:
    """``?since=&until=`` (ISO 8601; a zone-less time is UTC) -> Unix seconds; default the last 24 h."""
    end = _parse_time("until", until) if until else now
    start = _parse_time("since", since) if since else end - 86400.0
    if start > end:
        raise HistoryError("since must not be after until")
    return start, end


def _parse_time(name: str, text: str) -> float:
    text = text.strip()
    head, _, tail = text.rpartition(" ")
    # An unencoded "+01:00" in a query string arrives as " 01:00".
    candidates = (text, f"{head}+{tail}") if head and ":" in tail and "T" in head else (text,)
    for candidate in candidates:
        try:
            parsed = dt.datetime.fromisoformat(candidate)
            break
        except ValueError:
            continue
    else:
        raise HistoryError(f"{name}: not an ISO 8601 time, e.g. 2026-12-03T06:00:00Z")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()
