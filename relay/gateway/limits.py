"""What one client may cost a gateway: the ``[limits]`` section, enforced.

One :class:`Limits` per process holds the shared counters (connections per
process and per subject, cancels per subject); each connection gets a
:class:`ConnectionLimits` for what is counted per connection (frames per
second, history replayed per minute). The HTTP-level limits (header read
timeout, URL and header size, message fragments) live in
:mod:`relay.gateway.serve`, in the protocol classes given to uvicorn.

A *subject* is who a limit is charged to: the token subject once a
connection is authenticated (``Connection.subject``), else the peer address
(``ip:<address>``, the ``X-Forwarded-For`` address behind a trusted proxy).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from relay.config import GlobalConfig, LimitsConfig
from relay.gateway.sendqueue import SendQueue
from relay.wire.commands import CommandError, CommandId, load_object

RATE_LIMITED = "rate_limited"
"""The error code of every rate limit (WebSocket error frame; HTTP 429)."""
BODY_TOO_LARGE = "body_too_large"
"""The error code of a REST body over ``limits.max_body_bytes`` (HTTP 413)."""
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are that many."""
        self._refill()
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def spend(self, n: float) -> bool:
        """Take ``n`` tokens if any are left, going into debt by at most one spend.

        For costs known only after the fact (the size of a replayed event):
        the overshoot is bounded by one item.
        """
        self._refill()
        if self.tokens <= 0:
            return False
        self.tokens -= n
        return True

    def retry_after(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0 if they are now)."""
        self._refill()
        return max(0.0, (n - self.tokens) / self.rate)

    def available(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._refill()
        return self.tokens


def subject_key(subject: str | None, client: tuple[str, int] | Any | None) -> str:
    """Who a per-subject limit is charged to: the token subject, else the peer address."""
    if subject:
        return f"sub:{subject}"
    host = getattr(client, "host", None) if client is not None else None
    if host is None and isinstance(client, tuple) and client:
        host = client[0]
    return f"ip:{host or 'unknown'}"


class RateLimited(CommandError):
    """A command refused by a rate limit; its frame carries ``retry_after`` (seconds)."""

    def __init__(self, message: str, retry_after: float, command_id: CommandId | None = None):
        super().__init__(RATE_LIMITED, message, command_id)
        self.retry_after = math.ceil(retry_after * 10) / 10

    def frame(self) -> dict[str, Any]:
        """The error frame, with ``retry_after``."""
        return {**super().frame(), "retry_after": self.retry_after}


@dataclass(slots=True)
class _Subject:
    connections: int = 0
    cancels: TokenBucket | None = None


class Limits:
    """The per-process side of the limits: shared by every connection and route."""

    def __init__(self, config: LimitsConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.connections = 0
        # Bounded: an address scan must not grow this forever. Entries with
        # open connections are never evicted (their count must stay right);
        # the others are forgotten oldest first, which at worst refills a
        # cancel bucket early.
        self._subjects: OrderedDict[str, _Subject] = OrderedDict()

    @classmethod
    def of(cls, config: GlobalConfig) -> Limits:
        """The limits of ``config``."""
        return cls(config.limits)

    def _subject(self, key: str) -> _Subject:
        entry = self._subjects.get(key)
        if entry is None:
            entry = self._subjects[key] = _Subject()
            if len(self._subjects) > self.config.max_tracked_subjects:
                self._evict()
        else:
            self._subjects.move_to_end(key)
        return entry

    def _evict(self) -> None:
        # The oldest idle entry goes; at most max_connections entries with open
        # connections are skipped on the way, and nothing is copied.
        victim = next((k for k, e in self._subjects.items() if e.connections == 0), None)
        if victim is not None:
            del self._subjects[victim]

    # ---------------------------------------------------------------- connections

    def admit(self, key: str) -> str | None:
        """Count a new WebSocket connection of ``key``; the refusal reason when over a cap.

        Every admitted connection must be given back with :meth:`release`.
        """
        cfg = self.config
        if self.connections >= cfg.max_connections:
            return "gateway connection limit reached; try another gateway or later"
        entry = self._subject(key)
        if entry.connections >= cfg.max_connections_per_subject:
            return "connection limit for this client reached; close another connection first"
        entry.connections += 1
        self.connections += 1
        return None

    def refusal(self, key: str) -> tuple[int, str] | None:
        """What :meth:`admit` would refuse now, as (HTTP status, reason); counts nothing.

        For HTTP streams, which must answer before the response starts: 503
        when the process is full (another gateway may have room), 429 when
        the subject holds too many connections.
        """
        cfg = self.config
        if self.connections >= cfg.max_connections:
            return 503, "gateway connection limit reached; try another gateway or later"
        entry = self._subjects.get(key)
        if entry is not None and entry.connections >= cfg.max_connections_per_subject:
            return 429, "connection limit for this client reached; close another connection first"
        return None

    def release(self, key: str) -> None:
        """An admitted connection of ``key`` closed."""
        self.connections -= 1
        entry = self._subjects.get(key)
        if entry is not None:
            entry.connections -= 1

    def subject_connections(self, key: str) -> int:
        """Open connections of ``key`` (for tests and metrics)."""
        entry = self._subjects.get(key)
        return entry.connections if entry is not None else 0

    # ---------------------------------------------------------------- cancels

    def check_cancel(self, key: str, command_id: CommandId | None = None) -> None:
        """Charge one cancel to ``key``; raises :class:`RateLimited` over the per-minute cap."""
        entry = self._subject(key)
        per_minute = self.config.cancels_per_minute
        if entry.cancels is None:
            entry.cancels = TokenBucket(per_minute / 60.0, per_minute, self.clock)
        if not entry.cancels.take():
            raise RateLimited(
                f"more than {per_minute} cancels per minute",
                entry.cancels.retry_after(),
                command_id,
            )

    def for_connection(self) -> ConnectionLimits:
        """The counters of one new connection."""
        return ConnectionLimits(self.config, self.clock)


@dataclass(frozen=True, slots=True)
class Refusal:
    """What to do with a frame refused by the command rate limit."""

    frame: dict[str, Any] | None
    """The ``rate_limited`` error to send, or None: close the connection with 1008."""


class ConnectionLimits:
    """The per-connection side: frames per second and history replayed per minute."""

    def __init__(self, config: LimitsConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.commands = TokenBucket(config.command_rate, config.command_burst, clock)
        per_minute = config.replay_bytes_per_minute
        self.replay = TokenBucket(per_minute / 60.0, per_minute, clock)
        self.strikes = 0
        """Frames refused since the last one accepted."""

    def frame(self, message: Mapping[str, Any]) -> Refusal | None:
        """Charge one received frame (an ASGI ``websocket.receive`` message).

        None: go on. Else the ``rate_limited`` error to answer with (the frame's
        ``command_id`` echoed), or, once ``rate_limit_strikes`` frames in a row
        were refused, ``Refusal(None)``: the client ignores the limit, close 1008.
        """
        if self.commands.take():
            self.strikes = 0
            return None
        self.strikes += 1
        if self.strikes > self.config.rate_limit_strikes:
            return Refusal(None)
        err = RateLimited(
            f"more than {self.config.command_rate:g} frames per second",
            self.commands.retry_after(),
            _command_id(message),
        )
        return Refusal(err.frame())

    def check_replay(self, command_id: CommandId | None = None) -> None:
        """A subscription asking for history: refused while this minute's replay is spent.

        Spent means less than one second's allowance left: a replay admitted
        with a few bytes in hand would be cut again after one event, and the
        client told to come back at once, over and over.
        """
        second = self.replay.rate
        if self.replay.available() < second:
            raise RateLimited(
                f"more than {self.config.replay_bytes_per_minute} bytes of history "
                "replayed per minute; subscribe without after_seq, with snapshot, or later",
                self.replay.retry_after(second),
                command_id,
            )

    def spend_replay(self, nbytes: int) -> bool:
        """Charge one replayed event; False once this minute's replay is spent."""
        return self.replay.spend(nbytes)


