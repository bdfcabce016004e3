"""Rendering of the event stream for terminals: frames in, lines out.

:class:`TreeRenderer` draws what the original terminal client drew: a
box-drawing tree (``├──``, ``└──``, ``│``) per spawn batch, a
``[tokens: 12,450 / 500,000]`` counter, and one line per failure,
cancellation, depth limit, cycle and synthesis start, plus relay's own notices
(``lagged``, ``resync_required``, ``budget_decision``, errors), and for a
``snapshot`` the tree so far with the latest words of each agent's text, so a
late joiner sees where a long request stands at once. It does no I/O,
so it is tested with plain frame sequences; ``relay tail`` drives it.

Every string in a frame is untrusted (LLM output, task descriptions, error
texts): each line :meth:`TreeRenderer.feed` returns has been through
:func:`sanitize`, so what it prints cannot drive the terminal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")
REMEMBER_MAX = 10_000
"""Entries a long-running console keeps per table before forgetting the oldest."""
TEXT_EXCERPT = 240
"""Characters of an agent's text so far that a snapshot shows below it (the latest)."""


def remember(table: dict[K, V], key: K, value: V, limit: int = REMEMBER_MAX) -> None:
    """``table[key] = value``, dropping the oldest entries beyond ``limit``."""
    table.pop(key, None)
    table[key] = value
    while len(table) > limit:
        del table[next(iter(table))]


TREE_MID, TREE_LAST, TREE_PIPE, TREE_GAP = "├── ", "└── ", "│   ", "    "

