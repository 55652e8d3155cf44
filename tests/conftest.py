"""Shared fixtures: a simulator per module, gateways per test or module, all on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Gateway, Simulator, start_gateway, start_simulator
from tests.redis_harness import RedisServer, redis_or_skip

# DeviceList takes 10 s x scale: 0.05 -> 0.5 s, slow enough to coalesce, fast enough for CI.
FAST = ("--latency-scale", "0.05", "--clock", "12:00", "--seed", "7")


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = start_simulator(tmp_path_factory.mktemp("sim"), *FAST)
    yield sim
    sim.stop()


@pytest.fixture
def fresh_simulator(simulator: Simulator) -> Simulator:
    """The module's simulator with its fault cleared and counters zeroed."""
    simulator.reset()
    return simulator


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(upstream_url: str, config: dict[str, Any] | None = None, **kw: Any) -> Gateway:
        gw = start_gateway(tmp_path / f"gw{len(started)}", upstream_url, config, **kw)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def make_simulator(tmp_path: Path) -> Iterator[Callable[..., Simulator]]:
    started: list[Simulator] = []

    def make(*args: str) -> Simulator:
        sim = start_simulator(tmp_path / f"sim{len(started)}", *args)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free 127.0.0.1 port, no persistence, one per test module."""
    redis_or_skip()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh redis-server for one test (empty: no state shared with other tests)."""
    redis_or_skip()
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()
