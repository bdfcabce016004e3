"""Orchestrator liveness: one lease in Redis, renewed in the background, covers every request.

While a request runs, its orchestrator *holds* it (:meth:`LeaseKeeper.hold`):
the request's lease hash names the orchestrator, and the orchestrator's id is
in the tenant's lease index with a deadline on the Redis clock. A background
task renews that one deadline every ``lease.renew_interval`` seconds
(``lua/lease_renew.lua``), so one round trip keeps all of the process's
requests alive, however many it runs.

When the deadline passes (the process was killed, its host lost, the network
cut) a gateway's reaper (relay/gateway/reaper.py) declares the orchestrator
lost (``lua/lease_due.lua``, in the same slot as the renewal, so the two never
interleave) and finishes each of its requests for every viewer. An
orchestrator that comes back afterwards is refused: its renewal, its next
:meth:`hold` and, through :class:`~relay.orchestrator.client.RelayClient`, its
next publish raise :class:`OrchestratorLost` instead of resurrecting a request
everybody saw end. One that comes back *before* the deadline (a long GC
pause, a short partition) renews and is never declared lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from types import TracebackType
from typing import Any, Self

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from relay.aio import stop_task
from relay.config import LeaseConfig
from relay.orchestrator.client import OrchestratorLost, is_lost_refusal
from relay.wire.keys import Keys
from relay.wire.scripts import LuaScript, is_noscript, script

log = logging.getLogger(__name__)

__all__ = ["LeaseKeeper", "OrchestratorLost"]


class LeaseKeeper:
    """The lease of one orchestrator process: hold requests, renew in the background.

    It satisfies the hook the request contexts of the SDK call
    (``await hold(request_id)`` when a request starts, ``await release(request_id)``
    when it ends), and :class:`~relay.orchestrator.client.RelayClient` owns one
    when given ``lease=`` (then its publishes are refused once the
    orchestrator was declared lost).

    >>> async with LeaseKeeper(redis, Keys("acme"), config.lease) as lease:
    ...     await lease.hold(request_id)      # renewed every lease.renew_interval
    ...     ...                               # publish the request's events
    ...     await lease.release(request_id)
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: LeaseConfig | None = None,
        *,
        state_ttl_seconds: int = 7 * 24 * 3600,
        orchestrator_id: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config or LeaseConfig()
        self.state_ttl_seconds = state_ttl_seconds
        self.orchestrator_id = orchestrator_id or uuid.uuid4().hex
        """This process's id in the lease index (a random one unless given)."""
        self.renewals = 0
        """Renewal round trips so far (one per interval, whatever the number of requests)."""
        self.deadline_ms: int | None = None
        """The deadline (Redis clock, ms) the last renewal set."""
        self._held: set[str] = set()
        self._lost: OrchestratorLost | None = None
        self._lost_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._renew = script("lease_renew")
        self._request = script("lease_request")

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Take the lease (one renewal) and start renewing it in the background.

        Raises :class:`OrchestratorLost` when this orchestrator id was declared
        lost; Redis errors propagate (nothing is started then).
        """
        if self._closed:
            raise RuntimeError("LeaseKeeper: closed")
        if self._task is None:
            await self.renew()
            self._task = asyncio.create_task(self._run(), name=f"lease-{self.orchestrator_id}")

    async def close(self) -> None:
        """Stop renewing; release every request still held and drop the lease.

        Dropping it means a gateway will never declare this orchestrator lost.
        Redis errors are logged, not raised: a lease left behind expires and its
        requests are finished by a gateway, which is the right outcome for
        requests nobody releases.
        """
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            exc = await stop_task(self._task)
            if exc is not None:
                log.error("lease renewal task failed: %r", exc)
        try:
            for rid in sorted(self._held):
                await self.release(rid)
            if self._lost is None:
                await self.redis.zrem(self.keys.leases, self.orchestrator_id)
        except RedisError as exc:
            log.warning("lease of orchestrator %s not dropped: %s", self.orchestrator_id, exc)

    # ------------------------------------------------------------------ state

    @property
    def lost(self) -> bool:
        """True once this orchestrator learnt it was declared lost (it stays lost)."""
        return self._lost is not None

    @property
    def held(self) -> frozenset[str]:
        """The request ids held now."""
        return frozenset(self._held)

    def check(self) -> None:
        """Raise :class:`OrchestratorLost` if this orchestrator was declared lost."""
        if self._lost is not None:
            raise OrchestratorLost(str(self._lost))

    async def wait_lost(self) -> OrchestratorLost:
        """Wait until this orchestrator learns it was declared lost; returns the error."""
        await self._lost_event.wait()
        assert self._lost is not None
        return self._lost

    def mark_lost(self, message: str) -> OrchestratorLost:
        """Record that Redis refused this orchestrator as lost; returns the error to raise."""
        if self._lost is None:
            self._lost = OrchestratorLost(message)
            self._lost_event.set()
            log.error(
                "orchestrator %s was declared lost: %s",
                self.orchestrator_id,
                message,
                extra={"orchestrator_id": self.orchestrator_id},
            )
        return OrchestratorLost(str(self._lost))

    # ------------------------------------------------------------------ hook

    async def hold(self, request_id: str) -> None:
        """Hold ``request_id`` under this orchestrator's lease (renewing the lease too).

        Starts the renewal task if :meth:`start` was not called. Raises
        :class:`OrchestratorLost` when this orchestrator was declared lost, or
        when the request itself was (it was finished for every viewer and
        stays finished).
        """
        self.check()
        if self._task is None:
            await self.start()
        rid = str(uuid.UUID(str(request_id)))
        rk = self.keys.request(rid)
        members = self.keys.orchestrator_requests(self.orchestrator_id)
        ttl = self.state_ttl_seconds

        def build(pipe: Any) -> None:
            # One round trip: the renewal first, so an orchestrator declared
            # lost learns it before it counts on the request.
            self._renew.queue(pipe, self._lease_keys, self._renew_args)
            self._request.queue(pipe, [rk.lease], ["hold", self.orchestrator_id, ttl])
            pipe.sadd(members, rid)
            pipe.expire(members, ttl)

        renewed, held, *rest = await self._pipeline(build, (self._renew, self._request))
        failure: BaseException | None = None
        if isinstance(renewed, ResponseError) and is_lost_refusal(renewed):
            failure = self.mark_lost(str(renewed))
        elif isinstance(held, ResponseError) and is_lost_refusal(held):
            failure = OrchestratorLost(f"request {rid}: {held}")
        else:
            failure = next(
                (r for r in (renewed, held, *rest) if isinstance(r, BaseException)), None
            )
        if failure is not None:
            # Best effort: a mark left behind only makes a gateway look at
            # the request once and find nothing held.
            with contextlib.suppress(RedisError):
                await self._undo(rid)
            raise failure
        self._held.add(rid)
        self._renewed(renewed)

    async def release(self, request_id: str) -> None:
        """Give ``request_id`` back: it ended (or will be finished by someone else).

        Never raises :class:`OrchestratorLost`: releasing a request a gateway
        already finished is harmless (its marks are kept).
        """
        rid = str(uuid.UUID(str(request_id)))
        self._held.discard(rid)
        await self._undo(rid)

    async def _undo(self, rid: str) -> None:
        rk = self.keys.request(rid)
        members = self.keys.orchestrator_requests(self.orchestrator_id)

        def build(pipe: Any) -> None:
            self._request.queue(
                pipe, [rk.lease], ["release", self.orchestrator_id, self.state_ttl_seconds]
            )
            pipe.srem(members, rid)

        released, _ = await self._pipeline(build, (self._request,))
        if isinstance(released, BaseException):
            raise released

    # ------------------------------------------------------------------ renewal

    @property
    def _lease_keys(self) -> list[str]:
        return [self.keys.leases, self.keys.leases_lost]

    @property
    def _renew_args(self) -> list[Any]:
        return [self.orchestrator_id, int(self.config.ttl_seconds * 1000)]

    async def renew(self) -> None:
        """Renew the lease now (the background task does this every interval)."""
        self.check()
        try:
            result = await self._renew(self.redis, self._lease_keys, self._renew_args)
        except ResponseError as exc:
            if is_lost_refusal(exc):
                raise self.mark_lost(str(exc)) from exc
            raise
        self._renewed(result)

    def _renewed(self, result: Any) -> None:
        self.renewals += 1
        self.deadline_ms = int(result[1])

    async def _run(self) -> None:
        interval = self.config.renew_interval
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            try:
                await self.renew()
            except OrchestratorLost:
                return  # stays lost: nothing to renew any more
            except (RedisError, OSError) as exc:
                # Keep trying: a renewal that lands before the deadline keeps
                # every request alive; only the Redis clock decides expiry.
                log.warning(
                    "lease renewal of orchestrator %s failed: %s",
                    self.orchestrator_id,
                    exc,
                    extra={"orchestrator_id": self.orchestrator_id},
                )
            # A slow round trip eats into the next wait, so renewals stay
            # one interval apart rather than drifting later each time.
            interval = max(0.0, self.config.renew_interval - (time.monotonic() - started))
            if interval == 0.0:
                interval = self.config.renew_interval / 10

    async def _pipeline(self, build: Any, scripts: tuple[LuaScript, ...]) -> list[Any]:
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            build(pipe)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if not any(is_noscript(r) for r in results):
                return results
            for s in scripts:
                await s.load(self.redis)
        raise RedisError("lease scripts could not be loaded")  # pragma: no cover
