"""relay events as AG-UI events: one run of an AG-UI client over a relay request.

:class:`AguiRun` turns the frames of one request, in seq order, into the
events of the AG-UI protocol (https://docs.ag-ui.com, protocol 1.0). It does
no I/O: the gateway endpoint (:mod:`relay.gateway.agui`) feeds it frames and
writes what it returns. The full mapping table is in docs/PROTOCOL.md; in
short:

* the request is the run: ``RUN_STARTED``, then ``STATE_SNAPSHOT`` (the agent
  tree and budget, :mod:`relay.wire.agui_state`), one ``STATE_DELTA`` per
  event that changes it, and ``RUN_FINISHED`` / ``RUN_ERROR`` when the root
  agent ends;
* every sub-agent is an AG-UI subagent (``SUBAGENT_STARTED`` … ``_FINISHED``
  / ``_ERROR``, ``subagentRunId`` = its agent id), spawned by a
  ``spawn_agent`` tool call of its parent (``TOOL_CALL_START/ARGS/END``, and
  ``TOOL_CALL_RESULT`` with its summary when it ends);
* an agent's text is one assistant message whose id derives from the agent
  id (``msg-<agent_id>``): ``TEXT_MESSAGE_START``, one ``TEXT_MESSAGE_CONTENT``
  per ``agent_text_delta``, ``TEXT_MESSAGE_END`` when the agent ends;
* a budget pause ends the run with the interrupt outcome; the next run
  answers it with ``resume`` and continues.

Resume: every event records its seq where the client keeps it, in the state
(``relay.seq``, the last operation of each ``STATE_DELTA``) or in the
message's metadata (``metadata.relay`` of each ``TEXT_MESSAGE_CONTENT``,
which the client merges into the message). A client sends both back with
its next run, so the highest seq found there is exactly what it has
applied (:func:`relay.wire.agui_input.resume_cursor`).

Example::

    run = AguiRun("thread-1", "run-1", initial_state(rid))
    events = run.start() + run.feed(frame, epoch)
"""

from __future__ import annotations

import json
from typing import Any

from relay.wire.agui_state import Json, Patch, initial_state, pause_state

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


def _compact(**fields: Json) -> dict[str, Json]:
    return {k: v for k, v in fields.items() if v is not None}


def event(kind: str, **fields: Json) -> Event:
    """An AG-UI event; optional fields that are None are left out (never ``null``)."""
    return {"type": kind, **_compact(**fields)}


