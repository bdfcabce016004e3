"""``relay tail``: the terminal console of a gateway's event stream.

The drawing is :class:`relay.tools.render.TreeRenderer` (pure, tested without a
terminal). :class:`Console` does the I/O: it connects, subscribes, reconnects
with backoff resuming each request after the last seq it printed, keeps the
token counter live on a TTY, and at a budget pause asks ``Continue? [y/n]``
on the terminal and sends the answer.

Everything that reaches the terminal from the stream (LLM text, task
descriptions, error messages, ids) passes :func:`relay.tools.render.sanitize`
first, so a frame cannot retitle the window, clear the screen or write the
clipboard. A prompt disappears as soon as its pause is over (decided, or the
request ended). An answer typed while disconnected is queued, up to
:data:`OUTBOX_MAX`, and sent on reconnect; beyond that it is refused, and
either way the terminal says so. ``relay tail`` installs its own SIGINT and
SIGTERM handlers, so it stops on Ctrl-C even when started with SIGINT
ignored (``relay tail ... &`` in a script, ``nohup relay tail ... &``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import signal
import sys
from typing import Any, TextIO

import websockets

from relay.aio import cancel_and_wait
from relay.tools.render import TreeRenderer, remember, sanitize, short

BUDGET_PROMPT = "Continue? [y/n] "
_CLEAR_LINE = "\r\x1b[K"
OUTBOX_MAX = 16
"""Answers kept for sending while disconnected; more are refused, not dropped silently."""
_ROOT_END = ("agent_completed", "agent_failed", "agent_cancelled")
_REQUEST_END = ("workflow_run_completed", "workflow_run_failed")


class Console:
    """Connects to a gateway and prints its stream until stopped.

    ``request_ids`` narrows the stream to those requests (and makes it
    resumable); without them the gateway sends every event of the tenant.
    ``interactive`` answers budget pauses from ``stdin`` lines.
    """

    def __init__(
        self,
        url: str,
        *,
        request_ids: list[str],
        after_seq: int | None = None,
        raw_json: bool = False,
        interactive: bool = False,
        out: TextIO = sys.stdout,
    ) -> None:
        self.url = url
        self.request_ids = request_ids
        self.raw_json = raw_json
        self.interactive = interactive
        self.out = out
        self.live = not raw_json and out.isatty()
        self.renderer = TreeRenderer(live_counter=self.live)
        # Where to resume each request after a reconnect: the last seq shown.
        self.last_seq: dict[str, int] = {}
        self.epoch: dict[str, str] = {}
        if after_seq is not None:
            self.last_seq = dict.fromkeys(request_ids, after_seq)
        self.prompts: list[str] = []
        """Requests waiting for a y/n answer, oldest first."""
        self.connected = False
        # Commands not yet handed to a live connection, oldest first; bounded
        # by answer(), which refuses (and says so) rather than grow it.
        self._outbox: collections.deque[dict[str, Any]] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._roots: dict[str, str] = {}
        """Root agent id of each request seen spawning one: its end ends the request."""
        self._commands = 0
        self._status_shown = False
        self._prompt_open = False
        """A non-live prompt was printed without a newline after it."""

    async def run(self) -> None:
        """Stream until cancelled, reconnecting with capped, jittered backoff."""
        delay = 0.5
        connected_once = False
        while True:
            try:
                async with websockets.connect(self.url, max_size=None, open_timeout=5) as ws:
                    delay = 0.5
                    following = ", ".join(map(short, self.request_ids)) or "every request"
                    self._notice(f"connected to {self.url}, following {following}")
                    if connected_once and not self.request_ids:
                        self._emit(["reconnected (events published meanwhile are not replayed;"
                                    " --request-id resumes)"])  # fmt: skip
                    connected_once = True
                    try:
                        await self._serve(ws)
                    finally:
                        self.connected = False
                self._notice("connection closed by the gateway")
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                self._notice(f"connection failed: {exc or type(exc).__name__}")
            if self._outbox:
                self._notice(f"{len(self._outbox)} answer(s) queued, sent when reconnected")
            wait = delay * random.uniform(0.7, 1.3)
            self._notice(f"reconnecting in {wait:.1f}s")
            await asyncio.sleep(wait)
            delay = min(delay * 2, 10.0)

    async def _serve(self, ws: Any) -> None:
        for rid in self.request_ids:
            command: dict[str, Any] = {"type": "subscribe", "request_id": rid}
            if rid in self.last_seq:
                command["after_seq"] = self.last_seq[rid]
                if rid in self.epoch:
                    command["epoch"] = self.epoch[rid]
            else:
                # Joining: the request as it stands, texts so far included,
                # in one frame; live events follow from its seq.
                command["snapshot"] = True
            await ws.send(json.dumps(command))
        self.connected = True
        sender = asyncio.create_task(self._send_loop(ws), name="relay-tail-sender")
        try:
            async for message in ws:
                self.on_message(message if isinstance(message, str) else message.decode())
        finally:
            await cancel_and_wait(sender)

    async def _send_loop(self, ws: Any) -> None:
        """Send queued commands; one leaves the queue only once the socket took it."""
        while True:
            while not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            await ws.send(json.dumps(self._outbox[0]))
            self._outbox.popleft()

    # ------------------------------------------------------------ frames

    def on_message(self, text: str) -> None:
        """Handle one text frame from the gateway."""
        try:
            frame = json.loads(text)
        except ValueError:
            return  # like the original clients: ignore what cannot be parsed
        if not isinstance(frame, dict):
            return
        self._track(frame)
        if self.raw_json:
            self._emit([text])
        else:
            self._emit(self.renderer.feed(frame))
        kind, rid = frame.get("type"), frame.get("request_id")
        if not isinstance(rid, str):
            return
        if kind in ("budget_warning", "budget_pending") and self.interactive:
            if rid not in self.prompts:
                self.prompts.append(rid)
                self._ask()
        elif rid in self.prompts and (kind == "budget_decision" or self._request_ended(frame)):
            # Answered elsewhere, the timeout decided, or the request is over:
            # the question is moot, so it must not stay on screen.
            self.prompts.remove(rid)
            if not self.live:
                self._notice(f"budget pause of {short(rid)} is over, no answer needed")
            self._ask()

    def _request_ended(self, frame: dict[str, Any]) -> bool:
        """True for the frame that ends its request: the root's end, a run's end, an outcome."""
        kind, rid = frame.get("type"), str(frame.get("request_id"))
        if kind in _ROOT_END and str(frame.get("agent_id")) == self._roots.get(rid):
            return not (kind == "agent_failed" and frame.get("will_retry"))
        if kind == "snapshot":
            return bool(frame.get("outcome")) and not frame.get("pending_decision")
        return kind in _REQUEST_END

    def _track(self, frame: dict[str, Any]) -> None:
        kind, rid = frame.get("type"), frame.get("request_id")
        if not isinstance(rid, str):
            return
        if kind == "agent_spawned" and frame.get("parent_id") is None:
            remember(self._roots, rid, str(frame.get("agent_id")))
        if kind == "snapshot":
            for agent in frame.get("agents") or []:
                if isinstance(agent, dict) and agent.get("parent_id") is None:
                    remember(self._roots, rid, str(agent.get("agent_id")))
            if isinstance(frame.get("epoch"), str):
                self.epoch[rid] = frame["epoch"]
            if isinstance(frame.get("seq"), int):
                # Live events follow from here; a reconnect resumes after it.
                remember(self.last_seq, rid, frame["seq"])
        elif kind == "subscribed":
            if isinstance(frame.get("epoch"), str):
                self.epoch[rid] = frame["epoch"]
            # Live from here unless we asked to resume from an earlier seq.
            self.last_seq.setdefault(rid, int(frame.get("seq") or 0))
        elif kind == "resync_required":
            if frame.get("reason") == "epoch_changed":
                self.last_seq[rid] = 0  # a new incarnation starts over at seq 1
            elif isinstance(frame.get("last_seq"), int):
                self.last_seq[rid] = frame["last_seq"]
            if isinstance(frame.get("epoch"), str):
                self.epoch[rid] = frame["epoch"]
        elif isinstance(frame.get("seq"), int) and "ts" in frame:
            remember(self.last_seq, rid, frame["seq"])

    # ------------------------------------------------------------ prompts

    def answer(self, line: str) -> None:
        """A line typed on the terminal: the answer to the oldest pending prompt."""
        self._prompt_open = False  # the terminal echoed the typed line and its newline
        if not self.prompts:
            return
        word = line.strip().lower()
        if word not in ("y", "yes", "n", "no"):
            self._ask()
            return
        rid = self.prompts.pop(0)
        decision = "budget_continue" if word.startswith("y") else "budget_stop"
        if len(self._outbox) >= OUTBOX_MAX:
            self._notice(
                f"{decision} for {short(rid)} NOT sent: not connected and "
                f"{OUTBOX_MAX} answers already wait; answer again once reconnected"
            )
            self.prompts.insert(0, rid)
            self._ask()
            return
        self._commands += 1
        self._outbox.append(
            {"type": decision, "request_id": rid, "command_id": f"tail-{self._commands}"}
        )
        self._outbox_ready.set()
        if not self.connected:
            self._notice(
                f"not connected: {decision} for {short(rid)} queued, sent when reconnected"
            )
        self._ask()

    def _ask(self) -> None:
        if not self.prompts:
            self._redraw()
            return
        if self.live:
            self._redraw()
        else:
            rid = sanitize(self.prompts[0])
            print(f"budget pause of {rid}: {BUDGET_PROMPT}", end="", file=sys.stderr)
            sys.stderr.flush()
            self._prompt_open = True

    # ------------------------------------------------------------ output

    def _notice(self, text: str) -> None:
        # Error texts can quote the peer (a close reason), so they are untrusted too.
        start = "\n" if self._prompt_open else ""
        self._prompt_open = False
        status_shown = self._status_shown
        if status_shown:
            # Same terminal: take the status line away, say it, put it back below.
            self.out.write(_CLEAR_LINE)
            self.out.flush()
            self._status_shown = False
        print(f"{start}relay tail: {sanitize(text)}", file=sys.stderr, flush=True)
        if status_shown:
            self._redraw()

    def _emit(self, lines: list[str]) -> None:
        if not lines and not (self.live and self.renderer.counter):
            return
        if self._status_shown:
            self.out.write(_CLEAR_LINE)
            self._status_shown = False
        for line in lines:
            # The renderer sanitises already; raw --json text is sanitised here
            # (JSON may carry C1 controls unescaped).
            self.out.write(sanitize(line) + "\n")
        self._redraw()

    def _redraw(self) -> None:
        if not self.live:
            self.out.flush()
            return
        status = self.renderer.counter or ""
        if self.prompts:
            rid = sanitize(short(self.prompts[0]))
            status = f"{status}  budget pause of {rid}: {BUDGET_PROMPT}"
        self.out.write(_CLEAR_LINE + status)
        self._status_shown = bool(status)
        self.out.flush()

    def close(self) -> None:
        """End the live status line so the shell prompt starts on a fresh line."""
        if self._status_shown:
            self.out.write("\n")
            self.out.flush()
            self._status_shown = False


async def _tail(args: argparse.Namespace) -> None:
    interactive = not args.no_input and sys.stdin.isatty()
    console = Console(
        args.url,
        request_ids=list(args.request_id),
        after_seq=args.after_seq,
        raw_json=args.json,
        interactive=interactive,
    )
    loop = asyncio.get_running_loop()
    if interactive:
        # Read the terminal without a thread: the line discipline hands over
        # whole lines, so a readable stdin means a complete answer.
        def on_stdin() -> None:
            line = sys.stdin.readline()
            if not line:
                loop.remove_reader(sys.stdin.fileno())
                return
            console.answer(line)

        loop.add_reader(sys.stdin.fileno(), on_stdin)
    # Our own handlers, whatever was inherited: started with SIGINT ignored
    # (`cmd &` in a script, `nohup cmd &`) Python installs none and Ctrl-C
    # would do nothing; SIGTERM would kill it without ending the status line.
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(console.run(), name="relay-tail")
    stopper = asyncio.create_task(stop.wait(), name="relay-tail-stop")
    try:
        await asyncio.wait(
            [runner, stopper], timeout=args.exit_after, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        await cancel_and_wait(runner, stopper)
        for sig in signals:
            loop.remove_signal_handler(sig)
        if interactive:
            loop.remove_reader(sys.stdin.fileno())
        console.close()
    failure = None if runner.cancelled() else runner.exception()
    if failure is not None:
        raise failure


def run_tail(args: argparse.Namespace) -> int:
    """``relay tail``: print the stream until ``--exit-after``, Ctrl-C or SIGTERM; exits 0."""
    # A Ctrl-C before the loop's handlers are in place still ends quietly.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(args))
    return 0
