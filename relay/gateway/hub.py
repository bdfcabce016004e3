"""The hub: one Redis pub/sub connection per gateway process, shared by every client.

Channels are reference counted by local interest: a request channel is
subscribed when its first local viewer arrives and unsubscribed after the
last leaves; the tenant firehose channel only while some connection wants
every event. Each message is parsed once into an :class:`Envelope` and the
same object is offered to every interested connection.

The listener is supervised, because a listener that dies quietly while health
stays green is the worst failure of this kind of system:

* any error on the pub/sub connection tears it down; the supervisor
  reconnects with capped, jittered backoff, resubscribes every channel and
  backfills each watched request from the last seq it forwarded, reading the
  history once per process (connections deduplicate by seq);
* a probe publishes to this gateway's own channel every ``probe_interval``;
  when it does not come back within ``probe_timeout`` the connection is
  declared dead and rebuilt the same way;
* :attr:`ready` is true only while the connection is subscribed and the last
  probe came back in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from ..aio import stop_task
from ..config import GlobalConfig
from ..keys import Keys, probe_channel
from ..scripts import as_text, script
from .envelope import Envelope, EnvelopeError
from .metrics import Metrics
from .store import HistoryGap, RequestStore

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    def offer(self, envelope: Envelope) -> None:
        """Take an event; must not block."""

    def stream_reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        """The request's stream cannot be continued (epoch changed, history gap)."""


class HubUnavailable(Exception):
    """The hub could not make a subscription live in time."""


@dataclass(slots=True)
class _Cursor:
    last: int
    epoch: str | None
    ts: int = 0
    """Redis time of the event at ``last``: tells a reused seq from the one forwarded."""


