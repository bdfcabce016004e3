"""What the Durable Streams reads need of Redis and of the hub.

:func:`stream_state` answers "where does the request's stream stand, and is it
closed" in one round trip; :func:`read_chunk` reads one bounded range of
history; :class:`LiveTail` is a hub subscriber that one live read (long-poll
or SSE) registers while it waits, so live events come from the process's one
pub/sub connection, parsed once, and never from polling Redis.

A request's stream is *closed* once its outcome is decided (the root agent
completed, failed or was cancelled: the ``outcome`` field the publish script
writes into the request's state hash). The stream then ends at the outcome's
seq for good: anything published after it (a budget pause closed by the
cancel, say) is not part of the stream, so a range that reached the end can
never change and can be cached as such.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict, deque
from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.types import Receive

from relay.gateway.auth import Principal
from relay.gateway.dsoffset import Offset
from relay.gateway.envelope import Envelope
from relay.gateway.guard import HttpRefusal
from relay.gateway.hub import TenantHub
from relay.gateway.limits import TokenBucket
from relay.gateway.store import RequestStore
from relay.wire.keys import Keys

TERMINAL_TYPES = frozenset({"agent_completed", "agent_failed", "agent_cancelled"})
"""Event types that can decide a request's outcome (when the agent is the root)."""


@dataclass(frozen=True, slots=True)
class StreamState:
    """A request's stream as the read API sees it."""

    epoch: str | None
    """None: the request does not exist (never published, or expired)."""
    tail: int
    """The last seq of the stream (the outcome's seq once closed)."""
    closed: bool


async def stream_state(redis: Redis, keys: Keys, request_id: str) -> StreamState:
    """Position and closure of ``request_id`` in one round trip."""
    rk = keys.request(request_id)
    pipe = redis.pipeline(transaction=True)
    pipe.mget([rk.seq, rk.epoch])
    pipe.hget(rk.state, "outcome")
    (seq, epoch), outcome = await pipe.execute()
    tail = int(seq) if seq is not None else 0
    final = closed_at(outcome)
    if final is not None:
        tail = min(tail, final)
    return StreamState(
        epoch.decode() if isinstance(epoch, bytes) else epoch, tail, final is not None
    )


