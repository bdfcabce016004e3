"""The writer of one connection: drains its send queue in per-request seq order.

Each request's events go out strictly in ``seq`` order: a seq at or below
the last one sent is a duplicate and skipped; a seq beyond the next one is a
gap, filled from the history stream first (a resume, a lag or a hub reconnect
all end up here). History that no longer covers the gap yields
``resync_required`` instead of a silent hole. Dropped ranges recorded by the
queue are announced (``lagged``) and refilled the same way.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..config import GlobalConfig
from .envelope import Envelope
from .metrics import Metrics
from .sendqueue import Begin, SendQueue
from .store import HistoryGap, RequestStore

log = logging.getLogger(__name__)


def dumps(obj: dict[str, Any]) -> str:
    """Compact JSON text of a control frame."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class Track:
    """What was sent of one request: the last seq (None: nothing yet) and its epoch."""

    last: int | None
    epoch: str | None


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
    ) -> None:
        self.ws = ws
        self.queue = queue
        self.store = store
        self.config = config
        self.metrics = metrics
        self.wants = wants
        """Whether the connection still wants events of a request."""
        self.subscribed = subscribed
        """Whether a request is explicitly subscribed (its track is never evicted)."""
        self.runs = runs
        """Workflow runs the client chose (empty: all)."""
        self.tracks: OrderedDict[str, Track] = OrderedDict()

    def resync(self, rid: str, epoch: str | None, reason: str, **extra: Any) -> dict[str, Any]:
        """A ``resync_required`` frame (counted in ``relay_resyncs``)."""
        self.metrics.resyncs.labels(reason=reason).inc()
        frame = {"type": "resync_required", "request_id": rid, "epoch": epoch, "reason": reason}
        return {**frame, **extra}

    def track(self, rid: str) -> Track:
        """The position of ``rid``; unsubscribed (firehose) tracks are evicted LRU-first."""
        track = self.tracks.get(rid)
        if track is None:
            track = self.tracks[rid] = Track(None, None)
            limit = self.config.gateway.firehose_track_requests
            while len(self.tracks) > limit:
                oldest = next(iter(self.tracks))
                if self.subscribed(oldest):
                    self.tracks.move_to_end(oldest)
                    break
                del self.tracks[oldest]
        else:
            self.tracks.move_to_end(rid)
        return track

    async def run(self) -> None:
        """Send queued items until cancelled or the client disconnects."""
        try:
            while True:
                item = self.queue.pop()
                if item is None:
                    if self.queue.lags:
                        await self._refill_lagged()
                        continue
                    self.queue.wake.clear()
                    await self.queue.wake.wait()
                    continue
                if isinstance(item, Envelope):
                    await self._send_event(item)
                elif isinstance(item, str):
                    await self.ws.send_text(item)
                elif isinstance(item, Begin):
                    await self._begin(item)
                else:
                    await self._apply_reset(item.request_id, item.epoch, item.reason)
        except WebSocketDisconnect:
            return  # the client is gone; run() releases everything

    async def _begin(self, item: Begin) -> None:
        rid = item.request_id
        track = self.track(rid)
        track.last, track.epoch = item.last, item.epoch
        self.queue.lags.pop(rid, None)  # drops before this point are covered by `last`
        for frame in item.frames:
            await self.ws.send_text(frame)
        if item.replay_until is not None and item.replay_until > item.last:
            await self._replay(rid, track, item.replay_until)

    async def _refill_lagged(self) -> None:
        """The queue is empty but events were dropped: bring each request up to
        the last dropped seq from history (the next live event continues it)."""
        for rid in list(self.queue.lags):
            if not self.wants(rid):
                self.queue.lags.pop(rid, None)
                continue
            track = self.track(rid)
            await self._settle_lag(rid, track, fill=True)

    async def _settle_lag(self, rid: str, track: Track, *, fill: bool) -> None:
        lag = self.queue.lags.pop(rid, None)
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
        track = self.track(rid)
        track.last, track.epoch = 0, epoch
        self.queue.lags.pop(rid, None)
        await self.ws.send_text(dumps(self.resync(rid, epoch, reason)))

    async def _send_event(self, env: Envelope) -> None:
        if not self.wants(env.request_id):
            return  # queued before the client unsubscribed
        track = self.track(env.request_id)
        if track.epoch is not None and env.epoch != track.epoch:
            await self._apply_reset(env.request_id, env.epoch, "epoch_changed")
        if track.epoch is None:
            track.epoch = env.epoch
        if env.request_id in self.queue.lags:
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
        if env.run_id is not None and self.runs and env.run_id not in self.runs:
            return  # workflow events of other runs, once the client chose runs
        await self.ws.send_text(env.frame)
        self.metrics.events_out.inc()
        self.metrics.bytes_out.inc(env.nbytes)
        if env.ts:
            self.metrics.latency.observe(max(0.0, time.time() - env.ts / 1000))

    async def _replay(self, rid: str, track: Track, until: int) -> None:
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
            frame = self.resync(
                rid,
                track.epoch,
                "history_trimmed",
                first_available_seq=gap.first_available,
                last_seq=until,
            )
            await self.ws.send_text(dumps(frame))
        except RedisError as exc:
            # History cannot be read now. Skipping ahead silently would leave
            # a hole; say so instead and carry on live (the client resyncs).
            log.warning("replay of %s failed: %s", rid, exc, extra={"request_id": rid})
            track.last = max(track.last or 0, until)
            frame = self.resync(rid, track.epoch, "history_unavailable", last_seq=until)
            await self.ws.send_text(dumps(frame))
