"""Catching a request up from history, once per process, outside the pub/sub reader.

When the hub sees a hole in a request's stream (a seq beyond the next one) or
reconnects after an outage, the events in between come from the request's
history stream. Each such catch-up is a *lane*: one task per request, owned
here, that reads history in batches and hands every event to the router in
order. While a lane runs, live events of that request are not delivered but
only raise the lane's target (history has them too, in order, since the
publish script writes both in one step): memory per lane stays constant
however long the read takes, and no other request waits for it.

After a reconnect every tracked request is *held* (live events only raise the
target) from the moment the new connection is subscribed until its lane has
checked the request's epoch, and whether Redis came back with an older copy
of it, before anything new is delivered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from redis.exceptions import RedisError

from relay.aio import stop_task
from relay.gateway.envelope import Envelope
from relay.gateway.metrics import Metrics
from relay.gateway.seqtrack import SeqTable, SeqTrack
from relay.gateway.store import HistoryGap, RequestStore
from relay.wire.scripts import as_text, script

MAX_CONCURRENT_LANES = 16
"""History reads in flight at once (the rest wait their turn, in no particular order)."""
LANE_RETRIES = 5
"""Redis errors a lane retries (with backoff) before leaving the hole to the clients."""


class Router(Protocol):
    """What a lane needs of the hub."""

    @property
    def tracks(self) -> SeqTable:
        """The hub's positions."""

    def deliver(self, env: Envelope) -> None:
        """Advance the request's track to ``env`` and hand it to every viewer."""

    def reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        """Tell every viewer the request's stream restarted."""


@dataclass(slots=True)
class Lane:
    """One request being caught up."""

    request_id: str
    target: int = 0
    """The highest seq seen live while the lane ran: it ends only once past it."""
    held: bool = False
    check_rollback: bool = False
    fresh_window: int = 0
    """For a request new to this process (tenant-wide viewers): how far back to start."""
    min_ts: int = 0
    """Events older than this (Redis ms) are skipped, not delivered."""
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, seq: int) -> None:
        """A live event of the request arrived while the lane runs."""
        self.target = max(self.target, seq)


