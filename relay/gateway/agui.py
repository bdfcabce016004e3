"""``POST /agui/requests/{request_id}``: a relay request as an AG-UI run over SSE.

AG-UI's HTTP transport: the client POSTs a ``RunAgentInput`` and reads the
run's events from the response, ``text/event-stream``, one ``data:`` line of
JSON per event. The stream is fed like a WebSocket client's: this process's
hub (one pub/sub connection, each event parsed once), a bounded
:class:`~relay.gateway.sendqueue.SendQueue` with the configured overflow
policy, and an :class:`~relay.gateway.writer.OrderedWriter` that sends each
event once in seq order, replaying history for a resume, a lag or a hub
reconnect. The writer's output is turned into AG-UI events by
:class:`~relay.wire.agui_map.AguiRun` here, per client (the mapping depends
on what this client's run has opened).

Auth, tenancy and limits are the WebSocket's: a bearer token
(``Authorization`` or ``?token=``) with ``view`` on the request, the
per-process and per-subject connection caps, the replay budget. A budget
answer carried in ``resume`` needs ``decide``.

Example (a curl client)::

    curl -N -H 'Content-Type: application/json' -H 'Authorization: Bearer …' \\
      -d '{"threadId":"t","runId":"r1","messages":[]}' \\
      http://gateway:8000/agui/requests/6f3b…
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, cast

from starlette.types import Send
from starlette.websockets import WebSocket

from relay.gateway.auth import Principal
from relay.gateway.envelope import Envelope, history_seq
from relay.gateway.hub import TenantHub
from relay.gateway.sendqueue import Begin, Reset, SendQueue
from relay.gateway.writer import OrderedWriter
from relay.logs import LogOnce
from relay.wire.agui_input import RunInput, budget_answers, resume_cursor
from relay.wire.agui_map import AguiRun, Event
from relay.wire.agui_state import adopt_state, from_relay_snapshot, initial_state
from relay.wire.commands import CommandError
from relay.wire.events import EVENT_TYPES

if TYPE_CHECKING:
    from relay.gateway.app import Services

log = logging.getLogger(__name__)
log_once = LogOnce(log)

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    # Proxies and CDNs must pass each event on at once, and keep none.
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
}

HEARTBEAT = {"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True}


def sse(events: list[Event]) -> bytes:
    """The SSE messages of ``events``: one ``data:`` line each (JSON has no raw newline)."""
    return b"".join(
        b"data: " + json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
        for e in events
    )


class FrameCache:
    """Decoded frames shared by this process's AG-UI streams: one ``json.loads`` per event.

    The writer hands every stream the same frame text object (the hub's
    :class:`Envelope` holds it), so it is looked up by identity; the cache
    keeps the text alive, which keeps its id from being reused. Bounded by
    count and characters, least recently used out first. The mapper never
    changes a decoded frame.

    >>> cache = FrameCache(2)
    >>> text = '{"type":"ping"}'
    >>> cache.decode(text) is cache.decode(text)
    True
    """

    def __init__(self, size: int = 4096, chars: int = 8 << 20) -> None:
        self.size, self.chars, self.held = size, chars, 0
        self._items: OrderedDict[int, tuple[str, dict[str, Any]]] = OrderedDict()

    def decode(self, text: str) -> dict[str, Any]:
        """The decoded frame (decoded once while it is cached)."""
        key = id(text)
        hit = self._items.get(key)
        if hit is not None and hit[0] is text:
            self._items.move_to_end(key)
            return hit[1]
        frame: dict[str, Any] = json.loads(text)
        if hit is not None:
            self.held -= len(hit[0])  # a dead text's id, reused
        self._items[key] = (text, frame)
        self.held += len(text)
        while self._items and (len(self._items) > self.size or self.held > self.chars):
            self.held -= len(self._items.popitem(last=False)[1][0])
        return frame


FRAMES = FrameCache()
"""The process's cache (no I/O, no task: created at import like a constant)."""


class Finished(Exception):
    """The run ended (RUN_FINISHED / RUN_ERROR written): stop the writer."""


