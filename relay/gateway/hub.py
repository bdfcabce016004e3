"""The hub: routes each event received on the process's pub/sub connection to its viewers.

Channels are reference counted by local interest. A request channel is held
while some local connection watches the request; the tenant-wide channel
while some local connection wants every event. While the tenant-wide channel
is held, no request channel is: it carries those events too, and holding both
would make Redis send, and this process parse, every such event twice.

Each message is parsed once into an :class:`Envelope` and the same object is
offered to every interested connection. A request's events are routed in
``seq`` order: a hole is filled from history by a lane of
:class:`~relay.gateway.recovery.Backfills` (a task of its own, never the
reader), and after a reconnect every tracked request is caught up the same way.
The connection itself is supervised by :class:`~relay.gateway.pubsub.PubSubLink`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay import redisconn
from relay.aio import stop_task
from relay.config import GlobalConfig
from relay.gateway.envelope import Envelope, EnvelopeError
from relay.gateway.metrics import Metrics
from relay.gateway.pubsub import PubSubLink, SubscribeTimeout
from relay.gateway.recent import RecentEvents
from relay.gateway.recovery import Backfills
from relay.gateway.seqtrack import SeqTable, Step
from relay.gateway.shardlink import ClusterLink
from relay.gateway.store import RequestStore
from relay.logs import LogOnce
from relay.wire.keys import PREFIX, Keys, probe_channel
from relay.wire.scripts import as_text

log = logging.getLogger(__name__)

OUTAGE_MARGIN_S = 5
"""How far before a disconnect the tenant-wide catch-up looks (clock skew, slow detection)."""


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    def offer(self, envelope: Envelope) -> None:
        """Take an event; must not block."""

    def stream_reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        """The request's stream cannot be continued (epoch changed)."""


class HubUnavailable(Exception):
    """The hub could not make a subscription live in time."""


