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
        """Parse and execute a command given as a dict (the REST routes)."""
        command = parse_command(json.dumps(raw))
        reply = await self.execute(command)
        if command.command_id is not None:
            reply["command_id"] = command.command_id
        return reply

    async def execute(self, command: Command) -> dict[str, Any]:
        """Execute one command; returns the ack frame or raises :class:`CommandError`."""
        try:
            if isinstance(command, CancelAgent):
                target = str(command.agent_id)
                existed = await request_cancel(
                    self.redis,
                    self.keys,
                    target,
                    ttl=self.config.cancel.tombstone_ttl_seconds,
                )
                return {
                    "type": "ack",
                    "command": "cancel_agent",
                    "agent_id": target,
                    "already_cancelled": existed,
                }
            if isinstance(command, BudgetContinue | BudgetStop):
                decision: Decision = "continue" if isinstance(command, BudgetContinue) else "stop"
                rid = str(command.request_id)
                try:
                    pause = await answer_budget(self.redis, self.keys, rid, decision)
                except NoPendingDecision:
                    raise CommandError(
                        "no_pending_decision",
                        f"no budget decision is pending for request {rid}",
                    ) from None
                return {
                    "type": "ack",
                    "command": command.type,
                    "request_id": rid,
                    "decision": decision,
                    "pause_id": pause.get("pause_id"),
                }
        except RedisError as exc:
            log.warning("%s failed: %s", command.type, exc)
            raise CommandError("unavailable", f"Redis is unavailable: {exc}") from None
        raise CommandError("unknown_type", f"command {command.type!r} is not handled here")
