"""JSON Schemas of every frame relay sends or accepts (``relay schema``)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from relay.wire.commands import Command
from relay.wire.events import AgentEvent, EventFrame

# Replies and notices the gateway sends besides event frames.
SERVER_FRAMES: dict[str, dict[str, Any]] = {
    "pong": {"required": ["type"], "properties": {"command_id": {}}},
    "subscribed": {
        "required": ["type", "request_id", "epoch", "seq"],
        "properties": {
            "request_id": {"type": "string", "format": "uuid"},
            "epoch": {"type": ["string", "null"]},
            "seq": {"type": "integer", "minimum": 0},
        },
    },
    "unsubscribed": {"required": ["type", "request_id"], "properties": {}},
    "workflow_subscribed": {"required": ["type", "run_id"], "properties": {}},
    "workflow_unsubscribed": {"required": ["type", "run_id"], "properties": {}},
    "ack": {"required": ["type", "command"], "properties": {"command": {"type": "string"}}},
    "error": {
        "required": ["type", "code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    },
    "lagged": {
        "required": ["type", "request_id", "skipped"],
        "properties": {"skipped": {"type": "integer", "minimum": 1}},
    },
    "resync_required": {
        "required": ["type", "request_id", "epoch", "reason"],
        "properties": {
            "reason": {
                "enum": [
                    "epoch_changed",
                    "history_trimmed",
                    "history_unavailable",
                    "ahead_of_stream",
                ],
            },
            "first_available_seq": {"type": ["integer", "null"]},
            "last_seq": {"type": "integer"},
        },
    },
    "snapshot": {
        "required": [
            "type",
            "request_id",
            "epoch",
            "seq",
            "agents",
            "budget",
            "pending_decision",
            "outcome",
        ],
        "properties": {
            "agents": {"type": "array"},
            # Compact catch-up (relay): each agent's text so far, as of text_seq.
            "texts": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["text", "truncated", "bytes"],
                    "properties": {
                        "text": {"type": "string"},
                        "truncated": {"type": "boolean"},
                        "bytes": {"type": "integer", "minimum": 0},
                    },
                },
            },
            "text_seq": {"type": "integer", "minimum": 0},
        },
    },
    "budget_pending": {
        "required": [
            "type",
            "request_id",
            "pause_id",
            "tokens_used",
            "budget_total",
            "deadline_ts",
        ],
        "properties": {},
    },
}


def _server_frame_schema(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    props = {"type": {"const": name}, **spec["properties"]}
    return {"title": name, "type": "object", "required": spec["required"], "properties": props}


def frame_schemas() -> dict[str, Any]:
    """A JSON document with the schema of every event frame, command and reply."""
    return {
        "event": TypeAdapter(AgentEvent).json_schema(),
        "event_frame_envelope": EventFrame.model_json_schema(),
        "command": TypeAdapter(Command).json_schema(),
        "server_frames": {n: _server_frame_schema(n, s) for n, s in SERVER_FRAMES.items()},
    }


def schema_text() -> str:
    """:func:`frame_schemas` as ``relay schema`` prints it (docs/schema/events.json)."""
    return json.dumps(frame_schemas(), indent=2) + "\n"
