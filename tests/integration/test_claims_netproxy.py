"""The test proxy itself does what the claim tests rely on (tests/netproxy.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.netproxy import NetProxy
from tests.support import RedisServer, numsub

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[NetProxy]:
    with NetProxy(redis_server.port) as p:
        yield p


async def test_blackhole_silences_only_subscribers_and_stays_until_they_reconnect(
    proxy: NetProxy, redis_server: RedisServer
) -> None:
    through = Redis.from_url(proxy.url)
    direct = Redis.from_url(redis_server.url)
    pubsub = through.pubsub()
    try:
        await pubsub.subscribe("ch")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        assert proxy.count(pubsub=True) == 1

        assert proxy.blackhole() == 1
        # Redis still delivers to the socket; the proxy swallows it.
        assert await direct.publish("ch", "lost") == 1
        assert await pubsub.get_message(timeout=0.5) is None
        # Command connections are untouched.
        assert await through.ping() is True
        # A subscriber opened while the blackhole lasts is dead from its SUBSCRIBE on.
        late = through.pubsub()
        await late.subscribe("ch2")
        assert await late.get_message(timeout=0.5) is None
        assert numsub(redis_server, "ch2") == 1
        await late.aclose()

        proxy.restore()
        assert await direct.publish("ch", "still lost") == 1
        assert await pubsub.get_message(timeout=0.5) is None  # a dead socket stays dead
        fresh = through.pubsub()
        await fresh.subscribe("ch")
        assert (await fresh.get_message(timeout=5))["type"] == "subscribe"
        await direct.publish("ch", "seen")
        msg = await fresh.get_message(timeout=5)
        assert msg is not None and msg["data"] == b"seen"
        await fresh.aclose()
    finally:
        await pubsub.aclose()
        await through.aclose()
        await direct.aclose()


async def test_sever_and_refuse(proxy: NetProxy) -> None:
    client = Redis.from_url(proxy.url, retry_on_timeout=False, retry=None)
    try:
        assert await client.ping() is True
        proxy.refuse(True)
        assert proxy.sever() == 1
        # The severed socket fails, then so does every new connection.
        for _ in range(2):
            with pytest.raises(RedisConnectionError):
                await client.ping()
        assert proxy.refused >= 1
        proxy.restore()
        assert await client.ping() is True
    finally:
        await client.aclose()