class TenantHub:
    """Routes one tenant's events to its connections; shares the process's pub/sub link.

    Every channel it holds is under ``relay:<tenant>:``, so the process's
    :class:`Hub` hands it exactly its own tenant's messages: a connection
    registered here can never be offered another tenant's event.
    """

    def __init__(
        self,
        config: GlobalConfig,
        redis: Redis,
        metrics: Metrics,
        link: PubSubLink,
        tenant: str,
        log: logging.LoggerAdapter[logging.Logger],
        recent: RecentEvents | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.metrics = metrics
        self.keys = Keys(tenant)
        self.tenant = tenant
        self.log = log
        self._once = LogOnce(self.log)
        self.recent = recent
        self.store = RequestStore(
            redis,
            self.keys,
            config.history.replay_batch,
            on_skip=self._history_skipped,
            recent=recent,
            text_max_bytes=config.snapshot.text_max_bytes,
        )
        self._by_request: dict[str, set[Subscriber]] = {}
        self._firehose: set[Subscriber] = set()
        self._firehose_channel = self.keys.firehose_channel
        self._tracks = SeqTable(
            config.gateway.firehose_track_requests, self._by_request.__contains__
        )
        self.link = link
        self.backfills = Backfills(self.store, self, metrics, self.log)
        self._switch = asyncio.Lock()
        self._recovery: asyncio.Task[None] | None = None
        # Made while the link is up: nothing happened before it that needs a
        # catch-up. Made during an outage: on_connected catches it up.
        self._synced = link.connected
        self._disconnected_at: float | None = None

    # ---------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Stop every task this tenant's routing started and wait for it."""
        task, self._recovery = self._recovery, None
        if task is not None:
            await stop_task(task)
        await self.backfills.close()

    @property
    def tracks(self) -> SeqTable:
        """Where each routed request's stream stands in this process."""
        return self._tracks

    @property
    def synced(self) -> bool:
        """Caught up after the last (re)connect."""
        return self._synced

    @property
    def firehose(self) -> set[Subscriber]:
        """Connections that want every event of the tenant."""
        return self._firehose

    @property
    def idle(self) -> bool:
        """No connection watches anything here."""
        return not self._by_request and not self._firehose

    def status(self) -> dict[str, object]:
        """This tenant's part of ``/readyz``."""
        return {
            "caught_up": self._synced,
            "watched_requests": len(self._by_request),
            "firehose_connections": len(self._firehose),
            "backfills": len(self.backfills),
        }

    # ---------------------------------------------------------------- interest

    async def watch(self, request_id: str, sub: Subscriber) -> None:
        """Route ``request_id``'s events to ``sub``; returns once they flow."""
        subs = self._by_request.setdefault(request_id, set())
        first = not subs
        subs.add(sub)
        track = self._tracks.ensure(request_id)
        channel = self.keys.request_channel(request_id)
        if first and not self._firehose:
            await self.link.subscribe(channel)
        try:
            await self.link.wait_live(channel, self._firehose_channel)
        except SubscribeTimeout as exc:
            raise HubUnavailable(str(exc)) from None
        if track.last is None:
            # Anchor after the events flow, so a later hole or reconnect
            # knows exactly where to backfill from.
            pos = await self.store.position(request_id)
            if track.last is None:
                track.last, track.epoch = pos.seq, pos.epoch

    async def unwatch(self, request_id: str, sub: Subscriber) -> None:
        """Stop routing ``request_id`` to ``sub``; releases the channel after the last viewer."""
        subs = self._by_request.get(request_id)
        if subs is None:
            return
        subs.discard(sub)
        if subs:
            return
        del self._by_request[request_id]
        if not self._firehose:
            # Nothing keeps this track current any more; a stale one would
            # make the next watch() backfill events nobody needs.
            self._tracks.pop(request_id)
            self.backfills.drop(request_id)
            await self.link.unsubscribe(self.keys.request_channel(request_id))

    async def watch_all(self, sub: Subscriber) -> None:
        """Route every event of the tenant to ``sub`` (the original's behaviour)."""
        first = not self._firehose
        self._firehose.add(sub)
        if first:
            async with self._switch:
                await self.link.subscribe(self._firehose_channel)
        try:
            await self.link.wait_live(self._firehose_channel)
        except SubscribeTimeout as exc:
            raise HubUnavailable(str(exc)) from None
        if first:
            async with self._switch:
                if self._firehose and self.link.is_live(self._firehose_channel):
                    # The tenant-wide channel carries these requests now.
                    await self.link.unsubscribe(*self._request_channels())

    async def unwatch_all(self, sub: Subscriber) -> None:
        """Undo :meth:`watch_all` for ``sub``."""
        if sub not in self._firehose:
            return
        self._firehose.discard(sub)
        if self._firehose:
            return
        async with self._switch:
            if self._firehose:
                return  # someone wanted everything again meanwhile
            # Take the watched requests back onto their own channels before
            # letting go of the tenant-wide one, so none of their events falls
            # between the two (duplicates in the overlap are dropped by seq).
            rids = list(self._by_request)
            await self.link.subscribe(*(self.keys.request_channel(r) for r in rids))
            for rid in rids:
                try:
                    # A request whose last viewer left meanwhile is not waited
                    # for: its channel will never come live (it was dropped).
                    await self.link.wait_live(
                        self.keys.request_channel(rid),
                        unless=lambda r=rid: r not in self._by_request,  # type: ignore[misc]
                    )
                except SubscribeTimeout:
                    break  # Redis is away: the next connection subscribes the right set
            if self._firehose:
                return
            await self.link.unsubscribe(self._firehose_channel)
            for rid in self._tracks:
                if rid not in self._by_request:
                    self._tracks.pop(rid)
                    self.backfills.drop(rid)

    def _request_channels(self) -> list[str]:
        return [self.keys.request_channel(r) for r in self._by_request]

    # ---------------------------------------------------------------- link callbacks

    def wanted_channels(self) -> list[str]:
        """Every channel the next connection subscribes (the probe's aside)."""
        if self._firehose:
            return [self._firehose_channel]
        return self._request_channels()

    def on_connected(self) -> None:
        """A new connection is subscribed: hold every tracked request and catch it up."""
        since, self._disconnected_at = self._disconnected_at, None
        self._synced = False
        for rid in self._tracks:
            track = self._tracks.get(rid)
            if track is not None and track.last is not None:
                self.backfills.hold(rid, check_rollback=True)
        previous = self._recovery
        self._recovery = asyncio.create_task(self._recover(since, previous), name="relay-recover")

    def on_message(self, channel: str, data: bytes) -> None:
        """One pub/sub message: parse it once and route it."""
        if channel != self._firehose_channel and self.link.is_live(self._firehose_channel):
            return  # the tenant-wide copy of the same event is routed instead
        try:
            env = Envelope.parse(data)
        except EnvelopeError as exc:
            self._once(f"foreign:{channel}", "ignoring messages on %s: %s", channel, exc)
            return
        self.metrics.events_in.inc()
        self._dispatch(env)

    # ---------------------------------------------------------------- recovery

    async def _recover(self, since: float | None, previous: asyncio.Task[None] | None) -> None:
        """Catch every tracked request up after a (re)connect; then the hub is ready."""
        if previous is not None:
            await stop_task(previous)
        active: set[str] | None = None
        if self._firehose and since is not None:
            active = await self._adopt_active(since)
        lanes = []
        for rid in self.backfills.held():
            lane, track = self.backfills.lane(rid), self._tracks.get(rid)
            quiet = (
                active is not None
                and rid not in active
                and rid not in self._by_request
                and lane is not None
                and track is not None
                and track.last is not None
                and lane.target <= track.last
            )
            if quiet:
                # Seen in passing on the tenant-wide stream and silent since
                # before the outage: nothing to catch up.
                self.backfills.drop(rid)
            elif released := self.backfills.release(rid):
                lanes.append(released)
        for lane in lanes:
            await lane.done.wait()
        self._synced = True

    async def _adopt_active(self, since: float) -> set[str] | None:
        """Tenant-wide viewers also get what requests new to this process published
        while it was away (bounded by one replay batch each). Returns the ids
        active since the outage began (None when the index cannot be read)."""
        floor = int((since - OUTAGE_MARGIN_S) * 1000)
        try:
            active = {
                as_text(r) for r in await self.redis.zrangebyscore(self.keys.active, floor, "+inf")
            }
        except RedisError as exc:
            self.log.warning("could not read the activity index after reconnect: %s", exc)
            return None
        for rid in active:
            if rid in self._tracks:
                continue
            self._tracks.ensure(rid)
            lane = self.backfills.hold(rid, check_rollback=False)
            lane.fresh_window, lane.min_ts = self.config.history.replay_batch, floor
        return active

    # ---------------------------------------------------------------- delivery

    def _dispatch(self, env: Envelope) -> None:
        rid = env.request_id
        lane = self.backfills.lane(rid)
        if lane is not None:
            lane.note(env.seq)  # history delivers it, in order, when the lane gets there
            return
        track = self._tracks.get(rid)
        if track is None:
            if not self._firehose and rid not in self._by_request:
                return  # arrived after the last viewer left
            track = self._tracks.ensure(rid)
        step = track.classify(env.epoch, env.seq)
        if step is Step.RESET:
            track.restart(env.epoch)
            self.reset(rid, env.epoch, "epoch_changed")
            step = track.classify(env.epoch, env.seq)
        if step is Step.DUPLICATE:
            return  # the same event via the other channel, or already backfilled
        if step is Step.GAP:
            self.backfills.run(rid, env.seq)
            return
        self.deliver(env)

    def deliver(self, env: Envelope) -> None:
        """Advance the request's track to ``env`` and offer it to every viewer."""
        self._tracks.ensure(env.request_id).advance(env.epoch, env.seq, env.ts)
        if self.recent is not None:
            self.recent.add(self.tenant, env)  # lag refills of every viewer read it here
        for sub in self._by_request.get(env.request_id, ()):
            sub.offer(env)
        for sub in self._firehose:
            sub.offer(env)

    def reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        """Tell every viewer of ``request_id`` that its stream restarted."""
        self.metrics.resyncs.labels(reason=reason).inc()
        for sub in list(self._by_request.get(request_id, ())) + list(self._firehose):
            sub.stream_reset(request_id, epoch, reason)

    def _history_skipped(self, request_id: str, seq: int, why: str) -> None:
        self.metrics.history_skipped.inc()
        self._once(
            f"skip:{request_id}:{seq}",
            "history entry %d of %s is not a relay frame, skipped on replay: %s",
            seq,
            request_id,
            why,
        )

    def on_disconnected(self) -> None:
        """The pub/sub connection is gone: remember since when, for the next catch-up."""
        self._synced = False
        if self._disconnected_at is None:
            # Not the time of the teardown, which comes after the probe
            # timeout and may be late under load: the stream may have gone
            # quiet since the last probe came back, so catch up from there.
            heard = self.link.last_heard()
            now = time.time()
            self._disconnected_at = now if heard is None else min(now, heard)


class Hub:
    """The process's router: one pub/sub link, one :class:`TenantHub` per tenant.

    The link's listener: every message is handed to the tenant its channel
    names (``relay:<tenant>:...``) and to no other, and a tenant nobody here
    watches gets nothing. ``watch``/``store``/``keys``... without a tenant
    are the configured default tenant's (``redis.tenant``), the one every
    client of a gateway with ``auth.mode = "none"`` uses.
    """

    def __init__(
        self,
        config: GlobalConfig,
        redis: Redis,
        pubsub_redis: Redis,
        metrics: Metrics,
        *,
        control: Redis | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.control = control or redis
        """Health traffic (probe, readiness ping): a pool of its own in the app."""
        self.metrics = metrics
        self.gateway_id = uuid.uuid4().hex[:12]
        # Every hub log line names its gateway (a field of its own in JSON logs).
        self.log = logging.LoggerAdapter(log, {"gateway_id": self.gateway_id})
        # On a Redis Cluster: sharded pub/sub, one connection per primary.
        link_class = ClusterLink if redisconn.is_cluster(pubsub_redis) else PubSubLink
        self.link = link_class(
            config,
            self.control,
            pubsub_redis,
            metrics,
            self,
            probe_channel(config.redis.tenant, self.gateway_id),
            self.log,
        )
        gw = config.gateway
        # One for the process, shared by its tenants, so the bound is the process's.
        self.recent = RecentEvents(gw.recent_events_bytes, gw.recent_events_per_request)
        # After a Sentinel failover the command pool follows the master too.
        self.link.also_follow.append(redis)
        self._tenants: dict[str, TenantHub] = {}
        self.default = self.tenant(config.redis.tenant)

    def tenant(self, name: str) -> TenantHub:
        """The routing of tenant ``name`` (made on first use; tenants are few, from tokens)."""
        hub = self._tenants.get(name)
        if hub is None:
            hub = TenantHub(
                self.config, self.redis, self.metrics, self.link, name, self.log, self.recent
            )
            self._tenants[name] = hub
        return hub

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, listen and probe (in the background)."""
        await self.link.start()

    async def close(self) -> None:
        """Stop everything this hub started and wait for it."""
        await self.link.close()
        for hub in list(self._tenants.values()):
            await hub.close()

    @property
    def ready(self) -> bool:
        """Subscribed, every tenant caught up after the last reconnect, delivering
        (the probe is fresh, or the reader is still taking messages: behind
        under fan-out load is not a reason to leave the balancer)."""
        return (
            self.link.connected
            and self.link.delivering
            and all(h.synced for h in self._tenants.values())
        )

    def status(self) -> dict[str, object]:
        """Facts for ``/readyz``."""
        hubs = self._tenants.values()
        return {
            "gateway_id": self.gateway_id,
            "pubsub_connected": self.link.connected,
            "caught_up": all(h.synced for h in hubs),
            "probe_age_s": self.link.probe_age(),
            "reader_backlog_s": round(self.link.backlog(), 3),
            "channels": self.link.live_count,
            "tenants": len(self._tenants),
            "watched_requests": sum(len(h._by_request) for h in hubs),
            "firehose_connections": sum(len(h.firehose) for h in hubs),
            "backfills": sum(len(h.backfills) for h in hubs),
            "reconnects": self.link.reconnects,
        }

    # ---------------------------------------------------------------- link callbacks

    def wanted_channels(self) -> list[str]:
        """Every channel of every tenant the next connection subscribes."""
        return [c for h in self._tenants.values() for c in h.wanted_channels()]

    def on_connected(self) -> None:
        """A new connection is subscribed: every tenant catches up."""
        for hub in self._tenants.values():
            hub.on_connected()

    def on_message(self, channel: str, data: bytes) -> None:
        """Hand a message to the tenant its channel names (``relay:<tenant>:...``)."""
        head, _, rest = channel.partition(":")
        tenant = rest.partition(":")[0]
        hub = self._tenants.get(tenant) if head == PREFIX else None
        if hub is not None:
            hub.on_message(channel, data)

    def on_disconnected(self) -> None:
        """The pub/sub connection is gone: every tenant remembers since when."""
        for hub in self._tenants.values():
            hub.on_disconnected()

    # ---------------------------------------------------------------- the default tenant

    @property
    def keys(self) -> Keys:
        """The default tenant's keys."""
        return self.default.keys

    @property
    def store(self) -> RequestStore:
        """The default tenant's history and state reader."""
        return self.default.store

    @property
    def tracks(self) -> SeqTable:
        """The default tenant's stream positions."""
        return self.default.tracks

    @property
    def backfills(self) -> Backfills:
        """The default tenant's backfill lanes."""
        return self.default.backfills

    async def watch(self, request_id: str, sub: Subscriber) -> None:
        """:meth:`TenantHub.watch` on the default tenant."""
        await self.default.watch(request_id, sub)

    async def unwatch(self, request_id: str, sub: Subscriber) -> None:
        """:meth:`TenantHub.unwatch` on the default tenant."""
        await self.default.unwatch(request_id, sub)

    async def watch_all(self, sub: Subscriber) -> None:
        """:meth:`TenantHub.watch_all` on the default tenant."""
        await self.default.watch_all(sub)

    async def unwatch_all(self, sub: Subscriber) -> None:
        """:meth:`TenantHub.unwatch_all` on the default tenant."""
        await self.default.unwatch_all(sub)