# ECMA-48 sequences, in 7-bit (ESC ...) and 8-bit (C1) form. A string sequence
# (OSC: title, clipboard, hyperlink; DCS, SOS, PM, APC) runs to BEL or ST, and
# to the end of the text when unterminated, since the terminal would swallow
# whatever follows until a terminator too.
_ESCAPE_SEQUENCE = re.compile(
    r"""
      (?:\x1b\[|\x9b) [\x30-\x3f]* [\x20-\x2f]* [\x40-\x7e]?   # CSI: cursor, erase, colour, modes
    | (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]) .*? (?:\x07|\x1b\\|\x9c|\Z)
    | \x1b [\x20-\x2f]* [\x30-\x7e]?                           # other ESC sequences (ESC c resets)
    """,
    re.VERBOSE | re.DOTALL,
)
# What is left of C0 (but newline and tab), DEL and C1: CR overwrites a line,
# BS rubs out text, a stray ESC or CSI would start a sequence.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (newline and tab stay).

    For every untrusted string before it reaches a terminal: a model's output
    may carry sequences that retitle the window, clear the screen, write the
    clipboard (OSC 52) or move the cursor to overwrite earlier lines.
    """
    if text.isprintable():
        return text  # the common case: nothing to strip (printable excludes every control)
    return _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", text))


def format_tokens(used: int, total: int) -> str:
    """``[tokens: 12,450 / 500,000]``."""
    return f"[tokens: {used:,} / {total:,}]"


def short(ident: object) -> str:
    """The first 8 characters of an id: enough to tell agents apart on screen."""
    return str(ident)[:8]


@dataclass(slots=True)
class _Agent:
    label: str
    indent: str
    """Prefix of the lines drawn below this agent (its children, its status)."""


class TreeRenderer:
    """Turns frames (decoded JSON objects) into lines of text; pure, no I/O.

    With ``live_counter`` the token counter is left to the caller (read
    :attr:`counter` after each frame); without it a counter line is emitted
    at every tenth of the budget and at the warning and exhaustion.
    """

    def __init__(self, *, live_counter: bool = False) -> None:
        self.live_counter = live_counter
        self.counter: str | None = None
        """The latest ``[tokens: used / total]`` seen (of any request)."""
        # Bounded, oldest first out: a tail of a whole tenant runs for days.
        self._agents: dict[str, _Agent] = {}
        self._requests: dict[str, None] = {}
        self._decile: dict[str, int] = {}

    def feed(self, frame: dict[str, Any]) -> list[str]:
        """The lines to print for one frame (often none)."""
        kind = frame.get("type")
        rid = frame.get("request_id")
        if isinstance(rid, str) and "seq" in frame:
            remember(self._requests, rid, None)
        handler = getattr(self, f"_on_{kind}", None) if isinstance(kind, str) else None
        lines: list[str] = handler(frame) if handler is not None else []
        if len(self._requests) > 1 and isinstance(rid, str):
            # Several requests interleave (firehose): say which line is whose.
            lines = [f"[{short(rid)}] {line}" for line in lines]
        return [sanitize(line) for line in lines]

    # ------------------------------------------------------------ agents

    def _agent(self, agent_id: object) -> _Agent:
        return self._agents.get(str(agent_id)) or _Agent(f"[{short(agent_id)}]", "")

    def _on_agent_spawned(self, f: dict[str, Any]) -> list[str]:
        label = f"{f.get('task_description', '')} [{short(f.get('agent_id'))}]"
        parent = self._agents.get(str(f.get("parent_id"))) if f.get("parent_id") else None
        if parent is None:
            # A root (or a child whose parent we never saw): starts a tree.
            remember(self._agents, str(f.get("agent_id")), _Agent(label, ""))
            return [label]
        index, total = int(f.get("index", 0)), int(f.get("total", 1))
        last = index >= total - 1
        remember(
            self._agents,
            str(f.get("agent_id")),
            _Agent(label, parent.indent + (TREE_GAP if last else TREE_PIPE)),
        )
        position = f" ({index + 1}/{total})" if total > 1 else ""
        return [f"{parent.indent}{TREE_LAST if last else TREE_MID}{label}{position}"]

    def _status(self, f: dict[str, Any], symbol: str, text: str) -> list[str]:
        # Status lines sit below the agent, at the depth of its children.
        indent = self._agent(f.get("agent_id")).indent
        return [f"{indent}{symbol} [{short(f.get('agent_id'))}] {text}"]

    def _on_agent_completed(self, f: dict[str, Any]) -> list[str]:
        seconds = int(f.get("duration_ms", 0)) / 1000
        summary = str(f.get("result_summary", ""))
        summary = summary if len(summary) <= 60 else summary[:57] + "..."
        tokens = int(f.get("tokens_used", 0))
        return self._status(f, "✓", f"completed in {seconds:.1f}s, {tokens:,} tokens: {summary}")

    def _on_agent_failed(self, f: dict[str, Any]) -> list[str]:
        retry = " (will retry)" if f.get("will_retry") else ""
        return self._status(f, "✗", f"failed: {f.get('error', '')}{retry}")

    def _on_agent_cancelled(self, f: dict[str, Any]) -> list[str]:
        return self._status(f, "⊘", f"cancelled: {f.get('reason', '')}")

    def _on_depth_limit_reached(self, f: dict[str, Any]) -> list[str]:
        attempted, limit = f.get("attempted_depth"), f.get("max_depth")
        return self._status(f, "!", f"depth limit reached: depth {attempted} > max {limit}")

    def _on_cycle_detected(self, f: dict[str, Any]) -> list[str]:
        return self._status(f, "↻", f"cycle detected: {f.get('cycle_description', '')}")

    def _on_memory_created(self, f: dict[str, Any]) -> list[str]:
        return self._status(f, "•", f"remembered: {f.get('fact', '')}")

    # ------------------------------------------------------------ request

    def _on_synthesis_started(self, f: dict[str, Any]) -> list[str]:
        return ["» synthesis started"]

    def _tokens(self, f: dict[str, Any]) -> str:
        self.counter = format_tokens(int(f.get("tokens_used", 0)), int(f.get("budget_total", 0)))
        return self.counter

    def _on_budget_update(self, f: dict[str, Any]) -> list[str]:
        counter = self._tokens(f)
        if self.live_counter:
            return []
        decile = min(10, int(float(f.get("percentage", 0.0)) // 10))
        rid = str(f.get("request_id"))
        if decile <= self._decile.get(rid, 0):
            return []
        remember(self._decile, rid, decile)
        return [counter]

    def _on_budget_warning(self, f: dict[str, Any]) -> list[str]:
        return [f"⚠ budget warning {self._tokens(f)}"]

    def _on_budget_pending(self, f: dict[str, Any]) -> list[str]:
        return [f"⏸ budget decision pending {self._tokens(f)}"]

    def _on_budget_exhausted(self, f: dict[str, Any]) -> list[str]:
        done, left = len(f.get("completed_agents", [])), len(f.get("incomplete_agents", []))
        return [f"■ budget exhausted {self._tokens(f)}: {done} completed, {left} incomplete"]

    def _on_budget_decision(self, f: dict[str, Any]) -> list[str]:
        return [f"budget decision: {f.get('decision')} (by {f.get('decided_by')})"]

    def _on_provider_failover(self, f: dict[str, Any]) -> list[str]:
        return [f"⇄ provider failover {f.get('from_provider')} → {f.get('to_provider')}: "
                f"{f.get('reason', '')}"]  # fmt: skip

    def _on_workflow_run_started(self, f: dict[str, Any]) -> list[str]:
        return [f"workflow {f.get('workflow_name')} started ({f.get('trigger_type')})"]

    def _on_workflow_step_failed(self, f: dict[str, Any]) -> list[str]:
        retry = " (will retry)" if f.get("will_retry") else ""
        return [f"✗ workflow step {f.get('step_name')} failed: {f.get('error')}{retry}"]

    def _on_workflow_run_completed(self, f: dict[str, Any]) -> list[str]:
        return [f"✓ workflow {f.get('workflow_name')} completed ({f.get('steps_completed')} steps)"]

    def _on_workflow_run_failed(self, f: dict[str, Any]) -> list[str]:
        return [f"✗ workflow {f.get('workflow_name')} failed: {f.get('error')}"]

    def _on_workflow_run_paused(self, f: dict[str, Any]) -> list[str]:
        return [f"⏸ workflow paused at step {f.get('step_id')}: {f.get('reason')}"]

    # ------------------------------------------------------------ relay frames

    def _on_snapshot(self, f: dict[str, Any]) -> list[str]:
        """The request as it stands: its tree, each agent's status and latest text."""
        texts: dict[str, Any] = f["texts"] if isinstance(f.get("texts"), dict) else {}
        lines = [f"snapshot of {short(f.get('request_id'))} at seq {f.get('seq')}"]
        drawn: set[str] = set()
        for agent in f.get("agents") or []:
            if not isinstance(agent, dict):
                continue
            aid = str(agent.get("agent_id"))
            drawn.add(aid)
            lines += self._on_agent_spawned(agent)
            lines += self._excerpt(aid, texts.get(aid))
            status = agent.get("status")
            if status == "completed":
                lines += self._on_agent_completed(agent)
            elif status in ("failed", "retrying"):
                lines += self._on_agent_failed({**agent, "will_retry": status == "retrying"})
            elif status == "cancelled":
                lines += self._on_agent_cancelled(agent)
        for aid, text in texts.items():
            if aid not in drawn:  # text of an agent whose spawn was never published
                lines += self._excerpt(aid, text)
        budget = f.get("budget")
        if isinstance(budget, dict) and budget.get("tokens_used") is not None:
            counter = self._tokens(budget)
            if not self.live_counter:
                lines.append(counter)
        return lines

    def _excerpt(self, agent_id: str, text: object) -> list[str]:
        """One line with the end of an agent's text so far (whitespace folded)."""
        if not isinstance(text, dict) or not isinstance(text.get("text"), str):
            return []
        words = " ".join(text["text"].split())
        if not words:
            return []
        cut = bool(text.get("truncated")) or len(words) > TEXT_EXCERPT
        words = ("…" if cut else "") + words[-TEXT_EXCERPT:]
        return self._status({"agent_id": agent_id}, "┊", words)

    def _on_lagged(self, f: dict[str, Any]) -> list[str]:
        return [f"… lagged: {f.get('skipped')} events of {short(f.get('request_id'))} skipped"]

    def _on_resync_required(self, f: dict[str, Any]) -> list[str]:
        return [f"↺ resync required for {short(f.get('request_id'))}: {f.get('reason')}"]

    def _on_error(self, f: dict[str, Any]) -> list[str]:
        return [f"error {f.get('code')}: {f.get('message')}"]

    def _on_ack(self, f: dict[str, Any]) -> list[str]:
        return [f"✓ {f.get('command')} accepted"]

    def _on_subscribed(self, f: dict[str, Any]) -> list[str]:
        return [f"subscribed to {f.get('request_id')} at seq {f.get('seq')}"]