class AguiSession:
    """One AG-UI run attached to one request: the hub's subscriber and the writer's sink."""

    def __init__(
        self, svc: Services, hub: TenantHub, principal: Principal, rid: str, run: RunInput
    ) -> None:
        self.svc, self.hub, self.principal, self.rid, self.input = svc, hub, principal, rid, run
        gw = svc.config.gateway
        self.queue = SendQueue(
            gw.send_queue_max,
            gw.send_queue_max_bytes,
            gw.overflow_policy,
            svc.metrics,
            max_lagged=gw.firehose_track_requests,
            turns=svc.turns,
        )
        self.limits = svc.limits.for_connection()
        # The writer sends to this session instead of a socket (send_text below).
        self.writer = OrderedWriter(
            cast(WebSocket, self),
            self.queue,
            hub.store,
            svc.config,
            svc.metrics,
            wants=lambda r: r == rid,
            subscribed=lambda r: r == rid,
            runs=set(),
            replay_budget=self.limits.spend_replay,  # limits: replay volume
        )
        self.hold: deque[Envelope] | None = deque(maxlen=gw.send_queue_max)
        self.run = AguiRun(run.threadId, run.runId, initial_state(rid))
        self.epoch: str | None = None
        self.send: Send | None = None
        self.done = asyncio.Event()
        self._lock = asyncio.Lock()

    # ---------------------------------------------------------------- hub side

    def offer(self, envelope: Envelope) -> None:
        """Called by the hub for every event of the request (never blocks)."""
        if self.hold is not None:
            self.hold.append(envelope)  # while the start is prepared; oldest dropped, refilled
        else:
            self.queue.push_event(envelope)

    def stream_reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        """Called by the hub when the request's stream restarted in a new epoch."""
        self.queue.push_control(Reset(request_id, epoch, reason))

    # ---------------------------------------------------------------- start

    async def prepare(self) -> list[Event]:
        """Subscribe, answer a budget pause, and choose where the stream continues.

        Returns the run's first events; the writer is primed to continue
        after them. Raises :class:`HubUnavailable` / ``RedisError`` before
        anything is sent, :class:`CommandError` for an answer refused.
        """
        store, rid = self.hub.store, self.rid
        await self.hub.watch(rid, self)
        pos = await store.position(rid)
        self.epoch = pos.epoch
        adopted = adopt_state(self.input.state, rid)
        cursor = resume_cursor(self.input, adopted)
        notices: list[Event] = []
        state = adopted if adopted is not None else initial_state(rid, pos.epoch)
        last = 0
        if cursor is not None:
            if cursor.epoch is not None and pos.epoch is not None and cursor.epoch != pos.epoch:
                # Redis lost the stream: the new incarnation is replayed from
                # its start, and its text continues each agent's message.
                notices.append(self.run.notice("epoch_changed", {"epoch": pos.epoch}))
            elif cursor.seq > pos.seq:
                raise CommandError("ahead_of_stream", f"seq {cursor.seq} is past the stream")
            else:
                last = cursor.seq
        snap = None
        if last == 0 and cursor is None and pos.seq:
            # A first attach renders from the snapshot when it carries every
            # agent's whole text (compact catch-up), else replays history.
            snap = await store.snapshot(rid)
            texts = snap.get("texts")
            whole = isinstance(texts, dict) and not any(
                isinstance(t, dict) and t.get("truncated") for t in texts.values()
            )
            if not whole or snap.get("text_seq", snap["seq"]) != snap["seq"]:
                snap = None
        if snap is None and last < pos.seq and not await self._history_reaches(last + 1):
            # History no longer covers the client's position (or the start):
            # the state comes from the snapshot, the text from there on.
            snap = await store.snapshot(rid)
            notices.append(self.run.notice("history_trimmed", {"from_seq": snap["seq"]}))
        if snap is not None:
            state = from_relay_snapshot(snap)
            last = state["relay"]["seq"]
            self.run.state = state
            if isinstance(snap.get("texts"), dict):
                notices += self.run.texts_so_far(snap["texts"], last, pos.epoch)
        state["relay"] = {"epoch": pos.epoch, "seq": last}
        self.run.state = state
        first = self.run.start(notices)
        if self.run.finished:
            return first
        first += await self._answer(resumed=cursor is not None)
        if not self.run.finished:
            self.queue.push_control(Begin(rid, pos.epoch, last, [], pos.seq))
        return first

    async def _history_reaches(self, seq: int) -> bool:
        history = self.hub.keys.request(self.rid).history
        head = await self.hub.store.redis.xrange(history, min="-", max="+", count=1)
        first = head[0][0] if head else None
        return first is not None and history_seq(first) <= seq

    async def _answer(self, *, resumed: bool) -> list[Event]:
        """Apply the budget answers of ``resume``; a pause still open and not
        addressed by a resumed run ends it with the interrupt at once."""
        out: list[Event] = []
        pending = await self.hub.store.pending_decision(self.rid)
        addressed = False
        for answer in budget_answers(self.input):
            current = pending is not None and answer.pause_id == pending.get("pause_id")
            addressed = addressed or current
            if answer.decision is None:
                continue  # the person abandoned it: the pause runs to its deadline
            if not current:
                out.append(self.run.notice("resume_not_applied", {"interruptId": answer.pause_id}))
                continue
            command = {
                "type": f"budget_{answer.decision}",
                "request_id": self.rid,
                "pause_id": answer.pause_id,
            }
            try:
                await self.svc.actions.execute_raw(command, self.principal)
            except CommandError as exc:
                if exc.code != "no_pending_decision":
                    return out + self.run.error(f"relay.{exc.code}", exc.message)
                out.append(self.run.notice("resume_not_applied", {"interruptId": answer.pause_id}))
            pending = None
        if pending is not None and resumed and not addressed:
            out += self.run.interrupt(pending)
        return out

    # ---------------------------------------------------------------- writer side

    async def send_text(self, text: str) -> None:
        """The writer's output: a relay frame (event or control), as AG-UI events."""
        if self.run.finished:
            raise Finished
        frame = FRAMES.decode(text)
        kind = frame.get("type")
        if kind in EVENT_TYPES and "seq" in frame and frame.get("request_id") == self.rid:
            if self.epoch is None:
                self.epoch = (await self.hub.store.position(self.rid)).epoch
            pending = None
            if kind == "budget_warning":
                # The orchestrator opens the pause before it publishes the
                # warning, so an open pause is this one (or none: answered).
                pending = await self.hub.store.pending_decision(self.rid)
            events = self.run.feed(frame, self.epoch, pending)
        elif kind == "resync_required":
            reason = str(frame.get("reason"))
            if reason == "epoch_changed":
                self.epoch = frame.get("epoch")
                events = self.run.new_epoch(self.epoch)
            else:
                # The client starts another run: it continues from its state.
                events = self.run.error(f"relay.{reason}", f"the stream cannot go on: {reason}")
        else:
            return  # subscribed, lagged (the refill follows), budget_pending
        await self.write(events)
        if self.run.finished:
            self.done.set()
            raise Finished

    async def write(self, events: list[Event]) -> None:
        """Send ``events`` as one chunk."""
        if events and self.send is not None:
            async with self._lock:
                await self.send(
                    {"type": "http.response.body", "body": sse(events), "more_body": True}
                )

    async def heartbeat(self) -> None:
        """A comment now and then: proxies keep a quiet stream open (clients ignore it)."""
        while True:
            await asyncio.sleep(self.svc.config.gateway.ping_interval)
            if self.send is not None:
                async with self._lock:
                    await self.send(HEARTBEAT)

    async def expiry(self) -> None:
        """End the run when the token expires (the client refreshes and starts another)."""
        exp = self.principal.exp
        if exp is None:
            await asyncio.Event().wait()
            return
        await asyncio.sleep(max(0.0, exp + self.svc.config.auth.leeway_seconds - time.time()))
        await self.write(self.run.error("relay.token_expired", "token expired"))
