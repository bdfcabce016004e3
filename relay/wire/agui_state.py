"""The AG-UI shared state of a relay request, and the JSON Patch that changes it.

An AG-UI client holds one *state* per run and changes it with
``STATE_SNAPSHOT`` (replace) and ``STATE_DELTA`` (RFC 6902 JSON Patch). relay
puts the request's agent tree and budget there, shaped like the ``snapshot``
frame of the WebSocket (snake_case keys, agents keyed by id rather than
listed, so a patch path never depends on an array index):

.. code-block:: json

    {"request_id": "…", "relay": {"epoch": "…", "seq": 42},
     "agents": {"<id>": {"agent_id": "…", "parent_id": null, "status": "running", …}},
     "budget": null, "pending_decision": null, "last_decision": null,
     "synthesis_started": false, "outcome": null, "provider": null, "workflows": {}}

``relay.seq`` is the stream position the client has applied: the client
sends its state back with every run (``RunAgentInput.state``), which is how
a run resumes after a disconnect (see :mod:`relay.wire.agui_map`).

Every operation is an ``add`` (RFC 6902 4.1: on an existing member it
replaces the value), so a patch applies whatever the member held before.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

Json = Any
Op = dict[str, Json]


def pointer(*parts: str) -> str:
    """An RFC 6901 JSON Pointer to ``parts`` (``~`` and ``/`` escaped).

    >>> pointer("agents", "a/b", "status")
    '/agents/a~1b/status'
    """
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def iso_ms(ms: int) -> str:
    """ISO-8601 UTC of a time in ms since the epoch (AG-UI's ``expiresAt`` format).

    >>> iso_ms(1795638116652)
    '2026-11-25T20:21:56.652Z'
    """
    stamp = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def initial_state(request_id: str, epoch: str | None = None, seq: int = 0) -> dict[str, Json]:
    """The state of a request nothing is known of yet."""
    return {
        "request_id": request_id,
        "relay": {"epoch": epoch, "seq": seq},
        "agents": {},
        "budget": None,
        "pending_decision": None,
        "last_decision": None,
        "synthesis_started": False,
        "outcome": None,
        "provider": None,
        "workflows": {},
    }


class _Cursor(BaseModel):
    model_config = ConfigDict(extra="ignore")
    epoch: str | None = None
    seq: int = 0


class _Agent(BaseModel):
    model_config = ConfigDict(extra="allow")
    agent_id: str
    parent_id: str | None = None
    status: str = "running"


class _ClientState(BaseModel):
    # What a resuming client must send back for relay to continue its state;
    # anything else it added is kept (extra="allow") and left alone.
    model_config = ConfigDict(extra="allow")
    request_id: str
    relay: _Cursor
    agents: dict[str, _Agent]


def adopt_state(raw: Json, request_id: str) -> dict[str, Json] | None:
    """The client's state if it is a relay state of ``request_id``, else None.

    The client's state is its own (AG-UI sends it back verbatim); relay only
    needs the cursor and the agent tree in the shape it sent them.
    """
    try:
        parsed = _ClientState.model_validate(raw)
    except ValidationError:
        return None
    if parsed.request_id != request_id:
        return None
    state = initial_state(request_id)
    state.update(copy.deepcopy(raw))
    return state


def from_relay_snapshot(snap: dict[str, Json]) -> dict[str, Json]:
    """The state equal to a relay ``snapshot`` frame (see docs/PROTOCOL.md)."""
    state = initial_state(snap["request_id"], snap.get("epoch"), int(snap.get("seq") or 0))
    for agent in snap.get("agents") or []:
        entry = {k: v for k, v in agent.items() if k not in ("spawned_seq", "updated_seq")}
        entry.setdefault("parent_id", None)
        entry.setdefault("memories", 0)
        state["agents"][agent["agent_id"]] = entry
    budget = snap.get("budget")
    if isinstance(budget, dict):
        state["budget"] = {k: v for k, v in budget.items() if k != "seq"}
    pending = snap.get("pending_decision")
    state["pending_decision"] = pause_state(pending) if isinstance(pending, dict) else None
    last = snap.get("last_decision")
    if isinstance(last, dict):
        state["last_decision"] = {
            "decision": last.get("decision"),
            "decided_by": last.get("decided_by"),
        }
    state["synthesis_started"] = bool(snap.get("synthesis_started"))
    outcome = snap.get("outcome")
    if isinstance(outcome, dict):
        state["outcome"] = {
            "status": outcome.get("status"),
            "agent_id": outcome.get("agent_id"),
            "seq": outcome.get("seq"),
        }
    return state


def pause_state(pending: dict[str, Json]) -> dict[str, Json]:
    """A pending budget pause as it appears in the state (with ``expires_at``)."""
    entry = {
        k: pending.get(k)
        for k in (
            "pause_id",
            "tokens_used",
            "budget_total",
            "opened_ts",
            "deadline_ts",
            "timeout_decision",
        )
    }
    deadline = pending.get("deadline_ts")
    entry["expires_at"] = iso_ms(deadline) if isinstance(deadline, int) else None
    return entry


class Patch:
    """Builds one ``STATE_DELTA`` and applies it to the mapper's copy of the state."""

    def __init__(self, state: dict[str, Json]) -> None:
        self.state = state
        self.ops: list[Op] = []

    def add(self, value: Json, *parts: str) -> None:
        """``add`` ``value`` at ``parts`` (parents must exist); no-op when unchanged."""
        parent = self.state
        for part in parts[:-1]:
            parent = parent[part]
        if parts[-1] in parent and parent[parts[-1]] == value:
            return
        parent[parts[-1]] = copy.deepcopy(value)
        self.ops.append({"op": "add", "path": pointer(*parts), "value": value})
