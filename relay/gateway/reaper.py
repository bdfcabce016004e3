"""The reaper: finishes the requests of orchestrators whose lease expired.

Every ``lease.reap_interval`` seconds each gateway (with ``lease.reaper``)
asks Redis which orchestrators' leases passed their deadline
(``lua/lease_due.lua``: it declares them lost in the slot their renewals use,
so an orchestrator that renewed in time is never among them). For each
request such an orchestrator held, ``lua/lease_fence.lua`` lets exactly one
gateway claim it; from then on the publish script refuses the lost
orchestrator's publishes. The winner then, through the normal publish path:

- closes a pending budget pause (``lua/budget_timeout.lua``: a decision a
  client recorded meanwhile is kept) and publishes its ``budget_decision``;
- publishes ``agent_failed`` (``will_retry: false``, an error saying the
  orchestrator was lost) for every agent the snapshot shows running, deepest
  first, so the root's comes last and becomes the request's outcome;
- marks the snapshot's outcome ``reason: "orchestrator_lost"``
  (``lua/lease_finish.lua``).

Every viewer on every gateway sees those events once, like any others. A
gateway that dies between claim and publish is replaced after
``lease.takeover_seconds``; the replacement publishes with the same publish
id, so the events are never written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import uuid
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError

from relay.aio import stop_task
from relay.config import GlobalConfig
from relay.gateway.metrics import Metrics
from relay.logs import LogOnce
from relay.orchestrator.budget import DECISION_LIST_TTL
from relay.orchestrator.client import PublishError, RelayClient
from relay.wire.events import AgentEvent, AgentFailed, BudgetDecision
from relay.wire.scripts import as_text, script

log = logging.getLogger(__name__)

DUE_BATCH = 100
"""Most expired orchestrators handled per tenant and scan (the rest: next scan)."""
FINISH_CONCURRENCY = 16
"""Requests of one lost orchestrator finished at once."""


def _not_permitted(exc: BaseException) -> bool:
    """An ACL refusal: of a command (NOPERM) or of a command inside a script."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, NoPermissionError) or "can't run this command" in str(seen):
            return True
        seen = seen.__cause__
    return False


class Claim(enum.Enum):
    """What :meth:`Reaper._finish` did with one request of a lost orchestrator."""

    WON = "won"
    """This gateway finished it."""
    BUSY = "busy"
    """Another gateway claimed it and has not finished yet."""
    NOTHING = "nothing"
    """Nothing to do: released, finished already, or not a request."""


