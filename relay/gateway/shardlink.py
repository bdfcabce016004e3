"""The gateway's pub/sub on a Redis Cluster: sharded channels, one connection per primary.

On a cluster relay publishes with SPUBLISH, which only the node owning the
channel's slot delivers (PUBLISH would be broadcast to every node, so every
node would carry every message and the cluster would stop scaling). A
subscriber must therefore SSUBSCRIBE on each channel's owner:
:class:`ClusterLink` keeps one connection per primary, subscribes each
channel on the node that owns its slot (one SSUBSCRIBE per slot: Redis
refuses one spanning slots), and reads every connection in a reader of its
own, all handing messages to the same listener as :class:`PubSubLink`.

Channels stay logical for the hub: a request channel is itself a shard
channel, and the tenant-wide channel ``relay:T:events`` stands for its 16384
slot shards (:meth:`relay.wire.keys.Keys.firehose_shards`), live once all of
them are; a message on any shard is handed over as one on ``relay:T:events``.
Every frame is still received once per process: its request channel and its
firehose shard share a slot, so one node (one reader) carries both, and the
hub holds no request channel while the tenant-wide one is live.

Topology changes are followed by rebuilding the whole link, which the hub
already survives without loss (it catches every watched request up from
history): when a node connection fails, when a node's probe (a shard channel
in a slot it owns) does not come back, when Redis unsubscribes a channel we
did not leave (it does when the slot moves away: resharding or failover),
when a subscribe meets MOVED, and when the periodic re-read of the slot map
(every ``TOPOLOGY_CHECK_S``) differs from the one the link was built on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub

from relay import redisconn
from relay.aio import stop_task
from relay.config import GlobalConfig
from relay.gateway.metrics import Metrics
from relay.gateway.pubsub import READ_SLICE, TOPOLOGY_CHECK_S, Listener, PubSubLink
from relay.wire.keys import PREFIX, SLOTS, Keys, key_slot, probe_shard


@dataclass(slots=True)
class _Node:
    """One primary's subscriber connection."""

    name: str
    client: Redis
    pubsub: PubSub
    probe: str
    probe_rx: float = field(default_factory=time.monotonic)
    rx: float = field(default_factory=time.monotonic)
    """When this node's reader last took any message off its socket."""
    probe_out: float | None = None
    """When this node's oldest probe not back yet was published."""


@lru_cache(maxsize=16)  # a few tenants; about 1 MB of names each
def _firehose_shards(tenant: str) -> tuple[str, ...]:
    return tuple(Keys(tenant).firehose_shards())


def firehose_tenant(channel: str) -> str | None:
    """The tenant whose logical tenant-wide channel ``channel`` is (``relay:T:events``)."""
    head, _, rest = channel.partition(":")
    tenant, _, tail = rest.partition(":")
    return tenant if head == PREFIX and tail == "events" else None


