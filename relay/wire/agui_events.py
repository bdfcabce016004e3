"""The AG-UI vocabulary relay speaks: event builder, stable ids, the interrupt's schema.

Ids derive from relay's ids, so every gateway and every run names the same
thing the same way (a resumed run continues the client's messages).

>>> event("TEXT_MESSAGE_END", messageId=message_id("a1"), subagentRunId=None)
{'type': 'TEXT_MESSAGE_END', 'messageId': 'msg-a1'}
"""

from __future__ import annotations

from relay.wire.agui_state import Json

Event = dict[str, Json]

TERMINAL = frozenset({"completed", "failed", "cancelled"})
INTERRUPT_REASON = "relay:budget_pause"
"""A namespaced custom reason (the spec reserves bare and ``core:`` reasons)."""
DECISION_SCHEMA: dict[str, Json] = {
    "type": "object",
    "properties": {"decision": {"type": "string", "enum": ["continue", "stop"]}},
    "required": ["decision"],
}
SPAWN_TOOL = "spawn_agent"


def message_id(agent_id: str) -> str:
    """The AG-UI message id of an agent's text (stable across runs and gateways)."""
    return f"msg-{agent_id}"


def spawn_call_id(agent_id: str) -> str:
    """The id of the ``spawn_agent`` tool call that started sub-agent ``agent_id``."""
    return f"spawn-{agent_id}"


def result_message_id(agent_id: str) -> str:
    """The id of the tool message that carries sub-agent ``agent_id``'s result."""
    return f"result-{agent_id}"


def compact(**fields: Json) -> dict[str, Json]:
    """``fields`` without the None values."""
    return {k: v for k, v in fields.items() if v is not None}


def event(kind: str, **fields: Json) -> Event:
    """An AG-UI event; optional fields that are None are left out (never ``null``)."""
    return {"type": kind, **compact(**fields)}