class Reaper:
    """A gateway's reaper task, owned by the app's lifespan.

    >>> reaper = Reaper(config, redis, metrics)
    >>> await reaper.start()          # scans every lease.reap_interval
    >>> await reaper.close()
    """

    def __init__(
        self,
        config: GlobalConfig,
        redis: Redis,
        metrics: Metrics,
        *,
        owns_redis: bool = False,
        gateway_id: str | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.metrics = metrics
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        self._owns = owns_redis
        tenants = dict.fromkeys([config.redis.tenant, *config.redis.tenants])
        self._clients = {
            tenant: RelayClient(
                redis,
                tenant=tenant,
                history=config.history,
                publish_retry_seconds=config.redis.publish_retry_seconds,
                owns_connection=False,
            )
            for tenant in tenants
        }
        self._task: asyncio.Task[None] | None = None
        self._log_once = LogOnce(log)

    @property
    def tenants(self) -> list[str]:
        """The tenants this reaper scans: ``redis.tenant`` and ``redis.tenants``."""
        return list(self._clients)

    async def start(self) -> None:
        """Start scanning in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lease-reaper")

    async def close(self) -> None:
        """Stop scanning (a request half finished is taken over by another gateway)."""
        if self._task is not None:
            exc = await stop_task(self._task)
            self._task = None
            if exc is not None:
                log.error("lease reaper failed: %r", exc)
        if self._owns:
            await self.redis.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.reap_once()
            except (RedisError, OSError, PublishError) as exc:
                # Redis away or refusing: the next scan tries again; the
                # leases stay in Redis, so nothing is forgotten meanwhile.
                if _not_permitted(exc):
                    self._log_once(
                        "noperm",
                        "lease reaper: Redis refused a command (%s): give the reaper a user "
                        "of the reaper role (lease.reaper_redis_url, deploy/redis-acl/) or "
                        "set lease.reaper = false on this gateway",
                        exc,
                    )
                else:
                    self._log_once(type(exc).__name__, "lease reaper: %s", exc)
            except Exception as exc:
                # A bug must not end liveness for the gateway's whole life:
                # logged once per kind, retried next scan (CancelledError is
                # not an Exception: it ends the loop).
                self._log_once(f"bug:{type(exc).__name__}", "lease reaper failed", exc=exc)
            await asyncio.sleep(self.config.lease.reap_interval)

    async def reap_once(self) -> int:
        """One scan of every tenant; returns how many requests this gateway finished."""
        finished = 0
        for client in self._clients.values():
            finished += await self._reap_tenant(client)
        return finished

    async def _reap_tenant(self, client: RelayClient) -> int:
        keys = client.keys
        due = await script("lease_due")(
            self.redis,
            [keys.leases, keys.leases_lost],
            [DUE_BATCH, self.config.lease.lost_keep_seconds * 1000],
        )
        finished = 0
        for i in range(1, len(due), 2):
            orchestrator, new = as_text(due[i]), int(due[i + 1])
            if new:
                self.metrics.orchestrators_lost.inc()
                log.warning(
                    "orchestrator %s declared lost: its lease expired",
                    orchestrator,
                    extra={"orchestrator_id": orchestrator, "tenant": keys.tenant},
                )
            finished += await self._reap_orchestrator(client, orchestrator)
        return finished

    async def _reap_orchestrator(self, client: RelayClient, orchestrator: str) -> int:
        keys = client.keys
        members_key = keys.orchestrator_requests(orchestrator)
        members = sorted(as_text(m) for m in await self.redis.smembers(members_key))
        finished = 0
        # A few requests at a time: an orchestrator with many requests ends
        # them all within the bound, without a burst of unbounded tasks.
        for start in range(0, len(members), FINISH_CONCURRENCY):
            batch = members[start : start + FINISH_CONCURRENCY]
            results = await asyncio.gather(
                *(self._finish(client, orchestrator, rid) for rid in batch),
                return_exceptions=True,  # every one finishes before this returns
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            finished += sum(r is Claim.WON for r in results)
            # BUSY (another gateway is on it) and failed ones stay in the set,
            # to be looked at again next scan.
            done = [
                rid
                for rid, r in zip(batch, results, strict=True)
                if r in (Claim.WON, Claim.NOTHING)
            ]
            if done:
                await self.redis.srem(members_key, *done)
            if errors:
                raise errors[0]
        if await self.redis.scard(members_key) == 0:
            # Only now is the orchestrator out of the index: a gateway that
            # stopped half way left it there for the next scan to continue.
            # Its declaration of loss stays (renewals remain refused).
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(keys.leases, orchestrator)
            pipe.delete(members_key)
            await pipe.execute()
        return finished

    async def _finish(self, client: RelayClient, orchestrator: str, rid: str) -> Claim:
        """Claim ``rid`` and publish its terminal events (:attr:`Claim.WON`)."""
        try:
            rid = str(uuid.UUID(rid))
        except ValueError:
            return Claim.NOTHING  # not a request id: nothing relay could have published to
        lease = self.config.lease
        rk = client.keys.request(rid)
        claim = await script("lease_fence")(
            self.redis,
            [rk.lease, rk.state, rk.pending],
            [orchestrator, int(lease.takeover_seconds * 1000), self.gateway_id],
        )
        if int(claim[0]) != 1:
            return Claim.BUSY if int(claim[0]) == 2 else Claim.NOTHING
        try:
            await self._end(client, rid, claim)
        except Exception:
            # Give the claim up at once rather than after takeover_seconds:
            # the next scan (here or elsewhere) retakes it, and publishes with
            # the same publish id, so events that did land are not repeated.
            with contextlib.suppress(RedisError):
                await self.redis.hset(rk.lease, "claim_ts", 0)
            raise
        return Claim.WON

    async def _end(self, client: RelayClient, rid: str, claim: list[Any]) -> None:
        """Publish the end of a claimed request (``claim``: the reply of lease_fence.lua)."""
        lease = self.config.lease
        rk = client.keys.request(rid)
        retry = bool(int(claim[1]))
        lost_orchestrator = as_text(claim[2])
        pending = as_text(claim[4])
        agents = [json.loads(as_text(raw)) for raw in claim[5:]]
        events: list[AgentEvent] = []
        if pending:
            events.extend(await self._close_pause(client, rid, pending))
        error = (
            f"orchestrator lost: orchestrator {lost_orchestrator} stopped renewing its lease "
            f"(ttl {lease.ttl_seconds:g} s); the agent was ended by a gateway"
        )
        # Deepest first: children end before their parents, and the root's
        # agent_failed, last, is what the publish script makes the outcome.
        agents.sort(key=lambda a: (-int(a.get("depth") or 0), -int(a.get("spawned_seq") or 0)))
        for agent in agents:
            try:
                events.append(
                    AgentFailed(
                        agent_id=uuid.UUID(agent["agent_id"]), error=error, will_retry=False
                    )
                )
            except (KeyError, ValueError, TypeError, ValidationError):
                log.warning("request %s: agent %r has no valid id; skipped", rid, agent)
        first_seq = 0
        if events:
            # The claim is exactly-once; the same publish id makes a takeover
            # after a gateway died half way exactly-once too.
            published = await client.publish_once(
                rid,
                events,
                publish_id=f"lease-lost-{lost_orchestrator}",
                window_seconds=2 * lease.takeover_seconds + 60 if retry else 0,
            )
            first_seq = published.first_seq
        await script("lease_finish")(
            self.redis, [rk.lease, rk.state], [first_seq, self.config.history.state_ttl_seconds]
        )
        self.metrics.requests_lost.inc()
        log.warning(
            "request %s finished for its viewers: orchestrator %s lost (%d agents failed)",
            rid,
            lost_orchestrator,
            len(agents),
            extra={"request_id": rid, "orchestrator_id": lost_orchestrator},
        )

    async def _close_pause(
        self, client: RelayClient, rid: str, pending: str
    ) -> list[BudgetDecision]:
        """Close the request's open budget pause; the ``budget_decision`` to publish.

        ``budget_timeout.lua`` closes it with its ``timeout_decision`` unless a
        client answered first: an answer recorded while the orchestrator was
        down is kept, and is what the event says.
        """
        try:
            pause: dict[str, Any] = json.loads(pending)
            pause_id = str(pause["pause_id"])
        except (ValueError, KeyError, TypeError):
            return []
        default = "continue" if pause.get("timeout_decision") == "continue" else "stop"
        rk = client.keys.request(rid)
        by, decision = (
            as_text(v)
            for v in await script("budget_timeout")(
                self.redis,
                [rk.pending, rk.decision, rk.decided],
                [pause_id, default, DECISION_LIST_TTL],
            )
        )
        return [
            BudgetDecision(
                request_id=uuid.UUID(rid),
                decision="continue" if decision == "continue" else "stop",
                decided_by="client" if by == "client" else "timeout",
            )
        ]