class ClusterLink(PubSubLink):
    """:class:`PubSubLink` over a Redis Cluster: SSUBSCRIBE on each channel's owner."""

    def __init__(
        self,
        config: GlobalConfig,
        redis: Redis,
        pubsub_redis: Redis,
        metrics: Metrics,
        listener: Listener,
        probe_channel: str,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        super().__init__(config, redis, pubsub_redis, metrics, listener, probe_channel, log)
        self.redis_topology = pubsub_redis
        self._cluster = cast(RedisCluster, pubsub_redis)
        self._nodes: dict[str, _Node] = {}
        self._probes: dict[str, _Node] = {}
        self._owner: list[str] = []
        """Slot -> name of its primary, as read when the link was built."""
        self._shards_live: dict[str, set[str]] = defaultdict(set)
        """Logical tenant-wide channel -> its shards confirmed so far."""
        self._leaving: dict[str, int] = defaultdict(int)
        """Shard channels we unsubscribed whose confirmation is still to come."""

    # ---------------------------------------------------------------- channel mapping

    def _expand(self, channels: Iterable[str]) -> list[str]:
        out: list[str] = []
        for channel in channels:
            tenant = firehose_tenant(channel)
            out.extend(_firehose_shards(tenant) if tenant is not None else (channel,))
        return out

    async def wait_live(
        self,
        *channels: str,
        timeout: float | None = None,
        unless: Callable[[], bool] | None = None,
    ) -> None:
        """As :meth:`PubSubLink.wait_live`; a tenant-wide channel gets three times
        ``redis.socket_timeout`` by default: it is 16384 subscriptions, each
        confirmed by a message of its own (about 0.5 s per process on loopback)."""
        if timeout is None and any(firehose_tenant(c) is not None for c in channels):
            timeout = 3 * self.config.redis.socket_timeout
        await super().wait_live(*channels, timeout=timeout, unless=unless)

    def _grouped(self, channels: Iterable[str]) -> dict[str, dict[int, list[str]]]:
        """Shard channels by owning node and slot (one SSUBSCRIBE per slot)."""
        groups: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for channel in channels:
            slot = key_slot(channel)
            groups[self._owner[slot]][slot].append(channel)
        return groups

    async def _send(self, command: str, channels: Iterable[str]) -> None:
        for name, slots in self._grouped(channels).items():
            node = self._nodes.get(name)
            conn = node.pubsub.connection if node is not None else None
            if conn is None:
                raise ConnectionError(f"no subscriber connection to {name}")
            # Packed into one write per node: a tenant-wide subscription is
            # 16384 commands, which one by one would take a round of the loop each.
            packed = conn.pack_commands([(command, *chans) for chans in slots.values()])
            await conn.send_packed_command(packed, check_health=False)

    # ---------------------------------------------------------------- channels

    async def subscribe(self, *channels: str) -> None:
        """SSUBSCRIBE each channel on its owner now if connected; else the next connection will."""
        if not (self._connected and channels):
            return
        try:
            await self._send("SSUBSCRIBE", self._expand(channels))
        except Exception as exc:  # the supervisor rebuilds the link
            self.log.warning("subscribe failed: %s", exc)
            self._wake.set()

    async def unsubscribe(self, *channels: str) -> None:
        """SUNSUBSCRIBE now if connected (a new link never subscribes them)."""
        self._live.difference_update(channels)
        self._notify_live()
        if not (self._connected and channels):
            return
        shards = self._expand(channels)
        for shard in shards:
            self._leaving[shard] += 1
        try:
            await self._send("SUNSUBSCRIBE", shards)
        except Exception as exc:
            self.log.warning("unsubscribe failed: %s", exc)
            self._wake.set()

    # ---------------------------------------------------------------- supervision

    def _slot_owners(self) -> list[str]:
        cache = self._cluster.nodes_manager.slots_cache
        owners = []
        for slot in range(SLOTS):
            nodes = cache.get(slot)
            if not nodes:
                raise ConnectionError(f"slot {slot} is not served by any node")
            owners.append(nodes[0].name)
        return owners

    async def _connect(self) -> None:
        await redisconn.refresh_topology(self.redis_topology)
        self._owner = self._slot_owners()
        first_slot: dict[str, int] = {}
        for slot, name in enumerate(self._owner):
            first_slot.setdefault(name, slot)
        timeout = self.config.redis.socket_timeout
        for name, slot in first_slot.items():
            primary = self._cluster.get_node(node_name=name)
            if primary is None:
                raise ConnectionError(f"{name} left the cluster while the link was built")
            client = redisconn.node_client(primary)
            node = _Node(name, client, client.pubsub(), probe_shard(self.probe_channel, slot))
            self._nodes[name] = node
            self._probes[node.probe] = node
            # Each node's probe first, confirmed before anything else is
            # subscribed: on_connected then comes before any event on any node.
            await node.pubsub.ssubscribe(node.probe)
            message = await node.pubsub.get_message(timeout=timeout)
            if message is None or message["type"] != "ssubscribe":
                raise ConnectionError(f"{name} did not confirm the probe subscription: {message}")
            node.probe_rx = time.monotonic()
        self._last_probe_rx = time.monotonic()
        self._connected = True
        self.listener.on_connected()
        await self._send("SSUBSCRIBE", self._expand(self.listener.wanted_channels()))

    async def _drop(self) -> None:
        nodes, self._nodes = list(self._nodes.values()), {}
        self._probes.clear()
        self._shards_live.clear()
        self._leaving.clear()
        await super()._drop()
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.pubsub.aclose()
            with contextlib.suppress(Exception):
                await node.client.aclose()

    async def _run_connected(self) -> None:
        self._wake.clear()
        tasks = [
            asyncio.create_task(self._read_node(node), name=f"relay-pubsub-reader-{node.name}")
            for node in self._nodes.values()
        ]
        tasks.append(asyncio.create_task(self._probe(), name="relay-pubsub-probe"))
        try:
            await self._wake.wait()
        finally:
            for task in tasks:
                exc = await stop_task(task)
                if exc is not None:
                    self.log.error("%s failed", task.get_name(), exc_info=exc)
        raise ConnectionError("pub/sub connection torn down")

    async def _read_node(self, node: _Node) -> None:
        listener = self.listener
        clock = time.monotonic
        slice_ends = clock() + READ_SLICE
        try:
            while True:
                message = await node.pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                now = node.rx = clock()
                if now > slice_ends:
                    await asyncio.sleep(0)
                    slice_ends = clock() + READ_SLICE
                kind = message["type"]
                channel = message["channel"].decode()
                if kind == "smessage":
                    if channel[-1] != "}":
                        listener.on_message(channel, message["data"])
                    elif channel == node.probe:
                        node.probe_out = None
                        self._heard(node)
                    else:  # a firehose shard: handed over as the tenant-wide channel
                        listener.on_message(channel[: channel.rindex(":")], message["data"])
                elif kind == "ssubscribe":
                    # A confirmation proves the socket delivers as well as a
                    # probe does; a tenant-wide subscription is 16384 of them,
                    # which can hold the probe up behind them for a while.
                    self._heard(node)
                    self._confirmed(channel, True)
                elif kind == "sunsubscribe":
                    self._heard(node)
                    if self._leaving.get(channel):
                        self._leaving[channel] -= 1
                        self._confirmed(channel, False)
                    else:
                        # Redis drops a slot's subscribers when the slot moves.
                        self.log.warning(
                            "%s unsubscribed by Redis (slot moved): rebuilding", channel
                        )
                        self._wake.set()
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # MOVED to a subscribe, a lost connection...
            self.log.warning("pub/sub reader of %s stopped: %s", node.name, exc)
            self._wake.set()

    def _heard(self, node: _Node) -> None:
        """``node``'s connection delivered: the link is as fresh as its stalest node."""
        node.probe_rx = time.monotonic()
        self._last_probe_rx = min(n.probe_rx for n in self._nodes.values())

    def _confirmed(self, channel: str, live: bool) -> None:
        logical = channel
        if channel[-1] == "}":
            logical = channel[: channel.rindex(":")]
            shards = self._shards_live[logical]
            if live:
                shards.add(channel)
                if len(shards) < SLOTS:
                    return  # live once every shard is
            else:
                shards.discard(channel)
                if logical not in self._live:
                    return  # unsubscribe() already took it out: no waiter to wake
        self._set_live(logical, live)

    async def _probe(self) -> None:
        interval = self.config.gateway.probe_interval
        timeout = self.config.gateway.probe_timeout
        next_topology = time.monotonic() + TOPOLOGY_CHECK_S
        while True:
            await asyncio.sleep(interval)
            for node in list(self._nodes.values()):
                if node.probe_out is None:
                    node.probe_out = time.monotonic()
                try:
                    await asyncio.wait_for(self.redis.spublish(node.probe, b"p"), timeout)
                except Exception as exc:
                    self.log.warning("probe publish to %s failed: %s", node.name, exc)
            if not self.delivering:
                stale = [n.name for n in self._nodes.values() if not self._fresh(n)]
                self.log.warning(
                    "probe of %s did not come back within %.1fs: rebuilding",
                    ", ".join(stale),
                    timeout,
                )
                self.metrics.probe_failures.inc()
                self._wake.set()
                return
            if time.monotonic() >= next_topology:
                next_topology = time.monotonic() + TOPOLOGY_CHECK_S
                if await self._topology_moved():
                    self._wake.set()
                    return

    def _fresh(self, node: _Node) -> bool:
        """The node's probe came back in time, or its reader is still reading (behind, alive)."""
        window = self.config.gateway.probe_interval + self.config.gateway.probe_timeout
        now = time.monotonic()
        return now - node.probe_rx < window or now - node.rx < self.config.gateway.probe_timeout

    def _reading(self) -> bool:
        return bool(self._nodes) and all(self._fresh(n) for n in self._nodes.values())

    def backlog(self) -> float:
        """As :meth:`PubSubLink.backlog`, for the node furthest behind."""
        now = time.monotonic()
        outs = [now - n.probe_out for n in self._nodes.values() if n.probe_out is not None]
        return max(outs, default=0.0)

    async def _topology_moved(self) -> bool:
        try:
            await redisconn.refresh_topology(self.redis_topology)
            owners = self._slot_owners()
        except Exception as exc:
            self.log.warning("could not re-read the cluster's slot map: %s", exc)
            return False  # the probes tell whether delivery still works
        if owners != self._owner:
            self.log.warning("cluster slot map changed: rebuilding the subscriptions")
            return True
        return False
