"""The access log: batched writes lose nothing, keep logging's format, and cannot be forged."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
from collections.abc import Callable

import pytest

from gateway.logbuffer import LineBuffer
from tests.harness import Gateway, Simulator

DEVICE_LIST = "/cgi-bin/dl_cgi?Command=DeviceList"
# What the CLI's logging.basicConfig format produces: "%(asctime)s %(levelname)s %(name)s: %(message)s".
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.25

    def __call__(self) -> float:
        return self.now


def test_lines_match_the_logging_format() -> None:
    stream = io.StringIO()
    clock = FakeClock()
    buf = LineBuffer(stream, clock=clock)
    buf.add("request_id=1 status=200")
    buf.flush()
    handler = logging.StreamHandler(reference := io.StringIO())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "request_id=1 status=200", None, None)
    record.created, record.msecs = clock.now, 250.0
    handler.emit(record)
    assert stream.getvalue() == reference.getvalue()


def test_a_full_batch_is_written_in_one_write_and_formatted_then() -> None:
    writes: list[str] = []
    formatted: list[int] = []

    class Stream(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    def line(n: int) -> str:
        formatted.append(n)
        return f"line {n}"

    buf = LineBuffer(Stream(), clock=FakeClock(), max_lines=30)

    async def requests() -> None:
        for i in range(29):
            buf.add_later(line, i)
        assert writes == [] and formatted == []  # waiting, not yet formatted
        buf.add_later(line, 29)
        assert len(writes) == 1 and writes[0].count("\n") == 30 and formatted == list(range(30))
        buf.close()
        assert len(writes) == 1  # nothing left to write

    asyncio.run(requests())


def test_a_line_that_fails_to_format_does_not_lose_its_batch() -> None:
    stream = io.StringIO()
    buf = LineBuffer(stream, clock=FakeClock())
    buf._lines.append((1_800_000_000.0, lambda: 1 / 0, ()))  # as add_later would queue it
    buf.add_later(str, "the next line")
    assert "access line not formatted: ZeroDivisionError" in stream.getvalue()
    assert stream.getvalue().endswith("the next line\n")


def test_lines_after_close_are_written_at_once() -> None:
    stream = io.StringIO()
    buf = LineBuffer(stream, clock=FakeClock())

    async def shutdown_then_a_late_request() -> None:
        buf.add("before")
        assert stream.getvalue() == ""  # batched: waits for the timer
        buf.close()
        assert stream.getvalue().endswith("before\n")
        buf.add("late line")  # a request that finished after the lifespan's shutdown
        assert stream.getvalue().endswith("late line\n")  # not left to a timer that may never run

    asyncio.run(shutdown_then_a_late_request())


def test_write_failures_are_reported_once_and_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    stream.close()
    buf = LineBuffer(stream, clock=FakeClock())
    with caplog.at_level(logging.ERROR, logger="gateway"):
        buf.add("a")
        buf.add("b")
    reports = [r.message for r in caplog.records if r.message.startswith("access log lines could not be written")]
    assert len(reports) == 1


def _access_lines(gw: Gateway) -> list[str]:
    return [line for line in gw.logs().splitlines() if " gateway.access: " in line]


def test_access_lines_appear_without_waiting_for_a_full_buffer(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url)
    with gw.client("viewer") as c:
        assert c.get(DEVICE_LIST).status_code == 200
    gw.wait_for_log("target=/cgi-bin/dl_cgi?Command=DeviceList", timeout=2.0)  # flushed by the half-second timer


def test_every_line_is_written_by_a_graceful_stop(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url)
    with gw.client("viewer") as c:
        c.get(DEVICE_LIST)
        before = len(_access_lines(gw))
        for _ in range(200):
            assert c.get(DEVICE_LIST).status_code == 200
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(timeout=10)  # uvicorn shuts down gracefully, then re-raises the signal (exit -15)
    assert "Application shutdown complete" in gw.logs()
    assert len(_access_lines(gw)) - before >= 200


@pytest.mark.parametrize("style", ["text", "json"])
def test_a_client_cannot_forge_or_split_access_lines(simulator: Simulator, make_gateway: Callable[..., Gateway], style: str) -> None:
    gw = make_gateway(simulator.url, {"server": {"access_log": style}})
    forged = "/x%0a2026-01-01%2000:00:00,000%20INFO%20gateway.access:%20request_id=forged%22%5C"
    with gw.client("viewer") as c:
        assert c.get(forged).status_code == 404
        assert c.get("/y%0aforged%0d%09").status_code == 404  # no space, only control characters
        c.get(DEVICE_LIST)
    gw.wait_for_log("Command=DeviceList", timeout=2.0)
    for line in gw.logs().splitlines():
        assert LOG_LINE.match(line) or line.startswith((" ", "Traceback")), f"a line not from the logger: {line!r}"
    (line,) = [line for line in _access_lines(gw) if "/x" in line]
    if style == "json":
        fields = json.loads(line.split("gateway.access: ", 1)[1])
        assert fields["target"].startswith("/x\n2026-01-01 00:00:00,000 INFO")
    else:
        target = re.search(r' target=("(?:[^"\\]|\\.)*")', line)
        assert target is not None, line
        assert json.loads(target.group(1)).endswith('request_id=forged"\\')


def test_access_log_off_writes_no_access_lines(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(simulator.url, {"server": {"access_log": "off"}})
    with gw.client("viewer") as c:
        assert c.get(DEVICE_LIST).status_code == 200
    gw.stop()
    assert _access_lines(gw) == []


def test_quoted_fields_are_remembered_within_a_bound() -> None:
    from gateway.middleware import accesslog

    for i in range(5000):  # a client sending ever new targets
        accesslog._quote(f"/vars?name=/sys/x{i}")
    assert len(accesslog._QUOTED) <= 4096
    assert accesslog._quote("/a\nforged=1") == '"/a\\nforged=1"'  # past the bound, still quoted
    assert accesslog._quote("key:abc") == "key:abc" and accesslog._quote("a b") == '"a b"'
