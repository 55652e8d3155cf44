"""gateway.history: recording rules, retention, bounds, file problems and sharing through Redis.

An injected clock: no sleeps. The Redis test uses a real redis-server on
127.0.0.1 when one is installed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.history import FIELDS, History, HistoryError, iso, parse_bounds
from gateway.shared import Shared

DAY = 86400.0
T0 = 1_780_000_000.0  # 2026-05-28


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _values(i: float) -> dict[str, Any]:
    return {
        "production_kw": round(3.0 + i % 7 * 0.123, 4),
        "consumption_kw": round(1.0 + i % 5 * 0.071, 4),
        "net_kw": -2.0,
        "battery_kw": None,
        "soc_percent": None,
        "lifetime_production_kwh": 25000.0 + i / 60,
        "lifetime_consumption_kwh": 41000.0 + i / 90,
        "lifetime_import_kwh": 9000.0,
        "lifetime_export_kwh": 3000.0 + i / 100,
        "source": "telemetry",  # not a field: ignored
    }


def _history(tmp_path: Path, clock: Clock, **kw: Any) -> History:
    h = History(tmp_path / "h.sqlite3", interval=kw.pop("interval", 60.0), retention_days=kw.pop("retention_days", 400), clock=clock, **kw)
    h.open()
    return h


def test_at_most_one_sample_per_interval_and_none_without_new_data(tmp_path: Path) -> None:
    clock = Clock()
    h = _history(tmp_path, clock)

    async def main() -> None:
        assert await h.offer(_values(0))  # the first data is recorded
        for step in range(1, 60):  # a frame every second for a minute: not due yet
            clock.now = T0 + step
            assert not await h.offer(_values(step))
        clock.now = T0 + 60
        assert await h.offer(_values(60))
        clock.now = T0 + 400  # no new data for minutes: nothing was recorded meanwhile
        assert await h.offer(_values(400))
        rows = await h.query(T0 - 1, T0 + 1000)
        assert [r["time"] for r in rows] == [iso(T0), iso(T0 + 60), iso(T0 + 400)]
        assert rows[1]["production_kw"] == _values(60)["production_kw"]  # the newest data then
        assert set(rows[0]) == {"time", *FIELDS} and rows[0]["battery_kw"] is None

    asyncio.run(main())
    assert h.rows == 3
    h.close()


def test_bounds_are_inclusive_and_samples_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    h = _history(tmp_path, clock, interval=1.0)

    async def main() -> None:
        for i in range(10):
            clock.now = T0 + i
            await h.offer(_values(i))
        since, until = parse_bounds(iso(T0 + 2), iso(T0 + 5), clock())
        got = await h.query(since, until)
        assert [r["time"] for r in got] == [iso(T0 + i) for i in range(2, 6)]

    asyncio.run(main())


def test_retention_removes_old_samples(tmp_path: Path) -> None:
    clock = Clock()
    h = _history(tmp_path, clock, interval=3600.0, retention_days=2)

    async def main() -> None:
        for hour in range(24 * 5):
            clock.now = T0 + hour * 3600
            await h.offer(_values(hour))
        rows = await h.query(0, clock() + 1)
        assert rows[0]["time"] >= iso(clock() - 2 * DAY - 3600)
        assert 47 <= len(rows) <= 50
        assert h.rows == len(rows)

    asyncio.run(main())


def test_parse_bounds() -> None:
    now = T0
    assert parse_bounds(None, None, now) == (now - DAY, now)  # the last 24 h
    assert parse_bounds("2026-12-03T06:00:00Z", "2026-12-03T07:00:00+01:00", now) == (1796277600.0, 1796277600.0)
    assert parse_bounds("2026-12-03T06:00:00", None, 1796281200.0)[0] == 1796277600.0  # no zone: UTC
    assert parse_bounds("2026-12-03T07:00:00 01:00", None, 1796281200.0)[0] == 1796277600.0  # "+" sent unencoded
    for since, until in (("yesterday", None), ("2026-13-01", None), (None, "12:00"), ("2026-12-03T08:00:00Z", "2026-12-03T07:00:00Z")):
        with pytest.raises(HistoryError):
            parse_bounds(since, until, now)


def test_history_size_per_simulated_day(tmp_path: Path) -> None:
    """One sample a minute for a day (the default interval), measured on disk."""
    clock = Clock()
    h = _history(tmp_path, clock)

    async def main() -> None:
        for minute in range(1440):
            clock.now = T0 + minute * 60
            await h.offer(_values(minute * 60))

    asyncio.run(main())
    assert h.rows == 1440
    h.close()
    db = tmp_path / "h.sqlite3"
    size = db.stat().st_size + sum(p.stat().st_size for p in tmp_path.glob("h.sqlite3-*"))
    print(f"\nhistory: {h.rows} samples (one day at 60 s) take {size / 1024:.0f} KiB, {size / h.rows:.0f} bytes each; "
          f"400 days about {size * 400 / 2**20:.0f} MiB")
    assert 40 * 1440 < size < 250 * 1440


def test_a_bad_file_is_one_log_line_and_recording_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "not-a-db.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    h = History(bad, interval=60, retention_days=1, clock=Clock())
    with caplog.at_level(logging.ERROR, logger="gateway.history"):
        h.open()
    assert not h.enabled
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(bad) in lines[0] and "recording is off" in lines[0]
    assert not any(r.exc_info for r in caplog.records)  # no traceback

    async def main() -> None:
        assert not await h.offer(_values(0))
        assert await h.query(0, T0 * 2) == []

    asyncio.run(main())
    # A folder that cannot be created: the same.
    blocked = tmp_path / "file"
    blocked.write_text("x")
    h2 = History(blocked / "sub" / "h.sqlite3", interval=60, retention_days=1)
    h2.open()
    assert not h2.enabled


def test_history_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    h = _history(tmp_path, clock)
    asyncio.run(h.offer(_values(0)))
    h.close()
    clock.now = T0 + 30
    again = _history(tmp_path, clock)  # the last sample's time is remembered: not due yet
    assert not again.due()
    clock.now = T0 + 60
    assert again.due()
    assert again.rows == 1


# ---------------------------------------------------------------- shared through Redis





def test_every_gateway_answers_the_same_history_through_redis(tmp_path: Path, redis_url: str) -> None:
    clock = Clock()
    a = History(tmp_path / "a.sqlite3", interval=60, retention_days=1, shared=Shared(redis_url), clock=clock)
    b = History(tmp_path / "b.sqlite3", interval=60, retention_days=1, shared=Shared(redis_url), clock=clock)
    a.open()
    b.open()

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        for minute in range(10):
            clock.now = T0 + minute * 60
            # Both see the same data; one of them records each interval.
            recorded = [await a.offer(_values(minute)), await b.offer(_values(minute))]
            assert recorded.count(True) == 1
        got = await a.query(T0 - 1, T0 + 3600), await b.query(T0 - 1, T0 + 3600)
        for h in (a, b):
            assert h._shared is not None
            await h._shared.aclose()
        return got

    from_a, from_b = asyncio.run(main())
    assert from_a == from_b and len(from_a) == 10
    assert a.rows + b.rows == 10  # each interval recorded once, somewhere


def test_redis_down_falls_back_to_the_local_file(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    clock = Clock()
    shared = Shared(f"redis://127.0.0.1:{port}/0", clock=clock)
    h = History(tmp_path / "h.sqlite3", interval=60, retention_days=1, shared=shared, clock=clock)
    h.open()

    async def main() -> list[dict[str, Any]]:
        for minute in range(3):
            clock.now = T0 + minute * 60
            assert await h.offer(_values(minute))
        got = await h.query(T0 - 1, T0 + 3600)
        await shared.aclose()
        return got

    rows = asyncio.run(main())
    assert len(rows) == 3 and shared.outages >= 1
