"""The hub: one pub/sub connection, refcounted channels, one parse per event."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import fakeredis
import pytest

from relay.config import GatewayConfig, GlobalConfig
from relay.gateway.envelope import Envelope
from relay.gateway.hub import Hub
from relay.gateway.metrics import Metrics
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys

AGENT = str(uuid.uuid4())


class Recorder:
    def __init__(self) -> None:
        self.got: list[Envelope] = []
        self.resets: list[tuple[str, str | None, str]] = []

    def offer(self, envelope: Envelope) -> None:
        self.got.append(envelope)

    def stream_reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        self.resets.append((request_id, epoch, reason))


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    server = fakeredis.FakeServer()
    commands = fakeredis.FakeAsyncRedis(server=server)
    pubsub = fakeredis.FakeAsyncRedis(server=server)
    config = GlobalConfig(gateway=GatewayConfig(probe_interval=0.1, probe_timeout=0.5))
    hub = Hub(config, commands, pubsub, Metrics())
    await hub.start()
    async with asyncio.timeout(5):
        while not hub.ready:
            await asyncio.sleep(0.01)
    yield hub
    await hub.close()
    await commands.aclose()
    await pubsub.aclose()


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def numsub(hub: Hub, channel: str) -> int:
    counts = await hub.redis.pubsub_numsub(channel)
    return int(counts[0][1])


async def test_channels_are_reference_counted(hub: Hub) -> None:
    rid = str(uuid.uuid4())
    channel = hub.keys.request_channel(rid)
    a, b = Recorder(), Recorder()
    await hub.watch(rid, a)
    await hub.watch(rid, b)
    assert await numsub(hub, channel) == 1
    await hub.unwatch(rid, a)
    assert await numsub(hub, channel) == 1
    await hub.unwatch(rid, b)
    await until(lambda: not hub.link.is_live(channel))
    assert await numsub(hub, channel) == 0


async def test_one_envelope_object_is_shared_by_every_subscriber(hub: Hub) -> None:
    rid = str(uuid.uuid4())
    a, b, everything = Recorder(), Recorder(), Recorder()
    await hub.watch(rid, a)
    await hub.watch(rid, b)
    await hub.watch_all(everything)
    client = RelayClient(hub.redis, owns_connection=False)
    for i in range(3):
        await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": str(i)})
    await until(lambda: len(a.got) == 3 and len(everything.got) == 3)
    await asyncio.sleep(0.1)  # the firehose copy of each event must not arrive twice
    assert [e.seq for e in a.got] == [1, 2, 3]
    assert [e.seq for e in everything.got] == [1, 2, 3]
    assert all(x is y for x, y in zip(a.got, b.got, strict=True))
    assert all(x is y for x, y in zip(a.got, everything.got, strict=True))


async def test_only_watched_requests_are_delivered(hub: Hub) -> None:
    watched, other = str(uuid.uuid4()), str(uuid.uuid4())
    sub = Recorder()
    await hub.watch(watched, sub)
    client = RelayClient(hub.redis, owns_connection=False)
    await client.publish(other, {"type": "agent_text_delta", "agent_id": AGENT, "text": "x"})
    await client.publish(watched, {"type": "agent_text_delta", "agent_id": AGENT, "text": "y"})
    await until(lambda: len(sub.got) == 1)
    assert sub.got[0].request_id == watched


async def test_readiness_follows_delivery_not_probe_latency(hub: Hub) -> None:
    assert hub.ready
    assert hub.status()["pubsub_connected"] is True
    assert hub.link._last_probe_rx is not None
    hub.link._last_probe_rx -= 10  # as if the probe stopped coming back...
    assert hub.link._last_rx is not None
    assert hub.ready  # ...while the reader still takes messages: behind, not dead
    hub.link._last_rx -= 10  # and nothing at all arrives any more
    assert not hub.ready


async def test_a_dead_listener_is_rebuilt_and_backfills(hub: Hub) -> None:
    rid = str(uuid.uuid4())
    sub = Recorder()
    await hub.watch(rid, sub)
    client = RelayClient(hub.redis, owns_connection=False)
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": "a"})
    await until(lambda: len(sub.got) == 1)
    before = hub.link.reconnects
    assert hub.link._pubsub is not None
    await hub.link._pubsub.aclose()  # the connection dies under the reader
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": "b"})
    await until(lambda: hub.link.reconnects > before and hub.ready)
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": "c"})
    await until(lambda: len(sub.got) == 3)
    assert [e.seq for e in sub.got] == [1, 2, 3]


async def test_a_rollback_that_kept_the_epoch_gets_a_new_epoch(hub: Hub) -> None:
    """Redis came back with an older copy (AOF everysec, a failover that lost
    writes): the reused seqs must not vanish as duplicates."""
    rid = str(uuid.uuid4())
    sub = Recorder()
    await hub.watch(rid, sub)
    client = RelayClient(hub.redis, owns_connection=False)
    for i in range(5):
        await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": str(i)})
    await until(lambda: len(sub.got) == 5)
    rk = client.keys.request(rid)
    old_epoch = cast(bytes, await hub.redis.get(rk.epoch)).decode()
    # Roll the request back to seq 3, as a restore of an older copy would.
    await hub.redis.set(rk.seq, 3)
    kept = cast(list[tuple[bytes, dict[Any, Any]]], await hub.redis.xrange(rk.history, max="3-0"))
    await hub.redis.delete(rk.history)
    for entry_id, fields in kept:
        await hub.redis.xadd(rk.history, fields, id=entry_id)
    assert hub.link._pubsub is not None
    await hub.link._pubsub.aclose()  # the restart drops the connection
    await asyncio.sleep(0.01)
    for i in range(3):  # seqs 4, 5, 6 again, with other events
        await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": f"n{i}"})
    await until(lambda: bool(sub.resets))
    new_epoch = cast(bytes, await hub.redis.get(rk.epoch)).decode()
    assert new_epoch != old_epoch
    assert sub.resets[0] == (rid, new_epoch, "epoch_changed")
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": "after"})
    await until(lambda: sub.got[-1].seq == 7 and sub.got[-1].epoch == new_epoch)
    texts = [e.frame for e in sub.got if e.epoch == new_epoch]
    assert any('"text":"n2"' in f for f in texts)  # the reused seqs were delivered


async def test_tenant_wide_viewers_hold_no_request_channel(hub: Hub) -> None:
    """While the tenant-wide channel is held, request channels are not: every
    event is received and parsed once per process, not once per channel."""
    rid = str(uuid.uuid4())
    channel = hub.keys.request_channel(rid)
    narrowed, everything = Recorder(), Recorder()
    await hub.watch(rid, narrowed)
    assert await numsub(hub, channel) == 1
    await hub.watch_all(everything)
    await until(lambda: not hub.link.is_live(channel))
    assert await numsub(hub, channel) == 0
    received = hub.metrics.events_in._value.get()
    client = RelayClient(hub.redis, owns_connection=False)
    for i in range(100):
        await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": str(i)})
    await until(lambda: len(narrowed.got) == 100 and len(everything.got) == 100)
    assert hub.metrics.events_in._value.get() - received == 100
    # The last tenant-wide viewer leaves: the request channel comes back first,
    # so nothing published across the switch is lost.
    await hub.unwatch_all(everything)
    assert await numsub(hub, channel) == 1
    assert await numsub(hub, hub.keys.firehose_channel) == 0
    await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": "z"})
    await until(lambda: len(narrowed.got) == 101)
    assert [e.seq for e in narrowed.got] == list(range(1, 102))


async def test_a_slow_history_read_delays_no_other_request(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hole is filled by a lane of its own: the reader keeps delivering
    other requests (and the probe) while one request's history read hangs."""
    slow, fast = str(uuid.uuid4()), str(uuid.uuid4())
    slow_sub, fast_sub = Recorder(), Recorder()
    await hub.watch(slow, slow_sub)
    await hub.watch(fast, fast_sub)
    client = RelayClient(hub.redis, owns_connection=False)
    for i in range(5):
        await client.publish(slow, {"type": "agent_text_delta", "agent_id": AGENT, "text": str(i)})
    await until(lambda: len(slow_sub.got) == 5)
    gate = asyncio.Event()
    real_replay = hub.store.replay

    async def blocked_replay(*args: Any, **kwargs: Any) -> AsyncIterator[list[Envelope]]:
        await gate.wait()
        async for batch in real_replay(*args, **kwargs):
            yield batch

    monkeypatch.setattr(hub.store, "replay", blocked_replay)
    # Events 6..9 of `slow` never arrive live (lost on the way); 10 shows the hole.
    real_on_message = hub.on_message
    monkeypatch.setattr(hub, "on_message", lambda channel, data: None)
    for i in range(4):
        await client.publish(slow, {"type": "agent_text_delta", "agent_id": AGENT, "text": f"h{i}"})
    monkeypatch.setattr(hub, "on_message", real_on_message)
    await client.publish(slow, {"type": "agent_text_delta", "agent_id": AGENT, "text": "10"})
    await until(lambda: hub.backfills.lane(slow) is not None)
    assert hub.backfills.lane(slow) is not None
    for i in range(3):
        await client.publish(fast, {"type": "agent_text_delta", "agent_id": AGENT, "text": str(i)})
    await until(lambda: len(fast_sub.got) == 3)
    assert hub.link.probe_fresh
    gate.set()
    await until(lambda: hub.backfills.lane(slow) is None)
    assert [e.seq for e in slow_sub.got] == list(range(1, 11))