def _command_id(message: Mapping[str, Any]) -> CommandId | None:
    # Parsed only to echo the id (frames are bounded by max_message_bytes
    # before this point, and a refused frame is never acted on).
    raw = message.get("text")
    if raw is None:
        raw = message.get("bytes") or b""
    try:
        obj = load_object(raw)
    except CommandError:
        return None
    cid = obj.get("command_id")
    if isinstance(cid, bool) or not isinstance(cid, str | int):
        return None
    return cid


FLUSH_BEFORE_CLOSE_S = 1.0
"""How long the refusals already queued may take to go out before a 1008 close."""


async def flush(queue: SendQueue, timeout: float = FLUSH_BEFORE_CLOSE_S) -> None:
    """Wait (bounded) until ``queue`` is empty: the client sees why it is closed."""
    deadline = time.monotonic() + timeout
    # Polled: the writer signals nothing when it empties, and this runs once
    # per connection that is being closed for ignoring the rate limit.
    while not queue.idle() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


class BodyTooLarge(CommandError):
    """A REST body over ``limits.max_body_bytes`` (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(BODY_TOO_LARGE, f"request body exceeds {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """Read a request body, stopping at ``limit`` bytes: :class:`BodyTooLarge` beyond it.

    A declared ``Content-Length`` over the limit is refused before a byte is
    read; a chunked or lying body is refused as soon as it passes the limit,
    so at most ``limit`` bytes (plus one chunk) are ever held.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


HTTP_STATUS = {RATE_LIMITED: 429, BODY_TOO_LARGE: 413}
"""The HTTP status of each limit's error code (REST)."""

__all__ = [
    "BODY_TOO_LARGE",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_TRY_AGAIN_LATER",
    "HTTP_STATUS",
    "RATE_LIMITED",
    "BodyTooLarge",
    "ConnectionLimits",
    "Limits",
    "RateLimited",
    "Refusal",
    "TokenBucket",
    "flush",
    "read_body",
    "subject_key",
]
