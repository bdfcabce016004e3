"""The gateway's one pub/sub connection, kept alive and proven to deliver.

A listener that dies quietly while health stays green is the worst failure of
this kind of system, so the connection is supervised:

* any error on it tears it down; the supervisor reconnects with capped,
  jittered backoff and subscribes every wanted channel again in one command;
* a probe publishes to this gateway's own channel every ``probe_interval``;
  when it does not come back within ``probe_timeout``, and no other message
  arrived meanwhile either, the connection is declared dead and rebuilt the
  same way (a socket can stay open and deliver nothing: a half-open TCP
  connection after a failover or a NAT timeout). A reader that is merely
  behind, under load, is not dead: its backlog (:meth:`PubSubLink.backlog`)
  is reported in ``/readyz``, and the overload shedder acts on the delivery
  lag that comes with it;
* the reader only reads and hands each message to the listener, which must
  not block and does no Redis I/O: a slow history read can never hold up
  delivery, nor let Redis's output-buffer limit kill the connection.

What to do after a reconnect (backfill what was missed) is the listener's
business: :meth:`Listener.on_connected` is called from the reader before any
message that arrived on the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from relay import redisconn
from relay.aio import stop_task
from relay.config import GlobalConfig
from relay.gateway.metrics import Metrics

READ_SLICE = 0.005
"""Seconds the reader may hold the event loop before it yields once."""
TOPOLOGY_CHECK_S = 5.0
"""How often the link asks whether Redis moved under it (a Sentinel failover, a
cluster's slot map) when nothing told it."""


class Listener(Protocol):
    """What the link hands its messages to."""

    def wanted_channels(self) -> list[str]:
        """Every channel to subscribe on a new connection."""

    def on_connected(self) -> None:
        """The new connection is subscribed; called before any of its messages."""

    def on_message(self, channel: str, data: bytes) -> None:
        """One message; must not block and must not talk to Redis."""

    def on_disconnected(self) -> None:
        """The connection failed or was torn down (also called for failed attempts)."""


class SubscribeTimeout(Exception):
    """A channel did not become live in time."""


class PubSubLink:
    """Owns the pub/sub connection, its reader, the probe and the supervisor."""

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
        self.config = config
        self.redis = redis
        self._pubsub_redis = pubsub_redis
        self.metrics = metrics
        self.listener = listener
        self.probe_channel = probe_channel
        self.log = log
        self._pubsub: PubSub | None = None
        self._live: set[str] = set()
        self._live_changed = asyncio.Event()
        """Set (and replaced) at every change of ``_live``: what :meth:`wait_live` waits on."""
        self._last_probe_rx: float | None = None
        self._last_rx: float | None = None
        """When the reader last took any message off the socket."""
        self._probe_out: float | None = None
        """When the oldest probe not back yet was published."""
        self._connected = False
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.reconnects = 0
        self.also_follow: list[Redis] = []
        """Clients whose pools move with the master when it moves (Sentinel)."""

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the supervisor (which connects, reads and probes)."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="relay-pubsub")

    async def close(self) -> None:
        """Stop everything this link started and wait for it."""
        task, self._supervisor = self._supervisor, None
        if task is not None:
            await stop_task(task)
        await self._drop()

    @property
    def connected(self) -> bool:
        """Subscribed on a connection that has not failed yet."""
        return self._connected

    @property
    def probe_fresh(self) -> bool:
        """The last probe came back within ``probe_interval + probe_timeout``."""
        window = self.config.gateway.probe_interval + self.config.gateway.probe_timeout
        rx = self._last_probe_rx
        return rx is not None and time.monotonic() - rx < window

    @property
    def delivering(self) -> bool:
        """Delivery works: the last probe came back in time, or the reader is still
        taking messages off the socket.

        Under fan-out load the reader can fall seconds behind, and the probe
        with it, while the connection is perfectly alive: rebuilding it then
        (or failing readiness, so the balancer moves the load to the next
        gateway) made an overload worse. A socket that stays open but delivers
        nothing delivers no other message either, so it is still caught.
        """
        return self.probe_fresh or self._reading()

    def _reading(self) -> bool:
        rx = self._last_rx
        return rx is not None and time.monotonic() - rx < self.config.gateway.probe_timeout

    def backlog(self) -> float:
        """Seconds the oldest probe not back yet has been on its way: how far
        behind the reader is (0 while none is outstanding)."""
        sent = self._probe_out
        return 0.0 if sent is None else max(0.0, time.monotonic() - sent)

    def _probe_back(self, now: float) -> None:
        self._last_probe_rx = now
        self._probe_out = None

    def _set_live(self, channel: str, live: bool) -> None:
        if live:
            self._live.add(channel)
        else:
            self._live.discard(channel)
        self._notify_live()

    def _notify_live(self) -> None:
        # A fresh Event per change instead of a Condition: waiters need no
        # lock. With a Condition, every connection's wait_live() took its
        # lock in turn, one pass of the event loop per hand-over, so under
        # load 2,000 connecting clients (and the pinger and the new ones
        # queued behind them) got through at about ten per second.
        changed, self._live_changed = self._live_changed, asyncio.Event()
        changed.set()

    def probe_age(self) -> float | None:
        """Seconds since the last probe came back (None: none has yet)."""
        rx = self._last_probe_rx
        return None if rx is None else round(time.monotonic() - rx, 3)

    def last_heard(self) -> float | None:
        """Wall-clock time the connection last proved it delivers (the last probe back)."""
        rx = self._last_probe_rx
        return None if rx is None else time.time() - (time.monotonic() - rx)

    def is_live(self, channel: str) -> bool:
        """Whether ``channel`` is subscribed on the current connection."""
        return channel in self._live

    @property
    def live_count(self) -> int:
        """How many channels (the probe's excluded) are subscribed now."""
        return len(self._live)

    # ---------------------------------------------------------------- channels

    async def subscribe(self, *channels: str) -> None:
        """Subscribe now if connected; otherwise the next connection will."""
        if self._pubsub is not None and self._connected and channels:
            try:
                await self._pubsub.subscribe(*channels)
            except Exception as exc:  # the supervisor rebuilds the connection
                self.log.warning("subscribe failed: %s", exc)
                self._wake.set()

    async def unsubscribe(self, *channels: str) -> None:
        """Unsubscribe now if connected (a new connection never subscribes them)."""
        self._live.difference_update(channels)
        self._notify_live()
        if self._pubsub is not None and self._connected and channels:
            try:
                await self._pubsub.unsubscribe(*channels)
            except Exception as exc:
                self.log.warning("unsubscribe failed: %s", exc)
                self._wake.set()

    async def wait_live(
        self,
        *channels: str,
        timeout: float | None = None,
        unless: Callable[[], bool] | None = None,
    ) -> None:
        """Return once any of ``channels`` is live (or ``unless()`` is true: nobody
        wants them any more); :class:`SubscribeTimeout` after ``timeout``."""
        limit = self.config.redis.socket_timeout if timeout is None else timeout

        def done() -> bool:
            return any(c in self._live for c in channels) or (unless is not None and unless())

        if done():
            return  # the common case: no waiting, no timer
        try:
            async with asyncio.timeout(limit):
                while not done():
                    await self._live_changed.wait()
        except TimeoutError:
            raise SubscribeTimeout(f"could not subscribe within {limit:g}s") from None

    # ---------------------------------------------------------------- supervision

    async def _supervise(self) -> None:
        delay = 0.05
        cap = self.config.gateway.reconnect_backoff_max
        while True:
            worked = False
            try:
                await self._connect()
                worked = True
                await self._run_connected()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("pub/sub connection lost: %s", exc)
            # Back off from scratch only after a connection that really
            # worked; one that fails at once (Redis still loading, refusing)
            # keeps growing the delay up to the cap.
            delay = 0.05 if worked else min(delay * 2, cap)
            self.metrics.redis_reconnects.inc()
            self.reconnects += 1
            await self._drop()
            await asyncio.sleep(delay * random.uniform(0.7, 1.3))

    async def _connect(self) -> None:
        pubsub = self._pubsub_redis.pubsub()
        self._pubsub = pubsub
        # One SUBSCRIBE, probe first: its confirmation reaches the reader
        # before any message of the other channels.
        await pubsub.subscribe(self.probe_channel, *self.listener.wanted_channels())
        self._connected = True

    async def _drop(self) -> None:
        self._connected = False
        self.listener.on_disconnected()
        self._live.clear()
        self._notify_live()
        self._probe_out = None
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _run_connected(self) -> None:
        assert self._pubsub is not None
        self._wake.clear()
        reader = asyncio.create_task(self._read(self._pubsub), name="relay-pubsub-reader")
        prober = asyncio.create_task(self._probe(), name="relay-pubsub-probe")
        try:
            await self._wake.wait()
        finally:
            # Not a TaskGroup: its exit waits after a single cancel, and a
            # reader whose cancel was swallowed (see stop_task) kept the
            # supervisor from ever rebuilding the connection.
            for task in (reader, prober):
                exc = await stop_task(task)
                if exc is not None:
                    self.log.error("%s failed", task.get_name(), exc_info=exc)
        raise ConnectionError("pub/sub connection torn down")

    async def _read(self, pubsub: PubSub) -> None:
        listener = self.listener
        probe = self.probe_channel
        clock = time.monotonic
        slice_ends = clock() + READ_SLICE
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                now = self._last_rx = clock()
                if now > slice_ends:
                    # Buffered messages are parsed without suspending, and each
                    # may fan out to thousands of queues: give the loop back.
                    await asyncio.sleep(0)
                    slice_ends = clock() + READ_SLICE
                kind = message["type"]
                channel = message["channel"].decode()
                if kind == "message":
                    if channel == probe:
                        self._probe_back(now)
                    else:
                        listener.on_message(channel, message["data"])
                elif kind == "subscribe":
                    self._on_subscribed(channel)
                elif kind == "unsubscribe":
                    self._set_live(channel, False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.warning("pub/sub reader stopped: %s", exc)
            self._wake.set()

    def _on_subscribed(self, channel: str) -> None:
        if channel == self.probe_channel:
            # The subscription itself proves the server answers on this socket.
            self._probe_back(time.monotonic())
            self.listener.on_connected()
            return
        self._set_live(channel, True)

    async def _probe(self) -> None:
        interval = self.config.gateway.probe_interval
        timeout = self.config.gateway.probe_timeout
        next_check = time.monotonic() + TOPOLOGY_CHECK_S
        while True:
            await asyncio.sleep(interval)
            if self._probe_out is None:
                self._probe_out = time.monotonic()
            try:
                await asyncio.wait_for(self.redis.publish(self.probe_channel, b"p"), timeout)
            except Exception as exc:
                self.log.warning("probe publish failed: %s", exc)
            if not self.delivering:
                self.log.warning("probe did not come back within %.1fs: rebuilding", timeout)
                self.metrics.probe_failures.inc()
                self._wake.set()
                return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + TOPOLOGY_CHECK_S
                if await self._master_moved():
                    self._wake.set()
                    return

    async def _master_moved(self) -> bool:
        """After a Sentinel failover: still subscribed on the old master (now a replica)?"""
        connection = self._pubsub.connection if self._pubsub is not None else None
        try:
            for client in (self.redis, *self.also_follow):
                await redisconn.follow_master(client)
            moved = not await redisconn.still_on_master(self._pubsub_redis, connection)
        except Exception as exc:
            self.log.warning("could not ask the Sentinels for the master: %s", exc)
            return False  # the probe tells whether delivery still works
        if moved:
            self.log.warning("the master moved (Sentinel failover): resubscribing on the new one")
        return moved
