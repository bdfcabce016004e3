"""Fixtures shared by both tiers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import fakeredis
import pytest

from relay.config import GlobalConfig
from tests.support import Gateway, RedisServer


@pytest.fixture
async def fake_redis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    """A fresh in-memory Redis (with Lua) for the unit tier."""
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    yield client
    await client.aclose()


@pytest.fixture
def config() -> GlobalConfig:
    return GlobalConfig()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own, on a free port (no persistence)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def gateways(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[Gateway]]:
    """The gateway processes a test started (see ``start_gateway``); stopped at the end."""
    started: list[Gateway] = []
    yield started
    for gw in started:
        gw.stop()


@pytest.fixture
def start_gateway(tmp_path: Path, redis_server: RedisServer, gateways: list[Gateway]):  # type: ignore[no-untyped-def]
    """``start_gateway(**env)`` runs one more gateway against ``redis_server``."""

    def start(extra_env: dict[str, str] | None = None, redis_url: str | None = None) -> Gateway:
        gw = Gateway(
            redis_url or redis_server.url,
            tmp_path / f"gateway-{len(gateways)}.log",
            extra_env,
        )
        gateways.append(gw)
        return gw.start()

    return start