class Backfills:
    """The lanes of one hub."""

    def __init__(
        self,
        store: RequestStore,
        router: Router,
        metrics: Metrics,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.store = store
        self.router = router
        self.metrics = metrics
        self.log = log
        self._lanes: dict[str, Lane] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_LANES)

    def __len__(self) -> int:
        return len(self._lanes)

    def lane(self, request_id: str) -> Lane | None:
        """The running or held lane of ``request_id``."""
        return self._lanes.get(request_id)

    def hold(self, request_id: str, *, check_rollback: bool) -> Lane:
        """Stop delivering ``request_id`` live until :meth:`release`."""
        lane = self._lanes.get(request_id)
        if lane is None:
            lane = self._lanes[request_id] = Lane(request_id)
        lane.held = True
        lane.check_rollback = lane.check_rollback or check_rollback
        return lane

    def run(self, request_id: str, target: int = 0, **options: int) -> Lane:
        """Catch ``request_id`` up to at least ``target`` (starting a lane if none runs)."""
        lane = self._lanes.get(request_id)
        if lane is None:
            lane = self._lanes[request_id] = Lane(request_id)
        lane.note(target)
        for name, value in options.items():
            setattr(lane, name, value)
        if not lane.held:
            self._start(lane)
        return lane

    def release(self, request_id: str) -> Lane | None:
        """Let a held lane run."""
        lane = self._lanes.get(request_id)
        if lane is not None:
            lane.held = False
            self._start(lane)
        return lane

    def held(self) -> list[str]:
        """Requests whose lane waits for :meth:`release`."""
        return [rid for rid, lane in self._lanes.items() if lane.held]

    def drop(self, request_id: str) -> None:
        """Nobody routes ``request_id`` any more: stop its lane (it ends at its next await)."""
        lane = self._lanes.pop(request_id, None)
        if lane is not None:
            if lane.task is not None:
                lane.task.cancel()
            lane.done.set()

    async def close(self) -> None:
        """Stop every lane and wait for them."""
        lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            if lane.task is not None:
                await stop_task(lane.task)
            lane.done.set()

    def _start(self, lane: Lane) -> None:
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(
                self._catch_up(lane), name=f"relay-backfill-{lane.request_id[:8]}"
            )

    # ---------------------------------------------------------------- the lane task

    async def _catch_up(self, lane: Lane) -> None:
        rid = lane.request_id
        failures = 0
        try:
            async with self._slots:
                while True:
                    track = self.router.tracks.get(rid)
                    if track is None or self._lanes.get(rid) is not lane:
                        return  # nobody routes the request any more
                    try:
                        if not await self._round(lane, track):
                            return
                    except RedisError as exc:
                        failures += 1
                        if failures > LANE_RETRIES:
                            # Leave the hole to each connection: its writer
                            # tries history itself and, failing that, tells
                            # its client history_unavailable (a true reason).
                            self.log.warning("backfill of %s gave up: %s", rid, exc)
                            track.last = max(track.last or 0, lane.target)
                            return
                        await asyncio.sleep(min(1.0, 0.05 * 2**failures) * random.uniform(0.8, 1.2))
                        continue
                    if track.last is not None and track.last >= lane.target:
                        return
        finally:
            # No await between the last check and this: a live event that
            # arrives next sees no lane and is delivered (or opens a new one).
            if self._lanes.get(rid) is lane:
                del self._lanes[rid]
            lane.done.set()

    async def _round(self, lane: Lane, track: SeqTrack) -> bool:
        """Bring ``track`` to the end of history; False when there is nothing to follow."""
        rid = lane.request_id
        pos = await self.store.position(rid)
        if pos.epoch is None:
            track.last = max(track.last or 0, lane.target)
            return False  # the request is gone from Redis (expired, or never existed)
        restarted: str | None = None
        if track.epoch is not None and pos.epoch != track.epoch:
            restarted = pos.epoch
        elif lane.check_rollback and await self._rolled_back(rid, track, pos.seq):
            restarted = await self._new_epoch(rid, pos.epoch)
        lane.check_rollback = False
        if restarted is not None:
            # Seqs seen live belonged to the old incarnation: aim at the new one.
            track.restart(restarted)
            lane.target = 0
            self.router.reset(rid, restarted, "epoch_changed")
        if track.epoch is None:
            track.epoch = pos.epoch
        if track.last is None:
            if not lane.fresh_window:
                return False  # not anchored yet: watch() anchors it
            track.last = max(0, pos.seq - lane.fresh_window)
        lane.target = max(lane.target, pos.seq)
        before = track.last
        await self._replay(lane, track)
        if track.last == before and track.last < lane.target:
            # History holds nothing more although live events went further
            # (trimmed meanwhile, or a seq that was never written): stop
            # here; each connection sees its own gap and resyncs if needed.
            track.last = lane.target
        return True

    async def _replay(self, lane: Lane, track: SeqTrack) -> None:
        rid = lane.request_id
        epoch = track.epoch or ""
        while True:
            try:
                async for batch in self.store.replay(rid, epoch, track.last or 0, None):
                    for env in batch:
                        if track.last is not None and env.seq <= track.last:
                            continue
                        if env.ts < lane.min_ts:
                            track.advance(env.epoch, env.seq, env.ts)
                            continue
                        self.router.deliver(env)
                        self.metrics.backfilled.inc()
                return
            except HistoryGap as gap:
                # Hand out what history still has. Each connection then sees
                # its own gap and is told to resync only if it really missed
                # events; a reset sent from here reached clients whose
                # position was fine.
                if gap.first_available is None:
                    track.last = max(track.last or 0, lane.target)
                    return
                track.last = gap.first_available - 1

    async def _rolled_back(self, rid: str, track: SeqTrack, seq: int) -> bool:
        """True when Redis came back with an older copy of the request in the same epoch.

        Seq went backwards, or the entry at the last seq handled now holds
        another event (published after a rollback, reusing the seq).
        """
        if not track.last:
            return False
        if seq < track.last:
            return True
        if not track.ts:
            return False
        ts = await self.store.entry_ts(rid, track.last)
        return ts is not None and ts != track.ts

    async def _new_epoch(self, rid: str, seen: str) -> str:
        self.log.warning("request %s rolled back in Redis: starting a new epoch", rid)
        keys = self.store.keys.request(rid)
        result = await script("epoch_bump")(
            self.store.redis, [keys.epoch], [seen, uuid.uuid4().hex[:12]]
        )
        return as_text(result) if result is not None else seen
