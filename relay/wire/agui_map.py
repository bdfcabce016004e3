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

import copy
from typing import Any

from relay.wire.agui_events import (
    DECISION_SCHEMA,
    INTERRUPT_REASON,
    TERMINAL,
    Event,
    compact,
    event,
    message_id,
    spawn_call_id,
)
from relay.wire.agui_handlers import HANDLERS
from relay.wire.agui_state import Json, Patch, initial_state, pause_state


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
        self.steps: list[str] = []

    # ---------------------------------------------------------------- run

    @property
    def seq(self) -> int:
        """The last seq applied to the state."""
        return int(self.state["relay"]["seq"])

    def start(self, extra: list[Event] | None = None) -> list[Event]:
        """``RUN_STARTED``, the state, the subagents still running, ``extra`` (or the end).

        ``extra`` (notices, the text so far) goes before the end when the
        state already records the outcome.
        """
        out = [
            event("RUN_STARTED", threadId=self.thread_id, runId=self.run_id),
            event("STATE_SNAPSHOT", snapshot=copy.deepcopy(self.state)),
        ]
        outcome = self.state.get("outcome")
        if isinstance(outcome, dict):
            return out + (extra or []) + self.finish(outcome.get("status"), outcome.get("agent_id"))
        agents: dict[str, dict[str, Json]] = self.state["agents"]
        for agent in sorted(agents.values(), key=lambda a: int(a.get("depth") or 0)):
            if agent.get("parent_id") is not None and agent.get("status") not in TERMINAL:
                out.append(self.subagent_started(agent))
        return out + (extra or [])

    def error(self, code: str, message: str) -> list[Event]:
        """End the run with ``RUN_ERROR`` (the client may start another to go on)."""
        self.finished = True
        return [event("RUN_ERROR", message=message, code=code)]

    def notice(self, name: str, value: Json) -> Event:
        """A ``CUSTOM`` event ``relay.<name>`` (facts with no AG-UI event of their own)."""
        return event("CUSTOM", name=f"relay.{name}", value=value)

    def texts_so_far(self, texts: dict[str, Json], seq: int, epoch: str | None) -> list[Event]:
        """Each agent's text so far, from a snapshot's ``texts`` (compact catch-up).

        One ``TEXT_MESSAGE_CONTENT`` per agent, recorded at ``seq`` (the
        snapshot's ``text_seq``); the message stays open while the agent
        runs. A text whose head was cut is said so (``CUSTOM relay.text_truncated``).
        """
        out: list[Event] = []
        for aid, entry in texts.items():
            if not isinstance(entry, dict) or not entry.get("text"):
                continue
            if entry.get("truncated"):
                out.append(
                    self.notice("text_truncated", {"agent_id": aid, "bytes": entry.get("bytes")})
                )
            frame = {"agent_id": aid, "text": entry["text"]}
            out += self._text(frame, epoch, seq, None)
            agent = self.state["agents"].get(aid) or {}
            if agent.get("status") in TERMINAL:
                out += self.end_text(aid)
        return out

    def new_epoch(self, epoch: str | None) -> list[Event]:
        """The stream restarted in a new epoch (Redis lost it): its seqs start over."""
        patch = Patch(self.state)
        patch.add({"epoch": epoch, "seq": 0}, "relay")
        return [
            self.notice("epoch_changed", {"epoch": epoch}),
            event("STATE_DELTA", delta=patch.ops),
        ]

    def interrupt(self, pending: dict[str, Json]) -> list[Event]:
        """End the run with the interrupt outcome for a pending budget pause."""
        pause = pause_state(pending)
        self.state["pending_decision"] = pause  # the snapshot below carries it
        out = self.close_all(
            lambda sid: event(
                "SUBAGENT_FINISHED",
                subagentRunId=sid,
                outcome={"type": "suspended", "interruptIds": [pause["pause_id"]]},
            )
        )
        interrupt = compact(
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
        out.append(event("STATE_SNAPSHOT", snapshot=copy.deepcopy(self.state)))
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
        if kind == "agent_text_delta":
            return self._text(frame, epoch, seq, ts)
        patch = Patch(self.state)
        if epoch is not None:
            patch.add(epoch, "relay", "epoch")
        out: list[Event] = []
        after: list[Event] = []
        handler = HANDLERS.get(kind)
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
            sid = self.attribution(aid)
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

    def attribution(self, agent_id: str | None) -> str | None:
        """The subagentRunId of what ``agent_id`` produces (None: the run's own agent)."""
        if agent_id is None:
            return None
        agent = self.state["agents"].get(agent_id)
        return agent_id if agent is not None and agent.get("parent_id") is not None else None

    def subagent_started(self, agent: dict[str, Json]) -> Event:
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

    def end_text(self, agent_id: str) -> list[Event]:
        if agent_id not in self._open:
            return []
        sid = self._open.pop(agent_id)
        return [event("TEXT_MESSAGE_END", messageId=message_id(agent_id), subagentRunId=sid)]

    def end_subagent(self, agent_id: str, ending: Event) -> list[Event]:
        if agent_id not in self._active:
            return []
        self._active.remove(agent_id)
        self._ended.add(agent_id)
        return [ending]

    def close_all(self, ending: Any) -> list[Event]:
        """Close what the verifier requires closed before ``RUN_FINISHED``."""
        out: list[Event] = []
        for aid in list(self._open):
            out += self.end_text(aid)
        for sid in reversed(list(self._active)):
            out += self.end_subagent(sid, ending(sid))
        out += [event("STEP_FINISHED", stepName=name) for name in reversed(self.steps)]
        self.steps.clear()
        return out

    def finish(self, status: Json, agent_id: Json) -> list[Event]:
        agent = self.state["agents"].get(agent_id, {}) if isinstance(agent_id, str) else {}
        out = self.close_all(
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


__all__ = ["AguiRun", "Event", "initial_state", "message_id", "spawn_call_id"]