class Hub:
    """Owns the pub/sub connection, its listener, the probe and the supervisor."""

    def __init__(
        self, config: GlobalConfig, redis: Redis, pubsub_redis: Redis, metrics: Metrics
    ) -> None:
        self.config = config
        self.redis = redis
        self._pubsub_redis = pubsub_redis
        self.metrics = metrics
        self.keys = Keys(config.redis.tenant)
        self.store = RequestStore(redis, self.keys, config.history.replay_batch)
        self.gateway_id = uuid.uuid4().hex[:12]
        # Every hub log line names its gateway (a field of its own in JSON logs).
        self.log = logging.LoggerAdapter(log, {"gateway_id": self.gateway_id})
        self._probe_channel = probe_channel(self.gateway_id)
        self._by_request: dict[str, set[Subscriber]] = {}
        self._firehose: set[Subscriber] = set()
        self._cursors: OrderedDict[str, _Cursor] = OrderedDict()
        self._pubsub: PubSub | None = None
        self._live: set[str] = set()
        self._live_changed = asyncio.Condition()
        self._last_probe_rx = 0.0
        self._connected = False
        self._synced = False
        self._disconnected_at: float | None = time.time()
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.reconnects = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the supervisor (which connects, listens and probes)."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="relay-hub")

    async def close(self) -> None:
        """Stop everything this hub started and wait for it."""
        task, self._supervisor = self._supervisor, None
        if task is not None:
            await stop_task(task)
        await self._drop_pubsub()

    @property
    def ready(self) -> bool:
        """Subscribed, caught up after the last reconnect, and the last probe came back in time."""
        window = self.config.gateway.probe_interval + self.config.gateway.probe_timeout
        return self._connected and self._synced and time.monotonic() - self._last_probe_rx < window

    def status(self) -> dict[str, object]:
        """Facts for ``/readyz``."""
        return {
            "gateway_id": self.gateway_id,
            "pubsub_connected": self._connected,
            "probe_age_s": round(time.monotonic() - self._last_probe_rx, 3),
            "channels": len(self._live),
            "watched_requests": len(self._by_request),
            "firehose_connections": len(self._firehose),
            "reconnects": self.reconnects,
        }

    # ---------------------------------------------------------------- interest

    async def watch(self, request_id: str, sub: Subscriber) -> None:
        """Route ``request_id``'s events to ``sub``; returns once the channel is live."""
        subs = self._by_request.setdefault(request_id, set())
        first = not subs
        subs.add(sub)
        if request_id not in self._cursors:
            self._cursors[request_id] = _Cursor(-1, None)
        if first:
            await self._subscribe(self.keys.request_channel(request_id))
        await self._wait_live(self.keys.request_channel(request_id))
        cursor = self._cursors.get(request_id)
        if cursor is not None and cursor.last < 0:
            # Anchor the cursor after the subscription is live, so a later
            # reconnect knows exactly where to backfill from.
            pos = await self.store.position(request_id)
            if cursor.last < 0:
                cursor.last, cursor.epoch = pos.seq, pos.epoch

    async def unwatch(self, request_id: str, sub: Subscriber) -> None:
        """Stop routing ``request_id`` to ``sub``; unsubscribes after the last viewer."""
        subs = self._by_request.get(request_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._by_request[request_id]
            if not self._firehose:
                # Nothing keeps this cursor current any more; a stale one would
                # make the next watch() backfill events nobody needs.
                self._cursors.pop(request_id, None)
            await self._unsubscribe(self.keys.request_channel(request_id))

    async def watch_all(self, sub: Subscriber) -> None:
        """Route every event of the tenant to ``sub`` (the original's behaviour)."""
        first = not self._firehose
        self._firehose.add(sub)
        if first:
            await self._subscribe(self.keys.firehose_channel)
        await self._wait_live(self.keys.firehose_channel)

    async def unwatch_all(self, sub: Subscriber) -> None:
        """Undo :meth:`watch_all` for ``sub``."""
        if sub in self._firehose:
            self._firehose.discard(sub)
            if not self._firehose:
                for rid in [r for r in self._cursors if r not in self._by_request]:
                    del self._cursors[rid]
                await self._unsubscribe(self.keys.firehose_channel)

    async def _subscribe(self, channel: str) -> None:
        if self._pubsub is not None and self._connected:
            try:
                await self._pubsub.subscribe(channel)
            except Exception as exc:  # the supervisor will rebuild the connection
                self.log.warning("subscribe %s failed: %s", channel, exc)
                self._wake.set()

    async def _unsubscribe(self, channel: str) -> None:
        self._live.discard(channel)
        if self._pubsub is not None and self._connected:
            try:
                await self._pubsub.unsubscribe(channel)
            except Exception as exc:
                self.log.warning("unsubscribe %s failed: %s", channel, exc)
                self._wake.set()

    async def _wait_live(self, channel: str) -> None:
        timeout = self.config.redis.socket_timeout
        async with self._live_changed:
            try:
                await asyncio.wait_for(
                    self._live_changed.wait_for(lambda: channel in self._live), timeout
                )
            except TimeoutError:
                raise HubUnavailable(f"could not subscribe within {timeout:g}s") from None

    def _wanted_channels(self) -> list[str]:
        wanted = [self.keys.request_channel(r) for r in self._by_request]
        if self._firehose:
            wanted.append(self.keys.firehose_channel)
        return wanted

    # ---------------------------------------------------------------- supervision

    async def _supervise(self) -> None:
        delay = 0.05
        cap = self.config.gateway.reconnect_backoff_max
        while True:
            try:
                await self._connect()
                await self._run_connected()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("pub/sub connection lost: %s", exc)
            # Back off from scratch only after a connection that really
            # worked (caught up): one that fails during its backfill, or while
            # Redis is still loading, keeps growing the delay up to the cap.
            delay = 0.05 if self._synced else min(delay * 2, cap)
            self.metrics.redis_reconnects.inc()
            self.reconnects += 1
            await self._drop_pubsub()
            await asyncio.sleep(delay * random.uniform(0.7, 1.3))

    async def _connect(self) -> None:
        pubsub = self._pubsub_redis.pubsub()
        self._pubsub = pubsub
        await pubsub.subscribe(self._probe_channel, *self._wanted_channels())
        self._connected = True
        self._last_probe_rx = time.monotonic()

    async def _drop_pubsub(self) -> None:
        was_connected = self._connected
        self._connected = False
        self._synced = False
        if was_connected or self._disconnected_at is None:
            self._disconnected_at = time.time()
        async with self._live_changed:
            self._live.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _run_connected(self) -> None:
        assert self._pubsub is not None
        self._wake.clear()
        reader = asyncio.create_task(self._read(self._pubsub), name="relay-hub-reader")
        prober = asyncio.create_task(self._probe(), name="relay-hub-probe")
        try:
            await self._wake.wait()
        finally:
            # Not a TaskGroup: its exit waits after a single cancel, and a
            # reader whose cancel was swallowed (see stop_task) kept the
            # supervisor from ever rebuilding the connection.
            reader.cancel()
            prober.cancel()
            for task in (reader, prober):
                exc = await stop_task(task)
                if exc is not None:
                    self.log.error("%s failed", task.get_name(), exc_info=exc)
        raise ConnectionError("pub/sub connection torn down")

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind = message["type"]
                channel = message["channel"].decode()
                if kind == "message":
                    await self._on_message(channel, message["data"])
                elif kind == "subscribe":
                    await self._on_subscribed(channel)
                elif kind == "unsubscribe":
                    self._live.discard(channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.warning("pub/sub reader stopped: %s", exc)
            self._wake.set()

    async def _probe(self) -> None:
        interval = self.config.gateway.probe_interval
        timeout = self.config.gateway.probe_timeout
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    await asyncio.wait_for(self.redis.publish(self._probe_channel, b"p"), timeout)
                except Exception as exc:
                    self.log.warning("probe publish failed: %s", exc)
                if time.monotonic() - self._last_probe_rx > interval + timeout:
                    self.log.warning("probe did not come back within %.1fs: rebuilding", timeout)
                    self.metrics.probe_failures.inc()
                    self._wake.set()
                    return
        except asyncio.CancelledError:
            raise

    async def _on_subscribed(self, channel: str) -> None:
        if channel == self._probe_channel:
            self._last_probe_rx = time.monotonic()
            await self._backfill_after_reconnect()
            return
        async with self._live_changed:
            self._live.add(channel)
            self._live_changed.notify_all()

    # ---------------------------------------------------------------- delivery

    async def _on_message(self, channel: str, data: bytes) -> None:
        if channel == self._probe_channel:
            self._last_probe_rx = time.monotonic()
            return
        try:
            env = Envelope.parse(data)
        except EnvelopeError as exc:
            self.log.warning("ignoring message on %s: %s", channel, exc)
            return
        self.metrics.events_in.inc()
        await self._dispatch(env)

    async def _dispatch(self, env: Envelope) -> None:
        cursor = self._cursors.get(env.request_id)
        if cursor is not None and cursor.last >= 0:
            if cursor.epoch is not None and env.epoch != cursor.epoch:
                cursor.epoch, cursor.last = env.epoch, 0
                self._reset(env.request_id, env.epoch, "epoch_changed")
            if env.seq <= cursor.last:
                return  # the same event via the other channel, or already backfilled
            if env.seq > cursor.last + 1:
                await self._backfill(env.request_id, env.epoch, cursor.last, env.seq - 1)
        self._advance(env)
        self._fan_out(env)

    def _advance(self, env: Envelope) -> None:
        cursor = self._cursors.get(env.request_id)
        if cursor is None:
            cursor = self._cursors[env.request_id] = _Cursor(env.seq, env.epoch)
            self._evict()
        cursor.last, cursor.epoch, cursor.ts = env.seq, env.epoch, env.ts
        self._cursors.move_to_end(env.request_id)

    def _evict(self) -> None:
        limit = self.config.gateway.firehose_track_requests
        while len(self._cursors) > limit:
            for rid in self._cursors:
                if rid not in self._by_request:
                    del self._cursors[rid]
                    break
            else:
                return

    def _fan_out(self, env: Envelope) -> None:
        for sub in self._by_request.get(env.request_id, ()):
            sub.offer(env)
        for sub in self._firehose:
            sub.offer(env)

    def _reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        self.metrics.resyncs.labels(reason=reason).inc()
        for sub in list(self._by_request.get(request_id, ())) + list(self._firehose):
            sub.stream_reset(request_id, epoch, reason)

    async def _backfill(
        self, request_id: str, epoch: str, after: int, until: int | None, min_ts: int = 0
    ) -> None:
        try:
            async for batch in self.store.replay(request_id, epoch, after, until):
                for env in batch:
                    self._advance(env)
                    if env.ts >= min_ts:
                        self._fan_out(env)
        except HistoryGap as gap:
            # Hand out what history still has. Each connection then sees its
            # own gap and is told to resync only if it really missed events;
            # a reset sent from here reached clients whose position was fine.
            if gap.first_available is not None:
                await self._backfill(request_id, epoch, gap.first_available - 1, until, min_ts)

    async def _backfill_after_reconnect(self) -> None:
        """Bring every watched request (and the firehose) up to date after a reconnect."""
        since, self._disconnected_at = self._disconnected_at, None
        requests = list(self._by_request)
        floor = 0
        if self._firehose and since is not None:
            # Requests that published while we were away, seen or not.
            floor = int((since - 5) * 1000)
            active = await self.redis.zrangebyscore(self.keys.active, floor, "+inf")
            seen = set(requests)
            for raw in active:
                rid = as_text(raw)
                if rid not in seen:
                    requests.append(rid)
                    seen.add(rid)
        positions = await self.store.positions(requests)
        for rid, pos in zip(requests, positions, strict=True):
            if pos.epoch is None:
                continue
            cursor = self._cursors.get(rid)
            if cursor is None or cursor.last < 0:
                if rid in self._by_request:
                    continue  # watch() anchors it
                # New to this gateway: firehose viewers get what happened
                # during the outage (bounded by one replay batch), not the
                # whole history of the request.
                start = max(0, pos.seq - self.config.history.replay_batch)
                cursor = self._cursors[rid] = _Cursor(start, pos.epoch)
                await self._backfill(rid, pos.epoch, start, pos.seq, min_ts=floor)
                continue
            if cursor.epoch is not None and pos.epoch != cursor.epoch:
                cursor.epoch, cursor.last, cursor.ts = pos.epoch, 0, 0
                self._reset(rid, pos.epoch, "epoch_changed")
            elif await self._rolled_back(rid, cursor, pos.seq):
                epoch = await self._new_epoch(rid, pos.epoch)
                cursor.epoch, cursor.last, cursor.ts = epoch, 0, 0
                self._reset(rid, epoch, "epoch_changed")
            if pos.seq > cursor.last:
                await self._backfill(rid, cursor.epoch or pos.epoch, cursor.last, pos.seq)
        self._synced = True
        # The backfill proves the server answers; do not let a long one trip
        # the probe and tear down the connection it just caught up on.
        self._last_probe_rx = time.monotonic()

    async def _rolled_back(self, rid: str, cursor: _Cursor, seq: int) -> bool:
        """True when Redis came back with an older copy of the request in the same epoch.

        Seq went backwards, or the entry at the last seq we forwarded now holds
        another event (published after a rollback, reusing the seq).
        """
        if cursor.last <= 0:
            return False
        if seq < cursor.last:
            return True
        if not cursor.ts:
            return False
        ts = await self.store.entry_ts(rid, cursor.last)
        return ts is not None and ts != cursor.ts

    async def _new_epoch(self, rid: str, seen: str) -> str:
        self.log.warning("request %s rolled back in Redis: starting a new epoch", rid)
        result = await script("epoch_bump")(
            self.redis, [self.keys.request(rid).epoch], [seen, uuid.uuid4().hex[:12]]
        )
        return as_text(result) if result is not None else seen
