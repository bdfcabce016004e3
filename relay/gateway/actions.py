"""Commands that change durable state: cancels and budget answers.

Shared by the WebSocket and the REST routes, so both answer (and authorize)
the same way. Every command acts in its principal's tenant only, and only
with the capability it needs (:func:`relay.gateway.auth.required_cap`).

A cancel names an agent id, and which request an agent belongs to is not
part of the command. A token scoped to ``requests`` may cancel a request id
it holds, or an agent that one of its requests' state (``relay:T:req:{R}:state``,
one hash field per agent, written by the publish script) knows: one HEXISTS
per request in the scope, at most :data:`relay.gateway.auth.MAX_TOKEN_REQUESTS`. An
agent whose ``agent_spawned`` was not published yet cannot be cancelled
with a scoped token; a tenant-wide token (no ``requests`` claim) may cancel
any id of its tenant.
The gateway keeps no cancel or decision state of its own: everything is
written to Redis, and the reply is sent only once Redis has it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.config import GlobalConfig
from relay.gateway.auth import Principal, anonymous_principal
from relay.gateway.metrics import Metrics
from relay.orchestrator.cancel import request_cancel
from relay.wire.answers import Decision, NoPendingDecision, answer_budget
from relay.wire.commands import (
    BudgetContinue,
    BudgetStop,
    CancelAgent,
    Command,
    CommandError,
    parse_command,
)
from relay.wire.keys import Keys

log = logging.getLogger(__name__)


class Actions:
    """Executes cancel and budget commands against Redis."""

    def __init__(self, config: GlobalConfig, redis: Redis, metrics: Metrics) -> None:
        self.config = config
        self.redis = redis
        self.metrics = metrics
        self._default = anonymous_principal(config)

    async def execute_raw(
        self, raw: dict[str, Any], principal: Principal | None = None
    ) -> dict[str, Any]:
        """Parse and execute a command given as a dict (the REST routes).

        Counted in ``relay_commands`` like WebSocket commands (which the
        connection counts itself, parse failures included).
        """
        try:
            command = parse_command(json.dumps(raw))
        except CommandError as exc:
            self.metrics.commands.labels(type="invalid", outcome=exc.code).inc()
            raise
        try:
            reply = await self.execute(command, principal)
        except CommandError as exc:
            self.metrics.commands.labels(type=command.type, outcome=exc.code).inc()
            raise
        self.metrics.commands.labels(type=command.type, outcome="ok").inc()
        if command.command_id is not None:
            reply["command_id"] = command.command_id
        return reply

    async def execute(self, command: Command, principal: Principal | None = None) -> dict[str, Any]:
        """Authorize and execute one command for ``principal`` (default: auth off).

        Returns the ack frame or raises :class:`CommandError` (``forbidden``
        when the token does not allow it).
        """
        who = principal or self._default
        keys = Keys(who.tenant)
        try:
            if isinstance(command, CancelAgent):
                await self._authorize_cancel(who, keys, str(command.agent_id))
                return await self._cancel(command, keys)
            if isinstance(command, BudgetContinue | BudgetStop):
                who.require("decide", str(command.request_id))
                return await self._answer(command, keys)
        except RedisError as exc:
            log.warning("%s failed: %s", command.type, exc, extra={"command": command.type})
            raise CommandError("unavailable", "Redis is unavailable; try again shortly") from None
        raise CommandError("unknown_type", f"command {command.type!r} is not handled here")

    async def _authorize_cancel(self, who: Principal, keys: Keys, target: str) -> None:
        who.require("cancel")
        if who.requests is None or target in who.requests:
            return
        pipe = self.redis.pipeline(transaction=False)
        for rid in sorted(who.requests):
            # One hash field per agent, "a:<agent_id>" (see relay/wire/lua/publish.lua).
            pipe.hexists(keys.request(rid).state, f"a:{target}")
        if not any(await pipe.execute()):
            raise CommandError("forbidden", f"the token does not cover agent {target}")

    async def _cancel(self, command: CancelAgent, keys: Keys) -> dict[str, Any]:
        target = str(command.agent_id)
        existed = await request_cancel(
            self.redis,
            keys,
            target,
            reason=command.reason,
            ttl=self.config.cancel.tombstone_ttl_seconds,
        )
        log.info("cancel recorded", extra={"agent_id": target, "command": command.type})
        return {
            "type": "ack",
            "command": "cancel_agent",
            "agent_id": target,
            "already_cancelled": existed,
        }

    async def _answer(self, command: BudgetContinue | BudgetStop, keys: Keys) -> dict[str, Any]:
        decision: Decision = "continue" if isinstance(command, BudgetContinue) else "stop"
        rid = str(command.request_id)
        try:
            pause = await answer_budget(self.redis, keys, rid, decision, command.pause_id)
        except NoPendingDecision:
            which = f"pause {command.pause_id}" if command.pause_id else "budget decision"
            raise CommandError(
                "no_pending_decision", f"no {which} is pending for request {rid}"
            ) from None
        log.info("budget %s recorded", decision, extra={"request_id": rid, "command": command.type})
        return {
            "type": "ack",
            "command": command.type,
            "request_id": rid,
            "decision": decision,
            "pause_id": pause.get("pause_id"),
        }