async def test_probe_age_is_unknown_before_the_first_probe() -> None:
    """Not the machine's uptime (a monotonic clock read against 0)."""
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    hub = Hub(GlobalConfig(), redis, redis, Metrics())
    assert hub.status()["probe_age_s"] is None
    assert not hub.ready
    await redis.aclose()


async def test_delivered_events_are_kept_for_refills(hub: Hub) -> None:
    rid = str(uuid.uuid4())
    sub = Recorder()
    await hub.watch(rid, sub)
    client = RelayClient(hub.redis, owns_connection=False)
    for i in range(3):
        await client.publish(rid, {"type": "agent_text_delta", "agent_id": AGENT, "text": str(i)})
    await until(lambda: len(sub.got) == 3)
    kept = hub.recent.range(hub.default.tenant, rid, sub.got[0].epoch, 0, 3)
    assert kept == sub.got  # the very objects delivered: refills reuse their bytes


async def test_waiting_for_a_live_channel_takes_no_turns(hub: Hub) -> None:
    """Under load one pass of the event loop lasts up to a few hundred ms. A lock
    handed from waiter to waiter once per pass let 2,000 connecting clients (and
    every new one, queued behind them) through at about ten per second."""
    sub = Recorder()
    await hub.watch_all(sub)
    channel = Keys("default").firehose_channel
    waiters = [asyncio.create_task(hub.link.wait_live(channel)) for _ in range(200)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert all(w.done() for w in waiters)
    await asyncio.gather(*waiters)


async def test_waiting_for_a_channel_that_never_comes_live_times_out(hub: Hub) -> None:
    from relay.gateway.pubsub import SubscribeTimeout

    with pytest.raises(SubscribeTimeout):
        await hub.link.wait_live("relay:default:req:{nobody}:events", timeout=0.05)
    await hub.link.subscribe("relay:default:req:{late}:events")
    await hub.link.wait_live("relay:default:req:{late}:events", timeout=5)
