"""Cancellation through Redis: a durable tombstone plus a fast nudge.

Writing a cancel (gateway, REST, CLI): ``SET relay:T:cancel:{X} <json> EX ttl``
and ``PUBLISH relay:T:cancels <json>`` in one MULTI. The tombstone is the
truth; the message only wakes orchestrators up quickly. On a Redis Cluster
the nudge is ``SPUBLISH`` (only the node owning the channel carries it), sent
after the SET: the two are in different slots, so no MULTI spans them.

Honouring it (orchestrator): a :class:`CancelRegistry` per process holds the
live :class:`CancelToken` objects, each registered under every id of its
lineage (request id, ancestors, itself). A nudge for id X cancels exactly the
tokens whose lineage contains X, so cancelling an agent reaches descendants
on any host. Registration checks the tombstones of the whole lineage *after*
indexing the token, so a cancel written before the agent existed is honoured
at registration and one written during it is caught by the nudge. A poll of
the tombstones of every live token covers nudges missed while the pub/sub
connection was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from relay import redisconn
from relay.aio import stop_task
from relay.wire.events import AgentCancelled
from relay.wire.keys import Keys

if TYPE_CHECKING:
    from relay.orchestrator.client import RelayClient

log = logging.getLogger(__name__)


async def request_cancel(
    redis: Redis, keys: Keys, target_id: str, *, reason: str = "cancelled by user", ttl: int
) -> bool:
    """Durably record a cancel of agent or request ``target_id`` and nudge orchestrators.

    Idempotent. Returns True when a tombstone already existed.

    >>> await request_cancel(redis, Keys("acme"), agent_id, ttl=86400)
    False
    """
    payload = json.dumps({"target_id": target_id, "reason": reason, "ts": int(time.time() * 1000)})
    if redisconn.is_cluster(redis):
        # Tombstone first: a nudge that arrives before it would find nothing.
        previous = await redis.set(keys.cancel(target_id), payload, ex=ttl, get=True)
        await redis.spublish(keys.cancel_channel, payload)
        return previous is not None
    pipe = redis.pipeline(transaction=True)
    pipe.set(keys.cancel(target_id), payload, ex=ttl, get=True)
    pipe.publish(keys.cancel_channel, payload)
    previous, _ = await pipe.execute()
    return previous is not None


class CancelToken:
    """Cancellation state of one agent (or of a whole request, for the root token).

    ``lineage`` is every id from the request down to this one; pass it to
    another host so a token created there is reached by cancels of any
    ancestor (:meth:`CancelRegistry.token` with ``lineage=``).

    >>> token = await registry.token(agent_id, lineage=[request_id, parent_id])
    >>> token.is_cancelled()
    False
    """

    def __init__(self, registry: CancelRegistry, lineage: tuple[str, ...]) -> None:
        self.registry = registry
        self.lineage = lineage
        self.reason: str | None = None
        self.cancelled_by: str | None = None
        self._event = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def id(self) -> str:
        """The agent (or request) id this token belongs to."""
        return self.lineage[-1]

    def is_cancelled(self) -> bool:
        """True once this token or any ancestor was cancelled. Cheap: no I/O."""
        return self._event.is_set()

    async def wait(self) -> str:
        """Wait until cancelled; returns the reason."""
        await self._event.wait()
        return self.reason or "cancelled"

    async def child(self, agent_id: str) -> CancelToken:
        """Register a child agent; it starts cancelled if any ancestor already is."""
        return await self.registry.token(agent_id, lineage=self.lineage)

    def cancel(self, reason: str = "cancelled", by: str | None = None) -> None:
        """Cancel locally: this token and its local descendants (no Redis write).

        ``by`` is recorded as :attr:`cancelled_by` (default: this token's id).
        """
        self.registry._trigger(self.id, reason, by=by)

    async def announce(
        self, client: RelayClient, request_id: str, reason: str | None = None
    ) -> int:
        """Publish ``agent_cancelled`` for this agent; returns its seq."""
        event = AgentCancelled(
            agent_id=uuid.UUID(self.id), reason=reason or self.reason or "cancelled"
        )
        return await client.publish(request_id, event)

    def release(self) -> None:
        """Forget the token (the agent finished); stops polling its tombstones."""
        self.registry._unregister(self)

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` synchronously when this token is cancelled (at once if it is).

        Returns a function that removes the callback. The SDK uses this to
        interrupt an agent's task in the same step as the cancel arrives, so
        a cancel of an ancestor lands on every nested agent of one task
        before that task runs again.
        """
        if self._event.is_set():
            callback()
            return lambda: None
        self._callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove

    def _fire(self, by: str, reason: str) -> None:
        if not self._event.is_set():
            self.reason, self.cancelled_by = reason, by
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                try:
                    callback()
                except Exception:
                    # One faulty callback must not stop the cancel reaching the others.
                    log.exception("cancel callback of %s failed", self.id)


class CancelRegistry:
    """Receives cancels for the tokens of this process. One pub/sub connection.

    >>> registry = CancelRegistry(redis, Keys("acme"), poll_interval=2.0)
    >>> await registry.start()
    >>> root = await registry.token(request_id)
    >>> await registry.close()
    """

    def __init__(self, redis: Redis, keys: Keys, *, poll_interval: float = 2.0) -> None:
        self.redis = redis
        self.keys = keys
        self.poll_interval = poll_interval
        self._index: dict[str, set[CancelToken]] = {}
        # Ids known to be cancelled while some live token carries them, so a
        # child registered later below a locally cancelled token (no
        # tombstone, or an expired one) starts cancelled too. Entries go with
        # the last token that carries the id, so this stays bounded.
        self._cancelled: dict[str, tuple[str, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe to cancel nudges and start polling; returns once subscribed."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="relay-cancel-registry")
        await asyncio.wait_for(self._subscribed.wait(), 10)

    async def close(self) -> None:
        """Stop listening and polling."""
        task, self._task = self._task, None
        if task is None:
            return
        # One cancel is not always enough on Python 3.11 (see stop_task).
        exc = await stop_task(task)
        if exc is not None:
            log.warning("cancel listener ended with %r", exc)

    async def token(
        self, target_id: str, *, lineage: Sequence[str] = (), parent: CancelToken | None = None
    ) -> CancelToken:
        """Register a token for ``target_id`` below ``lineage`` (or ``parent``'s lineage).

        A request's root token is ``token(request_id)``. Checks the tombstones
        of the whole lineage, so a cancel that came first is honoured now.
        """
        base = parent.lineage if parent is not None else tuple(str(x) for x in lineage)
        tok = CancelToken(self, (*base, str(target_id)))
        # Index first, then read the tombstones: a cancel written between the
        # two is caught by the nudge, one written before by the read.
        for ident in tok.lineage:
            self._index.setdefault(ident, set()).add(tok)
        for ident in tok.lineage:
            if (known := self._cancelled.get(ident)) is not None:
                tok._fire(known[0], known[1])
                break
        try:
            await self._check(tok.lineage)
        except BaseException:
            # The caller never gets this token, so nobody could release it.
            self._unregister(tok)
            raise
        return tok

    def _unregister(self, tok: CancelToken) -> None:
        for ident in tok.lineage:
            holders = self._index.get(ident)
            if holders is not None:
                holders.discard(tok)
                if not holders:
                    del self._index[ident]
                    self._cancelled.pop(ident, None)

    def _trigger(self, target_id: str, reason: str, by: str | None = None) -> None:
        holders = self._index.get(target_id)
        if not holders:
            return
        self._cancelled[target_id] = (by or target_id, reason)
        for tok in list(holders):
            tok._fire(by or target_id, reason)

    async def _check(self, ids: Iterable[str]) -> None:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return
        # One GET per id in a pipeline (not MGET): tombstones live in
        # different cluster slots.
        pipe = self.redis.pipeline(transaction=False)
        for ident in wanted:
            pipe.get(self.keys.cancel(ident))
        for ident, raw in zip(wanted, await pipe.execute(), strict=True):
            if raw is not None:
                self._trigger(ident, json.loads(raw).get("reason", "cancelled"))

    async def _supervise(self) -> None:
        delay = 0.05
        while True:
            pubsub: Any = None
            node: Redis | None = None
            try:
                # On a cluster: SSUBSCRIBE on the channel's owner, found anew
                # on every connect (a failover or resharding moves it).
                pubsub, node = await redisconn.shard_pubsub(self.redis, self.keys.cancel_channel)
                # Anything published while we were away is in the tombstones.
                await self._check(self._index)
                self._subscribed.set()
                delay = 0.05
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cancel listener lost its connection: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        await pubsub.aclose()
                    if node is not None:
                        await node.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _listen(self, pubsub: Any) -> None:
        next_poll = time.monotonic() + self.poll_interval
        while True:
            timeout = max(0.0, next_poll - time.monotonic())
            message = await pubsub.get_message(timeout=timeout)
            kind = message["type"] if message is not None else None
            if kind in ("sunsubscribe", "unsubscribe"):
                # Not asked for: the channel's slot moved to another node.
                raise ConnectionError(f"{self.keys.cancel_channel} was unsubscribed by the server")
            if message is not None and kind in ("message", "smessage"):
                try:
                    data = json.loads(message["data"])
                    self._trigger(str(data["target_id"]), str(data.get("reason", "cancelled")))
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring malformed cancel message %r", message["data"])
            if time.monotonic() >= next_poll:
                await self._check(self._index)
                next_poll = time.monotonic() + self.poll_interval
                if not await redisconn.still_on_master(self.redis, pubsub.connection):
                    # A Sentinel failover left this connection on the old
                    # master: listen on the new one (the tombstones cover the move).
                    raise ConnectionError("the master moved (Sentinel failover)")
