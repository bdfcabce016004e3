"""The writer of one connection: drains its send queue in per-request seq order.

Each request's events go out strictly in ``seq`` order (a
:class:`~relay.gateway.seqtrack.SeqTrack` per request): a seq at or below the
last one sent is a duplicate and skipped; a seq beyond the next one is a gap,
filled from the history stream first (a resume, a lag or a hub reconnect all
end up here). History that no longer covers the gap yields
``resync_required`` instead of a silent hole. Dropped ranges recorded by the
queue are announced (``lagged``) and refilled the same way.

Writers take turns (:class:`~relay.gateway.sendqueue.SendTurns`): a send to a
socket whose buffer has room does not suspend, so a writer with a full queue
would otherwise hold the event loop for its whole queue, and with thousands
of them pings, new connections and the delivery probe starve until the
gateway looks dead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from relay.config import GlobalConfig
from relay.gateway.directsend import Resumed, start
from relay.gateway.envelope import Envelope
from relay.gateway.metrics import LATENCY_SAMPLE, Metrics
from relay.gateway.sendqueue import Begin, SendQueue, SendTurns
from relay.gateway.seqtrack import SeqTable, SeqTrack, Step
from relay.gateway.shortcut import SERVER_SEND
from relay.gateway.store import HistoryGap, RequestStore

log = logging.getLogger(__name__)


def dumps(obj: dict[str, Any]) -> str:
    """Compact JSON text of a control frame."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class OrderedWriter:
    """Sends a connection's queue to its socket."""

    def __init__(
        self,
        ws: WebSocket,
        queue: SendQueue,
        store: RequestStore,
        config: GlobalConfig,
        metrics: Metrics,
        *,
        wants: Callable[[str], bool],
        subscribed: Callable[[str], bool],
        runs: set[str],
        replay_budget: Callable[[int], bool] | None = None,
    ) -> None:
        self.ws = ws
        self.queue = queue
        self.store = store
        self.metrics = metrics
        self.wants = wants
        """Whether the connection still wants events of a request."""
        self.runs = runs
        """Workflow runs the client chose (empty: all)."""
        self.turns: SendTurns = queue.turns
        self.replay_budget = replay_budget
        """Charged each replayed event's bytes; False: this minute's replay is spent."""
        # Unsubscribed (tenant-wide) tracks are evicted LRU-first; explicitly
        # subscribed ones never are.
        self.tracks = SeqTable(config.gateway.firehose_track_requests, subscribed)
        self._quota = 1
        # Delivery metrics are added up here and flushed once per drain: a
        # prometheus counter takes a lock on every update.
        self._sent = 0
        self._bytes = 0
        self._server_send: Send | None = (
            ws.scope.get(SERVER_SEND) if isinstance(ws, WebSocket) else None
        )
        """The server's own ``send`` (:mod:`~relay.gateway.shortcut`); None: through Starlette."""
        self._parked = False
        """Waiting for work on an empty queue: the hub may send for it (:meth:`offer_direct`)."""
        self._stopped = False
        """:meth:`stop` was called: the hub sends nothing more for it."""
        self._resumed: Resumed | None = None
        """A direct send that suspended: finished by this writer before anything else."""

    def forget(self, request_id: str) -> None:
        """The client unsubscribed: drop what was sent and dropped of ``request_id``."""
        self.tracks.pop(request_id)
        self.queue.take_lag(request_id)

    def resync(self, rid: str, epoch: str | None, reason: str, **extra: Any) -> dict[str, Any]:
        """A ``resync_required`` frame (counted in ``relay_resyncs``)."""
        self.metrics.resyncs.labels(reason=reason).inc()
        frame = {"type": "resync_required", "request_id": rid, "epoch": epoch, "reason": reason}
        return {**frame, **extra}

    async def run(self) -> None:
        """Send queued items until cancelled or the client disconnects."""
        turns = self.turns
        queue = self.queue
        try:
            self._quota = turns.quota()
            while True:
                item = queue.pop()
                if item is None:
                    if queue.lags:
                        await self._refill_lagged()
                        continue
                    self._flush_metrics()
                    queue.wake.clear()
                    self._parked = not self._stopped
                    try:
                        await queue.wake.wait()
                    finally:
                        self._parked = False
                    if self._resumed is not None:
                        await self._finish_direct()
                    if turns.crowded() and not queue.reply_waiting():
                        # An event woke every idle writer at once: take a turn
                        # like the busy ones instead of all sending this pass.
                        await turns.next_turn(min(turns.quota(), len(queue)))
                    self._quota = turns.quota()
                    continue
                if isinstance(item, Envelope):
                    if not await self._send_next(item):
                        await self._send_event(item)
                elif isinstance(item, str):
                    # A reply (pong, ack, error) goes out at once, outside the
                    # turns: at one frame per turn among thousands of busy
                    # writers a client got one pong per round (a fifth of a
                    # second) while it pinged ten times a second, and its
                    # pongs fell further behind for as long as the load
                    # lasted. Commands are rate limited, so this cannot be
                    # used to jump the queue with anything but replies.
                    await self._emit_control(item)
                elif isinstance(item, Begin):
                    await self._begin(item)
                else:
                    await self._apply_reset(item.request_id, item.epoch, item.reason)
        except WebSocketDisconnect:
            return  # the client is gone; the connection releases everything
        finally:
            if self._resumed is not None:
                self._resumed.close()
                self._resumed = None
            self._flush_metrics()

    def stop(self) -> None:
        """No more direct sends: the connection is closing (call before
        cancelling :meth:`run`, which stays parked until its task runs again)."""
        self._stopped = True
        self._parked = False

    def offer_direct(self, env: Envelope) -> bool:
        """Send ``env`` now, from the caller's stack, if nothing stands before it.

        Only while this writer is parked on an empty queue, the event is the
        next seq of a request it is sending, nothing was dropped, and this
        pass of the loop has direct sends left (see
        :mod:`~relay.gateway.directsend`). False: the caller queues it
        instead; the writer then sends it (or meets the same failure) itself.
        The caller has checked that the connection wants the request.
        """
        send = self._server_send
        if send is None or not self._parked:
            return False
        queue = self.queue
        if queue.holding or queue.close_code is not None:
            return False
        track = self._next_of(env)
        if track is None:
            return False
        if self.ws.application_state is not WebSocketState.CONNECTED:
            return False
        turns = self.turns
        direct = turns.direct
        if (turns.busy and turns.crowded()) or not direct.take(env.nbytes):
            return False
        try:
            resumed = start(send({"type": "websocket.send", "text": env.frame}))
        except Exception:
            return False  # the writer sends it and meets the failure in its own task
        track.last = env.seq
        turns.offered += 1
        turns.taken += 1
        direct.count(self.metrics, env.nbytes, env.ts)
        if resumed is not None:
            # The socket's buffer is full: the writer finishes this send
            # before anything else, and the hub queues until it has.
            self._resumed = resumed
            self._parked = False
            queue.wake.set()
        return True

    async def _finish_direct(self) -> None:
        resumed, self._resumed = self._resumed, None
        assert resumed is not None
        try:
            await resumed
        except OSError:
            raise self._gone() from None

    def _gone(self) -> WebSocketDisconnect:
        """The server's send failed: the peer left (uvicorn's ClientDisconnected is
        an OSError). Marks the socket disconnected, as Starlette does."""
        self.ws.application_state = WebSocketState.DISCONNECTED
        return WebSocketDisconnect(code=1006)

    def _flush_metrics(self) -> None:
        if self._sent:
            self.metrics.events_out.inc(self._sent)
            self.metrics.bytes_out.inc(self._bytes)
            self._sent = self._bytes = 0

    async def _emit(self, env: Envelope) -> None:
        """Write one event frame to the client (a subclass frames it for its transport)."""
        await self._write(env.frame)

    async def _emit_control(self, text: str) -> None:
        """Write one control frame (reply, subscribed, resync_required, ...)."""
        await self._write(text)

    async def _write(self, text: str) -> None:
        send = self._server_send
        if send is None:
            await self.ws.send_text(text)
            return
        # What Starlette's WebSocket.send does for a text frame, minus the
        # middleware's wrappers: the same state rule, the same disconnect.
        ws = self.ws
        if ws.application_state is not WebSocketState.CONNECTED:
            raise WebSocketDisconnect(code=1006)
        try:
            await send({"type": "websocket.send", "text": text})
        except OSError:
            raise self._gone() from None

    async def _send(self, text: str) -> None:
        await self._emit_control(text)
        self._quota -= 1
        if self._quota <= 0:
            await self._yield()

    async def _yield(self) -> None:
        # Let the other writers, pings and the reader run.
        turns = self.turns
        await turns.next_turn(min(turns.quota(), len(self.queue)))
        self._quota = turns.quota()

    async def _send_next(self, env: Envelope) -> bool:
        """The common case, inlined: the next seq of a request, nothing to settle.

        Returns False when the event needs the general path (:meth:`_send_event`).
        """
        track = self._next_of(env)
        if track is None:
            return False
        rid = env.request_id
        if not self.wants(rid):
            return True  # queued before the client unsubscribed: dropped
        await self._emit(env)
        track.last = env.seq
        self._count(env)
        self._quota -= 1
        if self._quota <= 0:
            await self._yield()
        return True

    def _next_of(self, env: Envelope) -> SeqTrack | None:
        """The track of ``env``'s request when ``env`` is its next seq with
        nothing to settle first (no drops, no run filter); None otherwise.
        Both fast paths ask this: the writer's and the hub's direct send."""
        if self.queue.lags or (env.run_id is not None and self.runs):
            return None
        track = self.tracks.get(env.request_id)
        if track is None or track.epoch != env.epoch or track.last != env.seq - 1:
            return None
        return track

    def _count(self, env: Envelope) -> None:
        self._sent += 1
        self._bytes += env.nbytes
        if self._sent % LATENCY_SAMPLE == 0 and env.ts:
            self.metrics.observe_latency(env.ts)

    async def _begin(self, item: Begin) -> None:
        rid = item.request_id
        track = self.tracks.ensure(rid)
        track.last, track.epoch = item.last, item.epoch
        self.queue.take_lag(rid)  # drops before this point are covered by `last`
        for frame in item.frames:
            await self._send(frame)
        if item.replay_until is not None and item.replay_until > item.last:
            await self._replay(rid, track, item.replay_until)

    async def _refill_lagged(self) -> None:
        """The queue is empty but events were dropped: bring each request up to
        the last dropped seq from history (the next live event continues it)."""
        for rid in self.queue.lagged_requests():
            if not self.wants(rid):
                self.queue.take_lag(rid)
                continue
            await self._settle_lag(rid, self.tracks.ensure(rid), fill=True)

    async def _settle_lag(self, rid: str, track: SeqTrack, *, fill: bool) -> None:
        lag = self.queue.take_lag(rid)
        if lag is None:
            return
        await self._send(dumps({"type": "lagged", "request_id": rid, "skipped": lag.count}))
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
        self.tracks.ensure(rid).restart(epoch)
        self.queue.take_lag(rid)
        await self._send(dumps(self.resync(rid, epoch, reason)))

    async def _send_event(self, env: Envelope) -> None:
        rid = env.request_id
        if not self.wants(rid):
            return  # queued before the client unsubscribed
        track = self.tracks.ensure(rid)
        step = track.classify(env.epoch, env.seq)
        if step is Step.RESET:
            await self._apply_reset(rid, env.epoch, "epoch_changed")
        if track.epoch is None:
            track.epoch = env.epoch
        if rid in self.queue.lags:
            await self._settle_lag(rid, track, fill=False)
        step = track.classify(env.epoch, env.seq)
        if step is Step.DUPLICATE:
            return
        if step is Step.GAP:
            await self._replay(rid, track, env.seq - 1)
            if track.classify(env.epoch, env.seq) is Step.DUPLICATE:
                return
        await self._send_frame(env)
        track.last = env.seq

    async def _send_frame(self, env: Envelope) -> None:
        if env.run_id is not None and self.runs and env.run_id not in self.runs:
            return  # workflow events of other runs, once the client chose runs
        await self._emit(env)
        self._count(env)
        self._quota -= 1
        if self._quota <= 0:
            await self._yield()

    async def _replay(self, rid: str, track: SeqTrack, until: int) -> None:
        after = track.last or 0
        try:
            async for batch in self.store.replay(rid, track.epoch or "", after, until):
                for env in batch:
                    if env.seq <= (track.last or 0):
                        continue
                    if self.replay_budget is not None and not self.replay_budget(env.nbytes):
                        # limits.replay_bytes_per_minute: stop here and say so;
                        # the client resubscribes with a snapshot (or later).
                        frame = self.resync(
                            rid, track.epoch, "replay_limited", last_seq=until, next_seq=env.seq
                        )
                        track.last = until
                        await self._send(dumps(frame))
                        return
                    await self._send_frame(env)
                    self.metrics.replayed.inc()
                    track.last = env.seq
        except HistoryGap as gap:
            track.last = until
            frame = self.resync(
                rid,
                track.epoch,
                "history_trimmed",
                first_available_seq=gap.first_available,
                last_seq=until,
            )
            await self._send(dumps(frame))
        except RedisError as exc:
            # History cannot be read now (the client already retried on a
            # fresh connection). Skipping ahead silently would leave a hole;
            # say so instead and carry on live (the client resyncs).
            log.warning("replay of %s failed: %s", rid, exc, extra={"request_id": rid})
            track.last = max(track.last or 0, until)
            frame = self.resync(rid, track.epoch, "history_unavailable", last_seq=until)
            await self._send(dumps(frame))
