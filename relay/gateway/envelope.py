"""An event as the gateway carries it: parsed header plus the frame text, once per process.

The publish script sends ``"<epoch> <seq> <request_id> <type> <ts>\\n<frame>"`` on
the channels. The hub splits the header (no JSON decoding for most events)
and hands the *same* :class:`Envelope`, holding the already-encoded frame
text, to every interested connection. Only workflow events are JSON-decoded,
once, for their ``run_id`` (per-run filtering needs it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from relay.wire.events import WORKFLOW_TYPES
from relay.wire.scripts import as_text


class EnvelopeError(ValueError):
    """A channel message that is not a relay frame."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One published frame, shared by every connection that sends it."""

    request_id: str
    seq: int
    epoch: str
    type: str
    frame: str
    run_id: str | None = None
    nbytes: int = field(default=0, compare=False)
    ts: int = field(default=0, compare=False)
    received: float = field(default_factory=time.monotonic, compare=False)
    """When this process got it (``time.monotonic()``): the overload shedder
    reads the age of the oldest queued events from it. Once per event, not
    per delivery."""

    @classmethod
    def parse(cls, payload: bytes | str) -> Envelope:
        """Parse a channel message; raises :class:`EnvelopeError` on a foreign one."""
        text = as_text(payload)
        head, sep, frame = text.partition("\n")
        parts = head.split(" ")
        if not sep or len(parts) != 5 or not parts[1].isdigit() or not parts[4].isdigit():
            raise EnvelopeError(f"not a relay frame: {head[:80]!r}")
        epoch, seq, rid, kind, ts = parts
        run_id = None
        if kind in WORKFLOW_TYPES:
            try:
                value = json.loads(frame).get("run_id")
            except ValueError:
                raise EnvelopeError("workflow frame is not valid JSON") from None
            run_id = value if isinstance(value, str) else None
        # Bytes on the wire, not characters: queue bounds and relay_bytes_sent
        # must hold for non-ASCII text too. The header is ASCII.
        nbytes = len(payload) - len(head) - 1 if isinstance(payload, bytes) else _nbytes(frame)
        return cls(rid, int(seq), epoch, kind, frame, run_id, nbytes, int(ts))

    @classmethod
    def from_history(cls, request_id: str, epoch: str, seq: int, frame: bytes | str) -> Envelope:
        """An envelope for a frame read back from the history stream."""
        text = as_text(frame)
        kind = ""
        run_id = None
        # The frame starts with {"type":"..." because the SDK serialises the
        # type first; fall back to decoding when another publisher did not.
        if text.startswith('{"type":"'):
            end = text.find('"', 9)
            kind = text[9:end]
        if not kind or kind in WORKFLOW_TYPES or not text.endswith("}"):
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("history frame is not a JSON object")
            kind = str(obj.get("type", ""))
            rid = obj.get("run_id")
            run_id = rid if isinstance(rid, str) else None
        return cls(request_id, seq, epoch, kind, text, run_id, _nbytes(text), frame_ts(text))


def _nbytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def frame_ts(frame: str) -> int:
    """The ``ts`` of a frame, read from its tail (the script appends it last); 0 if absent."""
    _, sep, tail = frame.rpartition(',"ts":')
    digits = tail[:-1] if tail.endswith("}") else ""
    return int(digits) if sep and digits.isdigit() else 0


def history_seq(entry_id: bytes | str) -> int:
    """The seq of a history stream entry id (``"<seq>-0"``)."""
    raw = as_text(entry_id)
    return int(raw.partition("-")[0])
