"""RelayClient: the orchestrator side. Publishes AgentEvents into Redis.

One publish is one call of the atomic publish script (seq, history, state,
both channels). Calls made by concurrent publishers in one pass of the event
loop share a round trip (:mod:`relay.orchestrator.autopipe`), and so does the
tenant's activity index, refreshed at most once a second per request.

Outage policy: a publish that fails on a connection error is retried with
capped backoff for ``publish_retry_seconds`` (default 10 s). Retries carry the
call's publish id, so the script never publishes the same call twice even when
the first attempt reached Redis and only the reply was lost. When the bound is
exhausted :class:`PublishError` is raised: an event is never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from redis.asyncio import Redis
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay import redisconn
from relay.config import GlobalConfig, HistoryConfig, LeaseConfig, RedisConfig
from relay.orchestrator.autopipe import AutoPipeline
from relay.wire.events import AgentEvent, AgentTextDelta, event_request_id, parse_event
from relay.wire.keys import Keys
from relay.wire.scripts import as_text, is_noscript, script

if TYPE_CHECKING:
    from relay.orchestrator.lease import LeaseKeeper

RETRYABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    # Redis Cluster, while a node restarts or fails over: the slot is served
    # again in a moment (ResponseError subclasses, so listed before it is caught).
    ClusterDownError,
    TryAgainError,
    MasterDownError,
)
RETRY_MARGIN_SECONDS = 60
"""Added to the retry bound when a retry looks for its first attempt in history."""
MASTER_CHECK_S = 5.0
"""How often a Sentinel-managed client asks where the master is (besides reconnects)."""
ACTIVE_TRIM_EVERY = 256
"""Index refreshes per client between trims of the tenant's activity index."""
ACTIVE_REFRESH_S = 1.0
"""How often a request's score in the activity index is refreshed while it publishes:
readers look back further than this (a gateway's catch-up adds 5 s)."""
ACTIVE_MEMO_MAX = 4096
"""Requests whose last refresh is remembered; past this the memo is cleared (overflow
policy: forget, so the next publish of each refreshes it once more)."""


class PublishError(Exception):
    """Publishing failed for good: Redis unreachable past the retry bound, or the call
    refused (the message then includes the publish script's ``relay: ...`` refusal).

    >>> try:
    ...     await client.publish(request_id, event)
    ... except PublishError as exc:
    ...     log.error("event not published: %s", exc)
    """


class OrchestratorLost(PublishError):
    """This orchestrator (or the request) was declared lost: its lease expired and a
    gateway finished its requests for every viewer. Raised by a publish, a lease
    renewal or a hold instead of resurrecting a request everybody saw end; the
    message is the Redis refusal ("relay: orchestrator lost: ...").

    >>> try:
    ...     await agent.text(chunk)
    ... except relay.OrchestratorLost:
    ...     return  # viewers already saw this request end; do not retry it
    """


LOST_REFUSAL = "relay: orchestrator lost:"
"""How the lease and publish scripts' refusal of a lost orchestrator begins."""


def ignore_outcome(future: asyncio.Future[Any]) -> None:
    """Done callback that marks a future's exception as seen (it is not needed)."""
    if not future.cancelled():
        future.exception()


def is_lost_refusal(exc: BaseException) -> bool:
    """True when a Redis error is the scripts' "orchestrator lost" refusal."""
    return isinstance(exc, ResponseError) and LOST_REFUSAL in str(exc)


@dataclass(frozen=True, slots=True)
class Published:
    """Where a publish landed: its seq range, the stream epoch and Redis time.

    >>> published = await client.publish_many(request_id, events)
    >>> published.first_seq, published.last_seq
    """

    first_seq: int
    last_seq: int
    epoch: str
    ts: int


def normalize_request_id(request_id: str | uuid.UUID) -> str:
    """Hyphenated lowercase form of a request id; ``ValueError`` if not a UUID."""
    try:
        return str(request_id if isinstance(request_id, uuid.UUID) else uuid.UUID(request_id))
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"request_id: {request_id!r} is not a valid UUID") from None


