"""What an AG-UI client does with relay's events, for the tests: verify, apply, collect.

``verify`` checks each event against the official models (the
``ag-ui-protocol`` package) and the rules of the official client's
``verifyEvents`` a relay stream could break; ``apply`` is the client's state
handling (``STATE_SNAPSHOT`` replaces, ``STATE_DELTA`` patches);
``client_messages`` the message list it builds, metadata merged.
"""

from __future__ import annotations

import copy
from typing import Any

from ag_ui.core import Event as AguiEvent
from pydantic import TypeAdapter

ADAPTER: TypeAdapter[Any] = TypeAdapter(AguiEvent)


def verify(events: list[dict[str, Any]]) -> None:
    """The official client's verifyEvents rules that a relay stream can break."""
    started = finished = False
    texts: set[str] = set()
    calls: set[str] = set()
    active: set[str] = set()
    ended: set[str] = set()
    steps: set[str] = set()
    for i, ev in enumerate(events):
        ADAPTER.validate_python(ev)  # the official models: shape and types
        assert None not in ev.values(), f"event {i} carries a null: {ev}"
        kind = ev["type"]
        assert not finished, f"event {i} {kind} after the run ended"
        if i == 0:
            assert kind in ("RUN_STARTED", "RUN_ERROR")
            started = True
        assert started
        if kind == "TEXT_MESSAGE_START":
            assert ev["messageId"] not in texts
            texts.add(ev["messageId"])
        elif kind in ("TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END"):
            assert ev["messageId"] in texts, f"{kind} of a message not started: {ev}"
            if kind == "TEXT_MESSAGE_END":
                texts.discard(ev["messageId"])
        elif kind == "TOOL_CALL_START":
            calls.add(ev["toolCallId"])
        elif kind in ("TOOL_CALL_ARGS", "TOOL_CALL_END"):
            assert ev["toolCallId"] in calls
            if kind == "TOOL_CALL_END":
                calls.discard(ev["toolCallId"])
        elif kind == "SUBAGENT_STARTED":
            sid = ev["subagentRunId"]
            assert sid not in active and sid not in ended
            parent = ev.get("parentSubagentRunId")
            assert parent is None or parent in active or parent in ended
            active.add(sid)
        elif kind in ("SUBAGENT_FINISHED", "SUBAGENT_ERROR"):
            assert ev["subagentRunId"] in active
            active.discard(ev["subagentRunId"])
            ended.add(ev["subagentRunId"])
        elif kind == "STEP_STARTED":
            assert ev["stepName"] not in steps
            steps.add(ev["stepName"])
        elif kind == "STEP_FINISHED":
            steps.remove(ev["stepName"])
        elif kind == "RUN_FINISHED":
            assert not texts and not calls and not active and not steps, (texts, active, steps)
            finished = True
        elif kind == "RUN_ERROR":
            finished = True


def apply(state: Any, events: list[dict[str, Any]]) -> Any:
    """What a client's state becomes (STATE_SNAPSHOT replaces, STATE_DELTA patches)."""
    for ev in events:
        if ev["type"] == "STATE_SNAPSHOT":
            state = copy.deepcopy(ev["snapshot"])
        elif ev["type"] == "STATE_DELTA":
            for op in ev["delta"]:
                assert op["op"] == "add"
                parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")]
                target = state
                for part in parts[:-1]:
                    target = target[part]
                target[parts[-1]] = copy.deepcopy(op["value"])
    return state


def client_messages(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The message list a client builds (text messages, with their merged metadata)."""
    messages: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["type"] == "TEXT_MESSAGE_START":
            messages.setdefault(
                e["messageId"], {"id": e["messageId"], "role": "assistant", "content": ""}
            )
        elif e["type"] == "TEXT_MESSAGE_CONTENT":
            msg = messages[e["messageId"]]
            msg["content"] += e["delta"]
            msg["metadata"] = {**msg.get("metadata", {}), **e["metadata"]}
        elif e["type"] == "TOOL_CALL_RESULT":
            messages[e["messageId"]] = {
                "id": e["messageId"],
                "role": "tool",
                "content": e["content"],
            }
    return list(messages.values())
