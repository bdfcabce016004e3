"""Per-request stream positions: the one place that decides what an event's seq means.

The hub keeps one position per request it routes (to backfill a gap once per
process); each connection's writer keeps one per request it sends (to send
strictly in order and fill its own gaps). Both ask the same question of an
arriving ``(epoch, seq)``: is it the next event, one already seen, one after a
hole, or the first of a new incarnation of the stream? :class:`SeqTrack`
answers it, and :class:`SeqTable` keeps a bounded set of them.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass


class Step(enum.Enum):
    """What an arriving event is, relative to a track."""

    NEXT = "next"
    """The next seq (or the first one seen): send it."""
    DUPLICATE = "duplicate"
    """At or below the last seq: already sent or backfilled."""
    GAP = "gap"
    """Beyond the next seq: the events in between must come from history first."""
    RESET = "reset"
    """Another epoch: the stream restarted; the track must restart before anything else."""


@dataclass(slots=True)
class SeqTrack:
    """The last seq handled of one request (``None``: nothing yet) and its epoch."""

    last: int | None = None
    epoch: str | None = None
    ts: int = 0
    """Redis time of the event at ``last``: tells a reused seq from the one handled."""

    def classify(self, epoch: str, seq: int) -> Step:
        """Where ``(epoch, seq)`` stands relative to this track."""
        if self.epoch is not None and epoch != self.epoch:
            return Step.RESET
        last = self.last
        if last is None:
            return Step.NEXT
        if seq <= last:
            return Step.DUPLICATE
        if seq > last + 1:
            return Step.GAP
        return Step.NEXT

    def advance(self, epoch: str, seq: int, ts: int = 0) -> None:
        """Record ``seq`` of ``epoch`` as handled."""
        self.epoch, self.last, self.ts = epoch, seq, ts

    def restart(self, epoch: str | None) -> None:
        """A new incarnation of the stream: it starts over at seq 1."""
        self.epoch, self.last, self.ts = epoch, 0, 0


class SeqTable:
    """Tracks by request id, at most ``limit`` of them, least recently used evicted first.

    ``pinned`` names the requests whose track must never be evicted (a request
    a client subscribed to explicitly, or one a hub viewer watches): only
    tracks of requests seen in passing (the tenant-wide stream) are dropped,
    which costs at most a duplicate check for an event seen again much later.
    """

    def __init__(self, limit: int, pinned: Callable[[str], bool]) -> None:
        self.limit = limit
        self.pinned = pinned
        self._tracks: OrderedDict[str, SeqTrack] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tracks)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._tracks

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._tracks))

    def get(self, request_id: str) -> SeqTrack | None:
        """The track of ``request_id`` if there is one (no recency update)."""
        return self._tracks.get(request_id)

    def ensure(self, request_id: str) -> SeqTrack:
        """The track of ``request_id``, created empty if needed; marks it recently used."""
        track = self._tracks.get(request_id)
        if track is not None:
            self._tracks.move_to_end(request_id)
            return track
        track = self._tracks[request_id] = SeqTrack()
        self._evict()
        return track

    def pop(self, request_id: str) -> SeqTrack | None:
        """Forget ``request_id``."""
        return self._tracks.pop(request_id, None)

    def _evict(self) -> None:
        # Pinned tracks are rotated to the back; stop after one full lap so a
        # table of only pinned tracks (bounded by the subscription cap) ends.
        budget = len(self._tracks)
        while len(self._tracks) > self.limit and budget > 0:
            budget -= 1
            oldest = next(iter(self._tracks))
            if self.pinned(oldest):
                self._tracks.move_to_end(oldest)
                continue
            del self._tracks[oldest]