class AguiRun:
    """The AG-UI side of one run: what was opened in it, and the state it continues."""

    def __init__(self, thread_id: str, run_id: str, state: dict[str, Json]) -> None:
        self.thread_id = thread_id
        self.run_id = run_id
        self.state = state
        self.finished = False
        """RUN_FINISHED or RUN_ERROR was returned: nothing more belongs to this run."""
        self._open: dict[str, str | None] = {}  # agent id -> subagentRunId of its open message
        self._active: list[str] = []  # subagents started in this run and not ended
        self._ended: set[str] = set()
        self._steps: list[str] = []

    # ---------------------------------------------------------------- run

    @property
    def seq(self) -> int:
        """The last seq applied to the state."""
        return int(self.state["relay"]["seq"])

    def start(self) -> list[Event]:
        """``RUN_STARTED``, the state, and the subagents still running (or the end)."""
        out = [
            event("RUN_STARTED", threadId=self.thread_id, runId=self.run_id),
            event("STATE_SNAPSHOT", snapshot=self.state),
        ]
        outcome = self.state.get("outcome")
        if isinstance(outcome, dict):
            return out + self._finish(outcome.get("status"), outcome.get("agent_id"))
        agents: dict[str, dict[str, Json]] = self.state["agents"]
        for agent in sorted(agents.values(), key=lambda a: int(a.get("depth") or 0)):
            if agent.get("parent_id") is not None and agent.get("status") not in TERMINAL:
                out.append(self._subagent_started(agent))
        return out

    def error(self, code: str, message: str) -> list[Event]:
        """End the run with ``RUN_ERROR`` (the client may start another to go on)."""
        self.finished = True
        return [event("RUN_ERROR", message=message, code=code)]

    def notice(self, name: str, value: Json) -> Event:
        """A ``CUSTOM`` event ``relay.<name>`` (facts with no AG-UI event of their own)."""
        return event("CUSTOM", name=f"relay.{name}", value=value)

    def interrupt(self, pending: dict[str, Json]) -> list[Event]:
        """End the run with the interrupt outcome for a pending budget pause."""
        pause = pause_state(pending)
        self.state["pending_decision"] = pause  # the snapshot below carries it
        out = self._close_all(
            lambda sid: event(
                "SUBAGENT_FINISHED",
                subagentRunId=sid,
                outcome={"type": "suspended", "interruptIds": [pause["pause_id"]]},
            )
        )
        interrupt = _compact(
            id=str(pause["pause_id"]),
            reason=INTERRUPT_REASON,
            message=(
                f"The request used {pause['tokens_used']} of {pause['budget_total']} tokens: "
                f"continue or stop? Without an answer: {pause['timeout_decision']}."
            ),
            responseSchema=DECISION_SCHEMA,
            expiresAt=pause["expires_at"],
            metadata={"relay": {"request_id": self.state["request_id"], **pause}},
        )
        out.append(event("STATE_SNAPSHOT", snapshot=self.state))
        out.append(
            event(
                "RUN_FINISHED",
                threadId=self.thread_id,
                runId=self.run_id,
                outcome={"type": "interrupt", "interrupts": [interrupt]},
            )
        )
        self.finished = True
        return out

    # ---------------------------------------------------------------- events

    def feed(
        self, frame: dict[str, Json], epoch: str | None, pending: dict[str, Json] | None = None
    ) -> list[Event]:
        """The AG-UI events of one relay event frame (seq order, each once).

        ``pending`` is the request's open budget pause, read when the frame is
        a ``budget_warning`` (None: no pause is open any more).
        """
        if self.finished:
            return []
        kind = str(frame.get("type"))
        seq = int(frame["seq"])
        ts = frame.get("ts") if isinstance(frame.get("ts"), int) else None
        patch = Patch(self.state)
        if epoch is not None:
            patch.add(epoch, "relay", "epoch")
        if kind == "agent_text_delta":
            return self._text(frame, epoch, seq, ts)
        out: list[Event] = []
        after: list[Event] = []
        handler = _HANDLERS.get(kind)
        if handler is None:
            out.append(self.notice(kind, frame))
        else:
            after = handler(self, frame, patch, out)
        opened = kind == "budget_warning" and pending is not None and not after
        if opened:
            assert pending is not None
            patch.add(pause_state(pending), "pending_decision")
        patch.add(seq, "relay", "seq")  # last: a delta the client applied is an event it has
        out.append(event("STATE_DELTA", delta=patch.ops, timestamp=ts))
        if opened:
            assert pending is not None
            after = self.interrupt(pending)
        for item in out:
            if ts is not None:
                item.setdefault("timestamp", ts)
        return out + after

    def _text(
        self, frame: dict[str, Json], epoch: str | None, seq: int, ts: int | None
    ) -> list[Event]:
        aid = str(frame["agent_id"])
        out: list[Event] = []
        mid = message_id(aid)
        if aid not in self._open:
            sid = self._attribution(aid)
            self._open[aid] = sid
            out.append(
                event(
                    "TEXT_MESSAGE_START",
                    messageId=mid,
                    role="assistant",
                    subagentRunId=sid,
                    timestamp=ts,
                )
            )
        out.append(
            event(
                "TEXT_MESSAGE_CONTENT",
                messageId=mid,
                delta=str(frame.get("text", "")),
                subagentRunId=self._open[aid],
                timestamp=ts,
                metadata={"relay": {"epoch": epoch, "seq": seq}},
            )
        )
        return out

    # ---------------------------------------------------------------- helpers

    def _attribution(self, agent_id: str | None) -> str | None:
        """The subagentRunId of what ``agent_id`` produces (None: the run's own agent)."""
        if agent_id is None:
            return None
        agent = self.state["agents"].get(agent_id)
        return agent_id if agent is not None and agent.get("parent_id") is not None else None

    def _subagent_started(self, agent: dict[str, Json]) -> Event:
        aid, parent = agent["agent_id"], agent.get("parent_id")
        self._active.append(aid)
        nested = parent if parent in self._active or parent in self._ended else None
        index, total = agent.get("index"), agent.get("total")
        name = f"agent {int(index) + 1}/{total}" if isinstance(index, int) else "agent"
        return event(
            "SUBAGENT_STARTED",
            subagentRunId=aid,
            name=name,
            description=agent.get("task_description") or None,
            parentSubagentRunId=nested,
            parentToolCallId=spawn_call_id(aid),
            parentMessageId=message_id(parent) if parent is not None else None,
        )

    def _end_text(self, agent_id: str) -> list[Event]:
        if agent_id not in self._open:
            return []
        sid = self._open.pop(agent_id)
        return [event("TEXT_MESSAGE_END", messageId=message_id(agent_id), subagentRunId=sid)]

    def _end_subagent(self, agent_id: str, ending: Event) -> list[Event]:
        if agent_id not in self._active:
            return []
        self._active.remove(agent_id)
        self._ended.add(agent_id)
        return [ending]

    def _close_all(self, ending: Any) -> list[Event]:
        """Close what the verifier requires closed before ``RUN_FINISHED``."""
        out: list[Event] = []
        for aid in list(self._open):
            out += self._end_text(aid)
        for sid in reversed(list(self._active)):
            out += self._end_subagent(sid, ending(sid))
        out += [event("STEP_FINISHED", stepName=name) for name in reversed(self._steps)]
        self._steps.clear()
        return out

    def _finish(self, status: Json, agent_id: Json) -> list[Event]:
        agent = self.state["agents"].get(agent_id, {}) if isinstance(agent_id, str) else {}
        out = self._close_all(
            lambda sid: event(
                "SUBAGENT_ERROR",
                subagentRunId=sid,
                message="the request ended before this agent did",
                code="relay.request_ended",
            )
        )
        self.finished = True
        ids = {"threadId": self.thread_id, "runId": self.run_id}
        if status == "completed":
            summary = agent.get("result_summary")
            out.append(event("RUN_FINISHED", **ids, result=summary, outcome={"type": "success"}))
        elif status == "cancelled":
            out.append(event("RUN_FINISHED", **ids, outcome={"type": "cancelled"}))
        else:
            message = str(agent.get("error") or "the request failed")
            out.append(event("RUN_ERROR", message=message, code="relay.agent_failed"))
        return out


