"""Durable Streams offsets and cursors for relay's request streams.

An offset names a position *between* events: ``Offset(epoch, seq)`` is "every
event up to and including ``seq`` of incarnation ``epoch``", so a read from
it starts at ``seq + 1``. On the wire it is ``<epoch>_<seq as 16 hex digits>``:
the fixed-width seq makes offsets of one epoch sort lexicographically in
stream order, as the protocol requires (section 8). Offsets of an older epoch
(the stream restarted after Redis lost data) are no longer positions of the
stream at all: a read from one is answered 410 Gone, so no two *valid*
offsets ever compare across epochs.

The two sentinels ``-1`` (the start) and ``now`` (the tail) are parsed here
too; every generated offset contains ``_`` and so can never equal them.

The cursor (``Stream-Cursor``, section 10.1) is the number of
``cursor_interval_seconds`` intervals since 2024-10-09 00:00 UTC, moved
strictly past a cursor the client echoes from the same interval by a random
1-3600 seconds, exactly as the reference server computes it.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from typing import Literal

SEQ_DIGITS = 16
"""Hex digits of the seq part: Redis INCR stays below 2**63, so 16 always suffice."""
CURSOR_EPOCH_S = 1_728_432_000
"""2024-10-09T00:00:00Z, the protocol's default cursor epoch."""

_EPOCH_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SEQ_RE = re.compile(rf"[0-9a-f]{{{SEQ_DIGITS}}}")


class BadOffset(ValueError):
    """An ``offset`` query parameter that is neither a sentinel nor an offset relay made."""


@dataclass(frozen=True, slots=True)
class Offset:
    """A position in one incarnation (epoch) of a request's stream.

    >>> str(Offset("5f2c0a9e81d4", 42))
    '5f2c0a9e81d4_000000000000002a'
    >>> parse_offset("5f2c0a9e81d4_000000000000002a")
    Offset(epoch='5f2c0a9e81d4', seq=42)
    """

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}_{self.seq:0{SEQ_DIGITS}x}"


Sentinel = Literal["-1", "now"]


def parse_offset(raw: str | None) -> Offset | Sentinel:
    """The offset of a read: ``-1`` when absent, a sentinel, or an :class:`Offset`.

    Raises :class:`BadOffset` (the message says what a valid one looks like).
    """
    if raw is None or raw == "-1":
        return "-1"
    if raw == "now":
        return "now"
    epoch, sep, seq = raw.rpartition("_")
    if not sep or not _EPOCH_RE.fullmatch(epoch) or not _SEQ_RE.fullmatch(seq):
        shown = raw if len(raw) <= 80 else raw[:77] + "..."
        raise BadOffset(
            f"offset {shown!r} is not an offset this server returned: use -1 (the start), "
            "now (the tail) or a Stream-Next-Offset / streamNextOffset value"
        )
    return Offset(epoch, int(seq, 16))


def current_interval(interval_s: int, now: float | None = None) -> int:
    """The cursor interval ``now`` falls in."""
    moment = time.time() if now is None else now
    return int((moment - CURSOR_EPOCH_S) // interval_s)


def response_cursor(client: str | None, interval_s: int, now: float | None = None) -> str:
    """The ``Stream-Cursor`` of a live answer: never behind the client's echoed cursor.

    >>> response_cursor(None, 20, now=CURSOR_EPOCH_S + 100)
    '5'
    >>> int(response_cursor("5", 20, now=CURSOR_EPOCH_S + 100)) > 5
    True
    """
    interval = current_interval(interval_s, now)
    echoed = int(client) if client is not None and client.isdigit() and len(client) < 19 else None
    if echoed is None or echoed < interval:
        return str(interval)
    # The client is already at (or past) this interval: a CDN could keep
    # answering it from cache forever, so move it strictly forward.
    jitter_s = random.randint(1, 3600)
    return str(echoed + max(1, math.ceil(jitter_s / interval_s)))


__all__ = [
    "CURSOR_EPOCH_S",
    "BadOffset",
    "Offset",
    "Sentinel",
    "current_interval",
    "parse_offset",
    "response_cursor",
]