def closed_at(outcome: bytes | str | None) -> int | None:
    """The seq a request's outcome was decided at (None while it is open)."""
    if outcome is None:
        return None
    try:
        value = json.loads(outcome)
    except ValueError:
        return None
    seq = value.get("seq") if isinstance(value, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else None


async def read_outcome_seq(redis: Redis, keys: Keys, request_id: str) -> int | None:
    """The seq the request closed at, read after a live event that may have closed it."""
    return closed_at(await redis.hget(keys.request(request_id).state, "outcome"))


@dataclass(slots=True)
class Chunk:
    """One bounded range of the stream, in order."""

    events: list[Envelope]
    end: int
    """The seq the range reaches (the next read starts after it)."""


async def read_chunk(
    store: RequestStore,
    request_id: str,
    epoch: str,
    after: int,
    until: int,
    max_events: int,
    max_bytes: int,
) -> Chunk:
    """Events ``after < seq <= until`` from history, at most ``max_events`` / ``max_bytes``.

    At least one event is returned when the range holds any, however large.
    Raises :class:`~relay.gateway.store.HistoryGap` when history was trimmed
    past ``after``.
    """
    stop = min(until, after + max_events)
    events: list[Envelope] = []
    size = 0
    async for batch in store.replay(request_id, epoch, after, stop):
        for env in batch:
            if events and size + env.nbytes > max_bytes:
                return Chunk(events, events[-1].seq)
            events.append(env)
            size += env.nbytes
    # Entries that were not relay frames were skipped by the store: the range
    # still reaches ``stop``.
    return Chunk(events, stop)


class LiveTail:
    """The hub subscriber of one live read: a bounded buffer and a wake-up.

    Overflow policy ``drop_oldest``: past ``maxlen`` buffered events the oldest
    go; the reader then sees a hole before the first kept one and reads it
    back from history, so nothing is lost and memory stays bounded.
    """

    def __init__(self, request_id: str, maxlen: int) -> None:
        self.request_id = request_id
        self.buffer: deque[Envelope] = deque(maxlen=maxlen)
        self.wake = asyncio.Event()
        self.reset_epoch: str | None = None
        self.was_reset = False
        self.gone = False
        """The client disconnected (set by the read's disconnect watcher)."""
        self.high: tuple[str, int] = ("", 0)
        """Epoch and seq of the last event offered (kept when the buffer is emptied)."""
        """The client disconnected (set by the read's disconnect watcher)."""

    def offer(self, envelope: Envelope) -> None:
        """Called by the hub for each event of the request, in seq order."""
        if envelope.request_id == self.request_id:
            self.buffer.append(envelope)
            self.high = (envelope.epoch, envelope.seq)
            self.wake.set()

    def stream_reset(self, request_id: str, epoch: str | None, reason: str) -> None:
        """The request's stream restarted (new epoch): offsets held by the reader are void."""
        if request_id == self.request_id:
            self.was_reset, self.reset_epoch = True, epoch
            self.wake.set()

    def take(self, after: int, epoch: str) -> tuple[list[Envelope], bool]:
        """Buffered events past ``after`` of ``epoch``; True when they start right after it.

        False means a hole (dropped on overflow, or events the hub had not
        routed yet): the caller reads ``after`` onwards from history instead.
        """
        self.wake.clear()
        events = [e for e in self.buffer if e.epoch == epoch and e.seq > after]
        self.buffer.clear()
        contiguous = not events or events[0].seq == after + 1
        return events, contiguous


async def wait_for_wake(tail: LiveTail, timeout: float) -> bool:
    """Wait until the hub (or a disconnect) wakes ``tail``; False on timeout."""
    if tail.wake.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await tail.wake.wait()
    except TimeoutError:
        return False
    return True


class LiveRefused(Exception):
    """A live read over a connection cap (429 per subject, 503 per process)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RateLimitedRead(Exception):
    """The subject's history budget for this minute is spent."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"history budget spent; retry in {wait:.1f}s")
        self.wait = wait

    def refusal(self) -> HttpRefusal:
        """The 429 answer."""
        return HttpRefusal(
            429, "rate_limited", "more history read per minute than limits.replay_bytes_per_minute"
        )


class Gone(HttpRefusal):
    """410: the offset is no longer a position of the stream."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(410, code, message)


@dataclass(slots=True)
class Read:
    """One validated read: who asks, for what, from where."""

    request_id: str
    principal: Principal
    hub: TenantHub
    offset: Offset | str
    live: str | None
    cursor: str | None
    subject: str


@dataclass(slots=True)
class Answer:
    """Events to return and where they leave the reader."""

    events: list[Envelope]
    end: int
    up_to_date: bool
    closed: bool


def body_of(events: list[Envelope]) -> bytes:
    """A JSON-mode body: the frames, already encoded once by the hub, as one array."""
    return ("[" + ",".join(e.frame for e in events) + "]").encode()


async def watch_disconnect(receive: Receive, tail: LiveTail) -> None:
    """Wake ``tail`` for good once the client has gone (the ASGI ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    tail.gone = True
    tail.wake.set()


class ReplayBudgets:
    """History bytes each subject may read per minute (``limits.replay_bytes_per_minute``).

    The WebSocket charges this per connection; a Durable Streams reader makes
    a new request per chunk, so here it is charged per subject. At most
    ``max_subjects`` buckets are kept (the least recently used is forgotten,
    which at worst refills one early).
    """

    def __init__(self, per_minute: int, max_subjects: int) -> None:
        self.per_minute = per_minute
        self.max_subjects = max_subjects
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def bucket(self, subject: str) -> TokenBucket:
        """The bucket of ``subject`` (made full on first use)."""
        bucket = self._buckets.get(subject)
        if bucket is None:
            bucket = TokenBucket(self.per_minute / 60.0, self.per_minute)
            self._buckets[subject] = bucket
            if len(self._buckets) > self.max_subjects:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(subject)
        return bucket

    def retry_after(self, subject: str) -> float | None:
        """None while ``subject`` may read history; else seconds until it may again."""
        bucket = self.bucket(subject)
        return None if bucket.available() > 0 else max(0.1, bucket.retry_after(1))

    def spend(self, subject: str, events: list[Envelope]) -> None:
        """Charge the bytes of ``events`` read from history (may go into debt by one chunk)."""
        self.bucket(subject).spend(sum(e.nbytes for e in events))


__all__ = [
    "TERMINAL_TYPES",
    "Answer",
    "Chunk",
    "Gone",
    "LiveRefused",
    "LiveTail",
    "RateLimitedRead",
    "Read",
    "ReplayBudgets",
    "StreamState",
    "body_of",
    "closed_at",
    "read_chunk",
    "read_outcome_seq",
    "stream_state",
    "wait_for_wake",
    "watch_disconnect",
]
