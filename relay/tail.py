"""``relay tail``: the terminal console of a gateway's event stream.

The drawing is :class:`relay.render.TreeRenderer` (pure, tested without a
terminal). :class:`Console` does the I/O: it connects, subscribes, reconnects
with backoff resuming each request after the last seq it printed, keeps the
token counter live on a TTY, and at a budget pause asks ``Continue? [y/n]``
on the terminal and sends the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from typing import Any, TextIO

import websockets

from .aio import cancel_and_wait
from .render import TreeRenderer, remember, short

BUDGET_PROMPT = "Continue? [y/n] "
_CLEAR_LINE = "\r\x1b[K"


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
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._commands = 0
        self._status_shown = False

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
                    await self._serve(ws)
                self._notice("connection closed by the gateway")
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                self._notice(f"connection failed: {exc or type(exc).__name__}")
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
            await ws.send(json.dumps(command))
        sender = asyncio.create_task(self._send_loop(ws), name="relay-tail-sender")
        try:
            async for message in ws:
                self.on_message(message if isinstance(message, str) else message.decode())
        finally:
            await cancel_and_wait(sender)

    async def _send_loop(self, ws: Any) -> None:
        while True:
            command = await self._outbox.get()
            await ws.send(json.dumps(command))

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
        elif kind == "budget_decision" and rid in self.prompts:
            self.prompts.remove(rid)  # answered elsewhere, or the timeout decided
            self._ask()

    def _track(self, frame: dict[str, Any]) -> None:
        kind, rid = frame.get("type"), frame.get("request_id")
        if not isinstance(rid, str):
            return
        if kind == "subscribed":
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
        if not self.prompts:
            return
        word = line.strip().lower()
        if word not in ("y", "yes", "n", "no"):
            self._ask()
            return
        rid = self.prompts.pop(0)
        self._commands += 1
        decision = "budget_continue" if word.startswith("y") else "budget_stop"
        self._outbox.put_nowait(
            {"type": decision, "request_id": rid, "command_id": f"tail-{self._commands}"}
        )
        self._ask()

    def _ask(self) -> None:
        if not self.prompts:
            self._redraw()
            return
        if self.live:
            self._redraw()
        else:
            print(f"budget pause of {self.prompts[0]}: {BUDGET_PROMPT}", end="", file=sys.stderr)
            sys.stderr.flush()

    # ------------------------------------------------------------ output

    def _notice(self, text: str) -> None:
        print(f"relay tail: {text}", file=sys.stderr, flush=True)

    def _emit(self, lines: list[str]) -> None:
        if not lines and not (self.live and self.renderer.counter):
            return
        if self._status_shown:
            self.out.write(_CLEAR_LINE)
            self._status_shown = False
        for line in lines:
            self.out.write(line + "\n")
        self._redraw()

    def _redraw(self) -> None:
        if not self.live:
            self.out.flush()
            return
        status = self.renderer.counter or ""
        if self.prompts:
            status = f"{status}  budget pause of {short(self.prompts[0])}: {BUDGET_PROMPT}"
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
    try:
        if args.exit_after is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.exit_after):
                    await console.run()
        else:
            await console.run()
    finally:
        if interactive:
            loop.remove_reader(sys.stdin.fileno())
        console.close()


def run_tail(args: argparse.Namespace) -> int:
    """``relay tail``: print the stream until ``--exit-after`` or Ctrl-C; exits 0."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(args))
    return 0