def encode_event(request_id: str, event: AgentEvent | dict[str, Any]) -> tuple[str, str]:
    """Validate an event for ``request_id``; return ``(type, compact JSON)``.

    Raises ``pydantic.ValidationError`` (names the field) or ``ValueError``
    when the event's own ``request_id`` disagrees with the one published to.
    """
    model = parse_event(event)
    own = event_request_id(model)
    if own is not None and str(own) != request_id:
        raise ValueError(
            f"request_id: event carries {own} but is published to request {request_id}"
        )
    return model.type, model.model_dump_json()


class RelayClient:
    """Publishes events for one tenant.

    >>> async with RelayClient.from_url("redis://localhost") as client:
    ...     seq = await client.publish(request_id, {"type": "synthesis_started", ...})

    With ``lease=`` (a :class:`~relay.config.LeaseConfig`, or a
    :class:`~relay.orchestrator.lease.LeaseKeeper` built by the caller) the client
    owns the orchestrator's lease: ``client.lease.hold(rid)`` while a request
    runs, renewed in the background, and every publish is refused with
    :class:`OrchestratorLost` once a gateway declared this orchestrator lost:

    >>> async with RelayClient.from_config(config, lease=True) as client:
    ...     await client.lease.hold(request_id)
    ...     await client.publish(request_id, event)
    """

    def __init__(
        self,
        redis: Redis,
        *,
        tenant: str = "default",
        history: HistoryConfig | None = None,
        publish_retry_seconds: float = 10.0,
        owns_connection: bool = True,
        lease: LeaseConfig | LeaseKeeper | None = None,
    ) -> None:
        self.redis = redis
        self.keys = Keys(tenant)
        self.history = history or HistoryConfig()
        self.publish_retry_seconds = publish_retry_seconds
        self._owns = owns_connection
        # On a Redis Cluster: SPUBLISH to the request's channel and to the
        # firehose shard of its slot, both owned by the node running the script.
        self._sharded = redisconn.is_cluster(redis)
        self._script = script("publish", sharded=self._sharded)
        self._master_checked = time.monotonic()
        self._publishes = 0
        self._indexed: dict[str, float] = {}
        self.calls = AutoPipeline(redis)
        """Concurrent publishes (and budget adds) share round trips through this."""
        self._owns_lease = isinstance(lease, LeaseConfig)
        self.lease: LeaseKeeper | None = None
        """The orchestrator's lease, when the client was given one."""
        if isinstance(lease, LeaseConfig):
            from relay.orchestrator.lease import LeaseKeeper  # lease.py imports this module

            self.lease = LeaseKeeper(
                redis, self.keys, lease, state_ttl_seconds=self.history.state_ttl_seconds
            )
        elif lease is not None:
            if lease.keys != self.keys:
                raise ValueError(
                    f"lease: its tenant {lease.keys.tenant!r} is not the client's {tenant!r}"
                )
            self.lease = lease

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        tenant: str = "default",
        history: HistoryConfig | None = None,
        publish_retry_seconds: float = 10.0,
        socket_timeout: float = 5.0,
    ) -> Self:
        """A client with its own connection pool to ``url`` (TLS via ``rediss://`` query
        parameters only; :meth:`from_config` takes every ``[redis]`` setting)."""
        return cls.from_config(
            RedisConfig(
                url=url,
                tenant=tenant,
                publish_retry_seconds=publish_retry_seconds,
                socket_timeout=socket_timeout,
            ),
            history=history,
        )

    @classmethod
    def from_config(
        cls,
        config: RedisConfig | GlobalConfig,
        *,
        history: HistoryConfig | None = None,
        lease: bool | LeaseConfig = False,
    ) -> Self:
        """A client with its own connection pool, built from ``[redis]``.

        The URL (with its ACL user), TLS files and ``tls_verify``,
        ``socket_timeout``, ``max_connections``, ``pool_timeout``, ``tenant`` and
        ``publish_retry_seconds`` all apply. Given a :class:`GlobalConfig`, its
        ``[history]`` is used unless ``history`` is passed. ``lease=True`` gives
        the client a lease with the ``[lease]`` settings of a
        :class:`GlobalConfig` (defaults otherwise); a :class:`LeaseConfig` is used
        as it is.

        >>> client = RelayClient.from_config(load_config(), lease=True)
        """
        rc = redisconn.redis_config(config)
        if history is None and isinstance(config, GlobalConfig):
            history = config.history
        chosen: LeaseConfig | None = None
        if isinstance(lease, LeaseConfig):
            chosen = lease
        elif lease:
            chosen = config.lease if isinstance(config, GlobalConfig) else LeaseConfig()
        return cls(
            redisconn.client(rc),
            tenant=rc.tenant,
            history=history,
            publish_retry_seconds=rc.publish_retry_seconds,
            lease=chosen,
        )

    @property
    def tenant(self) -> str:
        return self.keys.tenant

    async def __aenter__(self) -> Self:
        if self.lease is not None and self._owns_lease:
            try:
                await self.lease.start()
            except BaseException:
                await self.aclose()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the lease (releasing what it holds) and the connection pool, if this
        client created them."""
        if self.lease is not None and self._owns_lease:
            await self.lease.close()
        await self.calls.aclose()
        if self._owns:
            await self.redis.aclose()

    async def publish(self, request_id: str | uuid.UUID, event: AgentEvent | dict[str, Any]) -> int:
        """Publish one event; returns the seq Redis assigned to it."""
        return (await self.publish_many(request_id, [event])).last_seq

    async def publish_text_deltas(
        self, request_id: str | uuid.UUID, agent_id: str | uuid.UUID, texts: Iterable[str]
    ) -> Published:
        """Publish a run of ``agent_text_delta`` events for one agent in one round trip."""
        aid = uuid.UUID(str(agent_id))
        return await self.publish_many(
            request_id, [AgentTextDelta(agent_id=aid, text=t) for t in texts]
        )

    async def publish_many(
        self, request_id: str | uuid.UUID, events: Sequence[AgentEvent | dict[str, Any]]
    ) -> Published:
        """Publish several events of one request atomically, in order, in one round trip."""
        if not events:
            raise ValueError("events: at least one event is required")
        rid = normalize_request_id(request_id)
        encoded: list[str] = []
        for event in events:
            encoded.extend(encode_event(rid, event))
        return await self._publish_encoded(rid, encoded)

    async def publish_once(
        self,
        request_id: str | uuid.UUID,
        events: Sequence[AgentEvent | dict[str, Any]],
        *,
        publish_id: str,
        window_seconds: float,
    ) -> Published:
        """Like :meth:`publish_many`, but a no-op returning the earlier result when a call
        with the same ``publish_id`` landed in the request's history within the last
        ``window_seconds`` (Redis clock): several callers racing to publish the same
        thing publish it once. ``window_seconds=0`` looks for nothing (a first
        attempt) but still records ``publish_id`` for later calls to find.

        >>> await client.publish_once(rid, events, publish_id="lost-" + orch, window_seconds=120)
        """
        if not events:
            raise ValueError("events: at least one event is required")
        if not publish_id:
            raise ValueError("publish_id: must not be empty")
        if window_seconds < 0:
            raise ValueError("window_seconds: must be >= 0")
        rid = normalize_request_id(request_id)
        encoded: list[str] = []
        for event in events:
            encoded.extend(encode_event(rid, event))
        return await self._publish_encoded(
            rid, encoded, publish_id=publish_id, window_ms=int(window_seconds * 1000)
        )

    async def _publish_encoded(
        self, rid: str, encoded: list[str], *, publish_id: str | None = None, window_ms: int = 0
    ) -> Published:
        rk = self.keys.request(rid)
        keys = rk.script_keys
        if self.lease is not None:
            # Refused here once this process knows it was declared lost, and
            # by the script (the lease key) when it does not know yet: a
            # process that was frozen past its deadline publishes before its
            # next renewal tells it.
            self.lease.check()
            keys = [*keys, rk.lease]
        publish_id = publish_id or uuid.uuid4().hex
        deadline = time.monotonic() + self.publish_retry_seconds
        delay = 0.05
        attempt = 0
        while True:
            args: list[Any] = [
                rid,
                uuid.uuid4().hex[:12],
                self.history.max_events,
                self.history.ttl_seconds,
                self.history.state_ttl_seconds,
                rk.channel,
                self.keys.firehose_shard(rid) if self._sharded else self.keys.firehose_channel,
                publish_id,
                # On a retry: how far back (ms, Redis clock) the first attempt
                # can have landed, with room for socket timeouts and skew.
                str(max(window_ms, int((self.publish_retry_seconds + RETRY_MARGIN_SECONDS) * 1000)))
                if attempt
                else str(window_ms),
                *encoded,
            ]
            try:
                return await self._run(rid, keys, args)
            except RETRYABLE as exc:
                attempt += 1
                if time.monotonic() + delay > deadline:
                    raise PublishError(
                        f"publish to request {rid} failed after {attempt} attempts "
                        f"over {self.publish_retry_seconds:g}s: {exc}"
                    ) from exc
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 1.0)
            except ResponseError as exc:
                if is_lost_refusal(exc):
                    message = f"publish to request {rid} refused by Redis: {exc}"
                    lease = self.lease
                    if lease is not None and lease.orchestrator_id in str(exc):
                        # This very orchestrator was declared lost (not another
                        # holder of the request): stop renewing, refuse locally.
                        lease.mark_lost(str(exc))
                    raise OrchestratorLost(message) from exc
                # The script refused the call ("relay: event N: ...", nothing
                # written; events are validated here first, so this means a
                # bug or a script newer than this client) or the server did
                # (out of memory, a read-only replica, a wrong key type): the
                # message is kept whole, and retrying will not help.
                raise PublishError(f"publish to request {rid} refused by Redis: {exc}") from exc

    def _submit_active(self, rid: str) -> list[asyncio.Future[Any]]:
        """Refresh the request's score in the activity index, at most once a second."""
        now = time.monotonic()
        if now - self._indexed.get(rid, -ACTIVE_REFRESH_S) < ACTIVE_REFRESH_S:
            return []
        if len(self._indexed) >= ACTIVE_MEMO_MAX:
            self._indexed.clear()
        self._indexed[rid] = now
        now_ms = int(time.time() * 1000)
        active = self.keys.active
        futures = [
            self.calls.submit("ZADD", active, now_ms, rid),
            # The index must not outlive the data it points at when publishing stops.
            self.calls.submit("EXPIRE", active, self.history.ttl_seconds),
        ]
        self._publishes += 1
        if self._publishes % ACTIVE_TRIM_EVERY == 0:
            # Keep the activity index to the history's lifetime: requests
            # idle for longer have nothing left to replay anyway.
            horizon = now_ms - self.history.ttl_seconds * 1000
            futures.append(self.calls.submit("ZREMRANGEBYSCORE", active, "-inf", horizon))
        return futures

    async def _run(self, rid: str, keys: list[str], args: list[Any]) -> Published:
        if time.monotonic() - self._master_checked > MASTER_CHECK_S:
            # Sentinel: pooled connections may still reach a master that was
            # replaced (it takes writes until it is demoted, then loses them).
            self._master_checked = time.monotonic()
            with contextlib.suppress(RedisError):  # the publish itself will tell
                await redisconn.follow_master(self.redis)
        for _ in range(2):
            # On a cluster the pipeline sends the script and the activity
            # index update to their own nodes (they are in different slots).
            published = self._script.submit_in(self.calls, keys, args)
            # The index refresh rides in the same pipeline. Its outcome is not
            # waited for: it is a hint for readers, and a failure of its own
            # must not fail (or hide the outcome of) the publish.
            for future in self._submit_active(rid):
                future.add_done_callback(ignore_outcome)
            try:
                result = await published
            except ResponseError as exc:
                if not is_noscript(exc):
                    raise
                await self._script.load(self.redis)
                continue
            epoch, ts, first, last = result
            return Published(
                first_seq=int(first),
                last_seq=int(last),
                epoch=as_text(epoch),
                ts=int(ts),
            )
        raise PublishError("publish script could not be loaded")  # pragma: no cover
