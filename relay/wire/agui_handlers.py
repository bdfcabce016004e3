"""One handler per relay event type: its state changes and its AG-UI events.

Each handler adds its state changes to ``patch`` and its AG-UI events to
``out`` (sent before the event's ``STATE_DELTA``), and returns what goes
after that delta (the end of the run), so the delta that records the seq is
sent once the event's other AG-UI events are (see :mod:`relay.wire.agui_map`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.wire.agui_events import (
    SPAWN_TOOL,
    Event,
    event,
    message_id,
    result_message_id,
    spawn_call_id,
)
from relay.wire.agui_state import Json, Patch

if TYPE_CHECKING:
    from relay.wire.agui_map import AguiRun

Handler = Callable[["AguiRun", dict[str, Json], Patch, list[Event]], list[Event]]


def _agent(run: AguiRun, patch: Patch, aid: str) -> dict[str, Json]:
    agents = run.state["agents"]
    if aid not in agents:
        patch.add(
            {
                "agent_id": aid,
                "parent_id": None,
                "task_description": "",
                "depth": 0,
                "status": "running",
                "tokens_used": 0,
                "memories": 0,
            },
            "agents",
            aid,
        )
    entry: dict[str, Json] = agents[aid]
    return entry


def _spawned(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    aid, parent = str(f["agent_id"]), f.get("parent_id")
    known = aid in run.state["agents"]
    agent = {
        "agent_id": aid,
        "parent_id": parent,
        "task_description": f.get("task_description", ""),
        "depth": f.get("depth", 0),
        "index": f.get("index"),
        "total": f.get("total"),
        "status": "running",
        "tokens_used": 0,
        "memories": 0,
    }
    if known:
        for key in ("parent_id", "task_description", "depth", "index", "total"):
            patch.add(agent[key], "agents", aid, key)
        return []
    patch.add(agent, "agents", aid)
    if parent is None:
        return []
    sid, call = run.attribution(str(parent)), spawn_call_id(aid)
    args = {k: agent[k] for k in ("task_description", "depth", "index", "total")}
    out += [
        event(
            "TOOL_CALL_START",
            toolCallId=call,
            toolCallName=SPAWN_TOOL,
            parentMessageId=message_id(str(parent)),
            subagentRunId=sid,
        ),
        event("TOOL_CALL_ARGS", toolCallId=call, delta=json.dumps(args), subagentRunId=sid),
        event("TOOL_CALL_END", toolCallId=call, subagentRunId=sid),
        run.subagent_started(agent),
    ]
    return []


def _ended(
    run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event], status: str
) -> list[Event]:
    aid = str(f["agent_id"])
    agent = _agent(run, patch, aid)
    patch.add(status, "agents", aid, "status")
    fields = {
        "completed": ("tokens_used", "duration_ms", "result_summary"),
        "failed": ("error",),
        "retrying": ("error",),
        "cancelled": ("reason",),
    }[status]
    for key in fields:
        patch.add(f.get(key), "agents", aid, key)
    if status == "retrying":
        return []
    out += run.end_text(aid)
    parent = agent.get("parent_id")
    if parent is None:
        patch.add({"status": status, "agent_id": aid, "seq": f["seq"]}, "outcome")
        return run.finish(status, aid)
    text = {
        "completed": str(f.get("result_summary", "")),
        "failed": f"failed: {f.get('error', '')}",
        "cancelled": f"cancelled: {f.get('reason', '')}",
    }[status]
    out.append(
        event(
            "TOOL_CALL_RESULT",
            messageId=result_message_id(aid),
            toolCallId=spawn_call_id(aid),
            content=text,
            role="tool",
            subagentRunId=run.attribution(str(parent)),
        )
    )
    if status == "completed":
        ending = event(
            "SUBAGENT_FINISHED", subagentRunId=aid, result=text, outcome={"type": "success"}
        )
    else:
        message = str(f.get("error") or f.get("reason") or status)
        ending = event("SUBAGENT_ERROR", subagentRunId=aid, message=message, code=f"relay.{status}")
    out += run.end_subagent(aid, ending)
    return []


def _completed(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    return _ended(run, f, patch, out, "completed")


def _failed(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    return _ended(run, f, patch, out, "retrying" if f.get("will_retry") else "failed")


def _cancelled(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    return _ended(run, f, patch, out, "cancelled")


def _agent_fact(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    aid = str(f["agent_id"])
    agent = _agent(run, patch, aid)
    kind = f["type"]
    if kind == "depth_limit_reached":
        patch.add(
            {"attempted_depth": f.get("attempted_depth"), "max_depth": f.get("max_depth")},
            "agents",
            aid,
            "depth_limit",
        )
    elif kind == "cycle_detected":
        patch.add(f.get("cycle_description"), "agents", aid, "cycle")
    else:  # memory_created: the fact itself is not state, the count is
        patch.add(int(agent.get("memories") or 0) + 1, "agents", aid, "memories")
        out.append(run.notice("memory_created", {"agent_id": aid, "fact": f.get("fact")}))
    return []


def _budget(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    # Like the snapshot frame: replaced as a whole by the latest budget event,
    # warned and exhausted stay true once seen.
    prev = run.state.get("budget") or {}
    kind = f["type"]
    budget = {
        "tokens_used": f.get("tokens_used"),
        "budget_total": f.get("budget_total"),
        "percentage": f.get("percentage"),
        "completed_agents": f.get("completed_agents"),
        "incomplete_agents": f.get("incomplete_agents"),
        "warned": bool(prev.get("warned")) or kind == "budget_warning",
        "exhausted": bool(prev.get("exhausted")) or kind == "budget_exhausted",
    }
    patch.add(budget, "budget")
    return []


def _decision(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    patch.add(None, "pending_decision")
    patch.add({"decision": f.get("decision"), "decided_by": f.get("decided_by")}, "last_decision")
    return []


def _synthesis(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    if not run.state.get("synthesis_started") and "synthesis" not in run.steps:
        run.steps.append("synthesis")
        out.append(event("STEP_STARTED", stepName="synthesis"))
    patch.add(True, "synthesis_started")
    return []


def _failover(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    keys = ("from_provider", "to_provider", "reason")
    patch.add({k: f.get(k) for k in keys}, "provider")
    return []


_WORKFLOW_FIELDS = {
    "workflow_run_started": ("running", ("workflow_name", "trigger_type")),
    "workflow_run_completed": ("completed", ("workflow_name", "duration_ms", "steps_completed")),
    "workflow_run_failed": ("failed", ("workflow_name", "error")),
    "workflow_run_paused": ("paused", ("step_id", "reason")),
    "workflow_step_started": ("running", ("step_name", "step_type")),
    "workflow_step_completed": ("completed", ("step_name", "duration_ms")),
    "workflow_step_failed": ("failed", ("step_name", "error", "will_retry")),
}


def _workflow(run: AguiRun, f: dict[str, Json], patch: Patch, out: list[Event]) -> list[Event]:
    rid, kind = str(f.get("run_id")), str(f["type"])
    status, keys = _WORKFLOW_FIELDS[kind]
    if rid not in run.state["workflows"]:
        patch.add({"run_id": rid, "status": "running", "steps": {}}, "workflows", rid)
    if kind.startswith("workflow_step_"):
        sid = str(f.get("step_id"))
        if kind == "workflow_step_failed" and f.get("will_retry"):
            status = "retrying"
        if sid not in run.state["workflows"][rid]["steps"]:
            patch.add({"step_id": sid}, "workflows", rid, "steps", sid)
        patch.add(status, "workflows", rid, "steps", sid, "status")
        for key in keys:
            patch.add(f.get(key), "workflows", rid, "steps", sid, key)
        return []
    patch.add(status, "workflows", rid, "status")
    for key in keys:
        patch.add(f.get(key), "workflows", rid, key)
    return []


HANDLERS: dict[str, Handler] = {
    "agent_spawned": _spawned,
    "agent_completed": _completed,
    "agent_failed": _failed,
    "agent_cancelled": _cancelled,
    "depth_limit_reached": _agent_fact,
    "cycle_detected": _agent_fact,
    "memory_created": _agent_fact,
    "budget_update": _budget,
    "budget_warning": _budget,
    "budget_exhausted": _budget,
    "budget_decision": _decision,
    "synthesis_started": _synthesis,
    "provider_failover": _failover,
    **dict.fromkeys(_WORKFLOW_FIELDS, _workflow),
}
