"""One WebSocket client: a reader for commands and a writer draining a bounded queue.

The queue holds two kinds of items, kept in arrival order:

* events (:class:`Envelope`, shared with every other connection): bounded by
  count and bytes; when full, the overflow policy applies. ``drop_oldest``
  (the default) drops the oldest events and later tells the client
  ``{"type":"lagged",...}``, then brings it back from history so it still
  sees a continuous sequence; ``close`` closes with 1013 (try again later);
* control items (replies, errors, resets, replays): never dropped, but a
  client that floods commands without reading is closed with 1008.

The writer sends each request's events strictly in ``seq`` order: a seq at or
below the last one sent is a duplicate and skipped, a seq beyond the next one
is a gap and filled from the history stream first (a resume, a lag or a hub
reconnect all end up here). History that no longer covers the gap yields
``resync_required`` instead of a silent hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..commands import (
    Command,
    CommandError,
    Ping,
    Subscribe,
    SubscribeWorkflow,
    Unsubscribe,
    UnsubscribeWorkflow,
    error_frame,
    parse_command,
)
from ..config import GlobalConfig
from .envelope import Envelope
from .hub import Hub, HubUnavailable, stop_task
from .metrics import Metrics
from .store import HistoryGap, RequestStore

log = logging.getLogger(__name__)

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008
MAX_CONTROL_ITEMS = 1024


class CommandHandler(Protocol):
    """Executes the commands that change durable state (cancel, budget answers)."""

    async def __call__(self, command: Command) -> dict[str, Any]: ...


@dataclass(slots=True)
class _Track:
    last: int | None
    epoch: str | None


@dataclass(slots=True)
class _Begin:
    """The start of a subscription, applied by the writer in queue order.

    Setting the request's position when the command is handled (rather than
    when the writer reaches this item) let events of the same request that
    were already queued (a firehose connection narrowing itself, or a second
    ``subscribe``) be sent against the new position: the client got them
    twice, or out of order. Everything queued before this item belongs to the
    previous stream; the reply frames come next, then history after ``last``
    up to ``replay_until``, then live events.
    """

    request_id: str
    epoch: str | None
    last: int
    frames: list[str]
    replay_until: int | None


@dataclass(slots=True)
class _Lag:
    """Events of one request dropped from a full queue: how many, and which range."""

    count: int
    first: int
    last: int
    epoch: str


@dataclass(slots=True)
class _Reset:
    request_id: str
    epoch: str | None
    reason: str


_Control = str | _Begin | _Reset


@dataclass(slots=True)
class _Sub:
    hold: bool = True
    pending: list[Envelope] = field(default_factory=list)


def dumps(obj: dict[str, Any]) -> str:
    """Compact JSON text of a control frame."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class Connection:
    """Serves one client from accept to close."""

    def __init__(
        self,
        websocket: WebSocket,
        hub: Hub,
        config: GlobalConfig,
        metrics: Metrics,
        handler: CommandHandler,
    ) -> None:
        self.ws = websocket
        self.hub = hub
        self.store: RequestStore = hub.store
        self.config = config
        self.metrics = metrics
        self.handler = handler
        self._events: deque[tuple[int, Envelope]] = deque()
        self._control: deque[tuple[int, _Control]] = deque()
        self._counter = 0
        self._bytes = 0
        self._wake = asyncio.Event()
        self._skipped: dict[str, _Lag] = {}
        # Set when the queue overflows and the connection must be closed. The
        # writer may be blocked in a send to a client that reads nothing, so
        # run() waits for this too and then cancels the writer: before, the
        # flag was only seen by the writer, i.e. never for a stalled client,
        # while the close policy kept queueing every event (unbounded memory).
        self._close_code: int | None = None
        self._overflow = asyncio.Event()
        self._subs: dict[str, _Sub] = {}
        self._firehose = False
        self._runs: set[str] = set()
        self._tracks: OrderedDict[str, _Track] = OrderedDict()
        self._max_events = config.gateway.send_queue_max
        self._max_bytes = config.gateway.send_queue_max_bytes
        self._drop_oldest = config.gateway.overflow_policy == "drop_oldest"

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Accept, serve until the client leaves, then release everything."""
        await self.ws.accept()
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        writer = asyncio.create_task(self._write_loop(), name="relay-conn-writer")
        overflow = asyncio.create_task(self._overflow.wait(), name="relay-conn-overflow")
        tasks = [writer, overflow]
        try:
            await self._start_from_query()
            reader = asyncio.create_task(self._read_loop(), name="relay-conn-reader")
            tasks.append(reader)
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            try:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    await _stop(task)
            finally:
                # Release even when we are cancelled ourselves while stopping;
                # the hub's interest goes first: an overflowed connection may
                # wait a while for its close frame, and takes no events meanwhile.
                await self._release()
                if self._close_code is not None:
                    await self._close_overflowed(self._close_code)
                self.metrics.connections.dec()

    async def _close_overflowed(self, code: int) -> None:
        # A client that reads nothing keeps the transport paused and every
        # send waiting; wait for it at most ping_timeout (a peer that reads
        # nothing for that long is gone), then let the server drop the socket.
        try:
            async with asyncio.timeout(self.config.gateway.ping_timeout):
                await self._close(code, "send queue overflow")
        except TimeoutError:
            log.info("client did not read its close frame within ping_timeout; dropping it")

    async def _release(self) -> None:
        # A disconnect never cancels anything: it only drops local interest.
        for rid in list(self._subs):
            await self.hub.unwatch(rid, self)
        self._subs.clear()
        await self.hub.unwatch_all(self)

    async def _start_from_query(self) -> None:
        """``?request_id=R&after_seq=N`` subscribes at connect (no first frame needed)."""
        params = self.ws.query_params
        rids = params.getlist("request_id")
        if not rids:
            await self._go_firehose()
            return
        for rid in rids:
            raw: dict[str, Any] = {"type": "subscribe", "request_id": rid}
            if (after := params.get("after_seq")) is not None:
                raw["after_seq"] = after
            if (epoch := params.get("epoch")) is not None:
                raw["epoch"] = epoch
            if params.get("snapshot") in ("1", "true"):
                raw["snapshot"] = True
            await self._handle_text(dumps(raw))

    async def _go_firehose(self) -> None:
        # The hub keeps this interest even when it cannot make it live now
        # (Redis down): it subscribes again and backfills once it reconnects.
        # Before, the flag was set only on success, so a client that connected
        # during an outage was registered with the hub but dropped every event
        # it was offered, for as long as it stayed connected.
        self._firehose = True
        try:
            await self.hub.watch_all(self)
        except HubUnavailable as exc:
            self._reply(error_frame("unavailable", str(exc)))

    # ---------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        limit = self.config.gateway.max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                data = message.get("bytes") or b""
                if len(data) > limit:
                    self._reply(error_frame("frame_too_large", f"frame exceeds {limit} bytes"))
                    continue
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    self._reply(error_frame("invalid_json", "binary frame is not UTF-8"))
                    continue
            if len(text) > limit:
                self._reply(error_frame("frame_too_large", f"frame exceeds {limit} bytes"))
                continue
            await self._handle_text(text)

    async def _handle_text(self, text: str) -> None:
        try:
            command = parse_command(text)
        except CommandError as exc:
            self.metrics.commands.labels(type="invalid", outcome=exc.code).inc()
            self._reply(exc.frame())
            return
        try:
            reply = await self._execute(command)
        except CommandError as exc:
            exc.command_id = command.command_id
            self.metrics.commands.labels(type=command.type, outcome=exc.code).inc()
            self._reply(exc.frame())
            return
        self.metrics.commands.labels(type=command.type, outcome="ok").inc()
        if reply is not None:
            if command.command_id is not None:
                reply["command_id"] = command.command_id
            self._reply(reply)

    async def _execute(self, command: Command) -> dict[str, Any] | None:
        if isinstance(command, Ping):
            return {"type": "pong"}
        if isinstance(command, Subscribe):
            await self._subscribe(command)
            return None
        if isinstance(command, Unsubscribe):
            return await self._unsubscribe(str(command.request_id))
        if isinstance(command, SubscribeWorkflow):
            self._runs.add(str(command.run_id))
            return {"type": "workflow_subscribed", "run_id": str(command.run_id)}
        if isinstance(command, UnsubscribeWorkflow):
            self._runs.discard(str(command.run_id))
            # The original sent no reply; one comes only when asked for by id.
            if command.command_id is None:
                return None
            return {"type": "workflow_unsubscribed", "run_id": str(command.run_id)}
        return await self.handler(command)

    async def _subscribe(self, cmd: Subscribe) -> None:
        rid = str(cmd.request_id)
        if rid not in self._subs:
            self._subs[rid] = sub = _Sub()
            try:
                await self.hub.watch(rid, self)
            except HubUnavailable as exc:
                del self._subs[rid]
                await self.hub.unwatch(rid, self)
                raise CommandError("unavailable", str(exc)) from None
        else:
            sub = self._subs[rid]
            sub.hold = True
        if self._firehose:
            self._firehose = False
            await self.hub.unwatch_all(self)
        try:
            await self._start_subscription(rid, cmd)
        finally:
            pending, sub.pending, sub.hold = sub.pending, [], False
            for env in pending:
                self._push_event(env)

    async def _start_subscription(self, rid: str, cmd: Subscribe) -> None:
        pos = await self.store.position(rid)
        reply: dict[str, Any] = {
            "type": "subscribed",
            "request_id": rid,
            "epoch": pos.epoch,
            "seq": pos.seq,
        }
        if cmd.command_id is not None:
            reply["command_id"] = cmd.command_id
        frames = [dumps(reply)]
        start = pos.seq
        if cmd.snapshot:
            snap = await self.store.snapshot(rid)
            start = snap["seq"]
            frames.append(dumps(snap))
        pending = await self.store.pending_decision(rid)
        if pending is not None:
            frames.append(dumps({"type": "budget_pending", "request_id": rid, **pending}))
        last, replay_until = start, None
        if cmd.after_seq is None or cmd.snapshot:
            pass
        elif cmd.epoch is not None and pos.epoch is not None and cmd.epoch != pos.epoch:
            frames.append(dumps(self._resync(rid, pos.epoch, "epoch_changed", last_seq=pos.seq)))
        elif cmd.after_seq > pos.seq:
            frames.append(dumps(self._resync(rid, pos.epoch, "ahead_of_stream", last_seq=pos.seq)))
        else:
            last, replay_until = cmd.after_seq, pos.seq
        self._enqueue_control(_Begin(rid, pos.epoch, last, frames, replay_until))

    async def _unsubscribe(self, rid: str) -> dict[str, Any]:
        if self._subs.pop(rid, None) is not None:
            await self.hub.unwatch(rid, self)
            self._tracks.pop(rid, None)
            self._skipped.pop(rid, None)
        if not self._subs and not self._firehose:
            # No subscription left: back to every event, like the original.
            await self._go_firehose()
        return {"type": "unsubscribed", "request_id": rid}

    # ---------------------------------------------------------------- hub side

    def offer(self, envelope: Envelope) -> None:
        """Called by the hub for every event this connection may want."""
        if self._subs:
            sub = self._subs.get(envelope.request_id)
            if sub is None:
                return
            if sub.hold:
                sub.pending.append(envelope)
                return
        elif not self._firehose:
            return
        self._push_event(envelope)

    def stream_reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        """Called by the hub when a request's stream cannot be continued."""
        if (self._subs and request_id in self._subs) or (self._firehose and not self._subs):
            self._enqueue_control(_Reset(request_id, epoch, reason))

    def _push_event(self, env: Envelope) -> None:
        if self._close_code is not None:
            return  # closing: the queue takes nothing more
        self._counter += 1
        self._events.append((self._counter, env))
        self._bytes += env.nbytes
        while len(self._events) > self._max_events or self._bytes > self._max_bytes:
            if not self._drop_oldest:
                self._fail(CLOSE_TRY_AGAIN_LATER)
                break
            _, old = self._events.popleft()
            self._bytes -= old.nbytes
            self._note_drop(old)
            self.metrics.queue_drops.inc()
        self._wake.set()

    def _note_drop(self, old: Envelope) -> None:
        # Remember the dropped range, not just a count: the writer refills it
        # from history even when no later event of that request is queued (a
        # firehose client whose queue was flooded by another request lost the
        # tail of a finished request for good before), and even when the
        # request's very first event was dropped (no position to see a gap from).
        lag = self._skipped.get(old.request_id)
        if lag is None or lag.epoch != old.epoch:
            self._skipped[old.request_id] = _Lag(1, old.seq, old.seq, old.epoch)
            return
        lag.count += 1
        lag.first = min(lag.first, old.seq)
        lag.last = max(lag.last, old.seq)

    def _enqueue_control(self, item: _Control) -> None:
        if self._close_code is not None:
            return
        self._counter += 1
        self._control.append((self._counter, item))
        if len(self._control) > MAX_CONTROL_ITEMS:
            self._fail(CLOSE_POLICY_VIOLATION)
        self._wake.set()

    def _fail(self, code: int) -> None:
        if self._close_code is None:
            self._close_code = code
            self._overflow.set()

    def _reply(self, frame: dict[str, Any]) -> None:
        self._enqueue_control(dumps(frame))

    def _resync(self, rid: str, epoch: str | None, reason: str, **extra: Any) -> dict[str, Any]:
        self.metrics.resyncs.labels(reason=reason).inc()
        frame = {"type": "resync_required", "request_id": rid, "epoch": epoch, "reason": reason}
        return {**frame, **extra}

    # ---------------------------------------------------------------- writing

    def _track(self, rid: str) -> _Track:
        track = self._tracks.get(rid)
        if track is None:
            track = self._tracks[rid] = _Track(None, None)
            limit = self.config.gateway.firehose_track_requests
            while len(self._tracks) > limit:
                oldest = next(iter(self._tracks))
                if oldest in self._subs:
                    self._tracks.move_to_end(oldest)
                    break
                del self._tracks[oldest]
        else:
            self._tracks.move_to_end(rid)
        return track

    def _next(self) -> Envelope | _Control | None:
        if self._events and (not self._control or self._events[0][0] < self._control[0][0]):
            _, env = self._events.popleft()
            self._bytes -= env.nbytes
            return env
        if self._control:
            return self._control.popleft()[1]
        return None

    async def _write_loop(self) -> None:
        try:
            while True:
                item = self._next()
                if item is None:
                    if self._skipped:
                        await self._refill_lagged()
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if isinstance(item, Envelope):
                    await self._send_event(item)
                elif isinstance(item, str):
                    await self.ws.send_text(item)
                elif isinstance(item, _Begin):
                    await self._begin(item)
                else:
                    await self._apply_reset(item.request_id, item.epoch, item.reason)
        except WebSocketDisconnect:
            return  # the client is gone; run() releases everything

    async def _begin(self, item: _Begin) -> None:
        rid = item.request_id
        track = self._track(rid)
        track.last, track.epoch = item.last, item.epoch
        self._skipped.pop(rid, None)  # drops before this point are covered by `last`
        for frame in item.frames:
            await self.ws.send_text(frame)
        if item.replay_until is not None and item.replay_until > item.last:
            await self._replay(rid, track, item.replay_until)

    def _wants(self, rid: str) -> bool:
        return rid in self._subs if self._subs else self._firehose

    async def _refill_lagged(self) -> None:
        """The queue is empty but events were dropped: bring each request up to
        the last dropped seq from history (the next live event continues it)."""
        for rid in list(self._skipped):
            if not self._wants(rid):
                self._skipped.pop(rid, None)
                continue
            track = self._track(rid)
            await self._settle_lag(rid, track, fill=True)

    async def _settle_lag(self, rid: str, track: _Track, *, fill: bool) -> None:
        lag = self._skipped.pop(rid, None)
        if lag is None:
            return
        await self.ws.send_text(dumps({"type": "lagged", "request_id": rid, "skipped": lag.count}))
        if track.epoch is None:
            track.epoch = lag.epoch
        if lag.epoch != track.epoch:
            return  # dropped events of a stream that has since been reset
        if track.last is None:
            track.last = lag.first - 1
        if fill and lag.last > track.last:
            await self._replay(rid, track, lag.last)

    async def _apply_reset(self, rid: str, epoch: str | None, reason: str) -> None:
        # The new incarnation of the stream starts over at seq 1: forget what
        # was sent, tell the client, and continue with the new epoch.
        track = self._track(rid)
        track.last, track.epoch = 0, epoch
        self._skipped.pop(rid, None)
        await self.ws.send_text(dumps(self._resync(rid, epoch, reason)))

    async def _send_event(self, env: Envelope) -> None:
        track = self._track(env.request_id)
        if track.epoch is not None and env.epoch != track.epoch:
            await self._apply_reset(env.request_id, env.epoch, "epoch_changed")
        if track.epoch is None:
            track.epoch = env.epoch
        if env.request_id in self._skipped:
            await self._settle_lag(env.request_id, track, fill=False)
        if track.last is not None and env.seq <= track.last:
            return
        if track.last is not None and env.seq > track.last + 1:
            await self._replay(env.request_id, track, env.seq - 1)
            if env.seq <= (track.last or 0):
                return
        await self._send_frame(env)
        track.last = env.seq

    async def _send_frame(self, env: Envelope) -> None:
        if env.run_id is not None and self._runs and env.run_id not in self._runs:
            return  # workflow events of other runs, once the client chose runs
        await self.ws.send_text(env.frame)
        self.metrics.events_out.inc()
        self.metrics.bytes_out.inc(env.nbytes)
        if env.ts:
            self.metrics.latency.observe(max(0.0, time.time() - env.ts / 1000))

    async def _replay(self, rid: str, track: _Track, until: int) -> None:
        after = track.last or 0
        try:
            async for batch in self.store.replay(rid, track.epoch or "", after, until):
                for env in batch:
                    if env.seq <= (track.last or 0):
                        continue
                    await self._send_frame(env)
                    self.metrics.replayed.inc()
                    track.last = env.seq
        except HistoryGap as gap:
            track.last = until
            frame = self._resync(
                rid,
                track.epoch,
                "history_trimmed",
                first_available_seq=gap.first_available,
                last_seq=until,
            )
            await self.ws.send_text(dumps(frame))

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.ws.close(code, reason)


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it (see :func:`stop_task`); log what it raised."""
    exc = await stop_task(task)
    if exc is not None and not isinstance(exc, WebSocketDisconnect):
        log.error("%s failed", task.get_name(), exc_info=exc)
