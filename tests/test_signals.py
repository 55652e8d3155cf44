"""Signals to ``serve`` (SPEC §1): SIGHUP reloads and never stops; SIGTERM answers what waits 503."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import httpx

from tests.harness import Gateway, Simulator


def test_sigterm_answers_requests_waiting_on_a_slow_pvs_with_503(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    simulator.reset()
    gw = make_gateway(simulator.url, {"upstream": {"timeout": 60.0}})
    simulator.fault("hang", 30)
    results: list[httpx.Response | Exception] = []

    def wait() -> None:
        try:
            with gw.client("viewer", timeout=30) as c:
                results.append(c.get("/cgi-bin/dl_cgi?Command=DeviceList"))
        except Exception as exc:  # the test fails below on anything but a 503
            results.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # all three wait on the hanging PVS
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    took = time.monotonic() - started
    simulator.reset()
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results]
    assert statuses == [503, 503, 503]
    first = results[0]
    assert isinstance(first, httpx.Response)
    assert first.headers["content-type"] == "application/problem+json"
    assert "Retry-After" in first.headers
    assert took < 8
    # uvicorn re-raises the signal once it has shut down: ended by SIGTERM, as systemd expects.
    assert gw.proc.wait(10) in (0, -signal.SIGTERM)
    logs = gw.logs()
    assert "Traceback" not in logs and "Task cancelled" not in logs, logs[-2000:]


def test_sighup_never_stops_the_gateway_nor_drops_a_connection(simulator: Simulator, make_gateway: Callable[..., Gateway]) -> None:
    simulator.reset()
    gw = make_gateway(simulator.url)
    with gw.client("viewer") as c:  # one keep-alive connection across the signals
        assert c.get("/cgi-bin/dl_cgi/supervisor/info").status_code == 200
        for _ in range(3):
            gw.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            assert c.get("/cgi-bin/dl_cgi/supervisor/info").status_code == 200
    assert gw.proc.poll() is None
    assert gw.wait_for_log("SIGHUP: reloading").count("SIGHUP: reloading") >= 1
