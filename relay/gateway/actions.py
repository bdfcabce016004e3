"""Commands that change durable state: cancels and budget answers.

Shared by the WebSocket and the REST routes, so both answer the same way.
The gateway keeps no cancel or decision state of its own: everything is
written to Redis, and the reply is sent only once Redis has it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..budget import Decision, NoPendingDecision, answer_budget
from ..cancel import request_cancel
from ..commands import (
    BudgetContinue,
    BudgetStop,
    CancelAgent,
    Command,
    CommandError,
    parse_command,
)
from ..config import GlobalConfig
from ..keys import Keys
from .metrics import Metrics

log = logging.getLogger(__name__)


class Actions:
    """Executes cancel and budget commands against Redis."""

    def __init__(self, config: GlobalConfig, redis: Redis, metrics: Metrics) -> None:
        self.config = config
        self.redis = redis
        self.metrics = metrics
        self.keys = Keys(config.redis.tenant)

    async def execute_raw(self, raw: dict[str, Any]) -> dict[str, Any]:
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
            reply = await self.execute(command)
        except CommandError as exc:
            self.metrics.commands.labels(type=command.type, outcome=exc.code).inc()
            raise
        self.metrics.commands.labels(type=command.type, outcome="ok").inc()
        if command.command_id is not None:
            reply["command_id"] = command.command_id
        return reply

    async def execute(self, command: Command) -> dict[str, Any]:
        """Execute one command; returns the ack frame or raises :class:`CommandError`."""
        try:
            if isinstance(command, CancelAgent):
                return await self._cancel(command)
            if isinstance(command, BudgetContinue | BudgetStop):
                return await self._answer(command)
        except RedisError as exc:
            log.warning("%s failed: %s", command.type, exc, extra={"command": command.type})
            raise CommandError("unavailable", "Redis is unavailable; try again shortly") from None
        raise CommandError("unknown_type", f"command {command.type!r} is not handled here")

    async def _cancel(self, command: CancelAgent) -> dict[str, Any]:
        target = str(command.agent_id)
        existed = await request_cancel(
            self.redis,
            self.keys,
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

    async def _answer(self, command: BudgetContinue | BudgetStop) -> dict[str, Any]:
        decision: Decision = "continue" if isinstance(command, BudgetContinue) else "stop"
        rid = str(command.request_id)
        try:
            pause = await answer_budget(self.redis, self.keys, rid, decision, command.pause_id)
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