# ---------------------------------------------------------------- per event type
# Each handler adds its state changes to ``patch`` and its AG-UI events to
# ``out`` (sent before the STATE_DELTA), and returns what goes after it (the
# end of the run), so the delta that records the seq is sent once the
# event's other AG-UI events are.


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
    sid, call = run._attribution(str(parent)), spawn_call_id(aid)
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
        run._subagent_started(agent),
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
    out += run._end_text(aid)
    parent = agent.get("parent_id")
    if parent is None:
        patch.add({"status": status, "agent_id": aid, "seq": f["seq"]}, "outcome")
        return run._finish(status, aid)
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
            subagentRunId=run._attribution(str(parent)),
        )
    )
    if status == "completed":
        ending = event(
            "SUBAGENT_FINISHED", subagentRunId=aid, result=text, outcome={"type": "success"}
        )
    else:
        message = str(f.get("error") or f.get("reason") or status)
        ending = event("SUBAGENT_ERROR", subagentRunId=aid, message=message, code=f"relay.{status}")
    out += run._end_subagent(aid, ending)
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
    if not run.state.get("synthesis_started") and "synthesis" not in run._steps:
        run._steps.append("synthesis")
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


_HANDLERS: dict[str, Any] = {
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

__all__ = ["AguiRun", "Event", "initial_state", "message_id", "spawn_call_id"]
