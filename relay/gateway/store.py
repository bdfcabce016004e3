"""Reads of a request's durable state: position, history ranges, snapshot.

Everything here is a read on the command connection pool, never on the
pub/sub connection. History is read in bounded batches so a replay of a long
request never holds more than one batch in memory.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from relay.gateway.envelope import Envelope, frame_ts, history_seq
from relay.gateway.recent import RecentEvents
from relay.wire.keys import Keys
from relay.wire.scripts import as_text


@dataclass(frozen=True, slots=True)
class Position:
    """Where a request's stream stands: last seq and epoch (0 and None if unknown)."""

    seq: int
    epoch: str | None


class HistoryGap(Exception):
    """History no longer reaches back to the seq a reader needs."""

    def __init__(self, request_id: str, wanted: int, first_available: int | None) -> None:
        super().__init__(f"history of {request_id} starts at {first_available}, needed {wanted}")
        self.request_id = request_id
        self.wanted = wanted
        self.first_available = first_available


def _text(value: bytes | str | None) -> str | None:
    return None if value is None else as_text(value)


class RequestStore:
    """Read access to the Redis state of one tenant's requests."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        batch: int = 500,
        on_skip: Callable[[str, int, str], None] | None = None,
        recent: RecentEvents | None = None,
        text_max_bytes: int = 16 * 1024,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.batch = batch
        self.recent = recent
        """Events this process delivered lately: ranges it holds are not read from Redis."""
        self.text_max_bytes = text_max_bytes
        """Per agent, the latest bytes of its text a snapshot carries (0: none)."""
        self.on_skip = on_skip
        """Called with (request_id, seq, why) for a history entry that cannot be parsed."""

    async def position(self, request_id: str) -> Position:
        """The request's last seq and epoch."""
        rk = self.keys.request(request_id)
        seq, epoch = await self.redis.mget([rk.seq, rk.epoch])
        return Position(int(seq) if seq is not None else 0, _text(epoch))

    async def positions(self, request_ids: list[str]) -> list[Position]:
        """Positions of several requests in one round trip."""
        if not request_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for rid in request_ids:
            rk = self.keys.request(rid)
            pipe.mget([rk.seq, rk.epoch])
        return [
            Position(int(seq) if seq is not None else 0, _text(epoch))
            for seq, epoch in await pipe.execute()
        ]

    async def entry_ts(self, request_id: str, seq: int) -> int | None:
        """The ``ts`` of history entry ``seq`` (None when history no longer has it)."""
        rk = self.keys.request(request_id)
        entries = await self.redis.xrange(rk.history, min=f"{seq}-0", max=f"{seq}-0")
        if not entries or entries[0][1] is None:
            return None
        raw = entries[0][1][b"f"]
        return frame_ts(as_text(raw))

    async def replay(
        self, request_id: str, epoch: str, after: int, until: int | None = None
    ) -> AsyncIterator[list[Envelope]]:
        """Yield batches of envelopes with ``after < seq <= until`` (``until`` None: to the end).

        Raises :class:`HistoryGap` before yielding anything when history no
        longer holds ``after + 1`` but does hold something later.
        """
        if self.recent is not None and until is not None:
            kept = self.recent.range(self.keys.tenant, request_id, epoch, after, until)
            if kept is not None:
                for i in range(0, len(kept), self.batch):
                    yield kept[i : i + self.batch]
                return
        history = self.keys.request(request_id).history
        start = after + 1
        first = True
        while until is None or start <= until:
            stop = f"{until}-0" if until is not None else "+"
            entries = await self.redis.xrange(history, min=f"{start}-0", max=stop, count=self.batch)
            if first:
                first = False
                head = history_seq(entries[0][0]) if entries and entries[0][0] else None
                if head is None and (until is not None and until >= start):
                    raise HistoryGap(request_id, start, None)
                if head is not None and head > start:
                    raise HistoryGap(request_id, start, head)
            if not entries:
                return
            batch = self._parse(request_id, epoch, entries)
            if batch:
                yield batch
            last_id = entries[-1][0]
            if len(entries) < self.batch or last_id is None:
                return
            start = history_seq(last_id) + 1

    def _parse(self, request_id: str, epoch: str, entries: list[Any]) -> list[Envelope]:
        # One entry that is not a relay frame (written by a publisher that
        # bypassed the script's checks) is skipped and reported, rather than
        # failing every replay that crosses it.
        batch = []
        for eid, fields in entries:
            if eid is None or fields is None:
                continue
            seq = history_seq(eid)
            try:
                batch.append(Envelope.from_history(request_id, epoch, seq, fields[b"f"]))
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                if self.on_skip is not None:
                    self.on_skip(request_id, seq, f"{type(exc).__name__}: {exc}")
        return batch

    async def pending_decision(self, request_id: str) -> dict[str, Any] | None:
        """The pending budget pause of the request, if one is open."""
        raw = await self.redis.get(self.keys.request(request_id).pending)
        return json.loads(raw) if raw is not None else None

    async def snapshot(self, request_id: str) -> dict[str, Any]:
        """The request's current state as one ``snapshot`` frame.

        Besides the state it carries each agent's text so far (``texts``),
        read in the same ``MULTI`` as ``seq``: a client that renders the
        snapshot and then applies the live events with a greater seq shows
        every delta exactly once.
        """
        rk = self.keys.request(request_id)
        # Which agents have text is only known from the state, and the texts
        # must be those of the very seq read with it: learn the agents (field
        # "t:<agent_id>"), then read state, seq and their texts in one MULTI,
        # again if an agent began its text in between (rare: once per agent).
        # Not a script: EVALSHA would need write access to the keys it
        # names, which a gateway's Redis user does not have.
        texted = self._texted(await self.redis.hkeys(rk.state)) if self.text_max_bytes else []
        for _ in range(_SNAPSHOT_ATTEMPTS):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(rk.state)
            pipe.get(rk.pending)
            pipe.get(rk.seq)  # two GETs, not an MGET: a cluster pipeline refuses MGET
            pipe.get(rk.epoch)
            for aid in texted:
                pipe.strlen(rk.text(aid))
                pipe.getrange(rk.text(aid), -self.text_max_bytes, -1)
            state, pending, seq, epoch, *tails = await pipe.execute()
            now = self._texted(state) if self.text_max_bytes else []
            if set(now) <= set(texted):
                break
            texted = now
        else:
            raise RuntimeError(f"the texts of {request_id} kept changing while read")
        rows: list[Any] = []
        for i, aid in enumerate(texted):
            length, tail = tails[2 * i], tails[2 * i + 1]
            if length:
                cut = int(state.get(b"t:" + aid.encode(), 0))
                rows += [aid, cut + int(length), tail]
        agents: list[dict[str, Any]] = []
        extra: dict[str, Any] = {}
        for field, value in state.items():
            name = field.decode()
            if name.startswith("a:"):
                agents.append(json.loads(value))
            elif name in ("budget", "outcome", "last_decision"):
                extra[name] = json.loads(value)
        agents.sort(key=lambda a: (a.get("spawned_seq") or 0, a.get("agent_id", "")))
        for agent in agents:
            agent.setdefault("parent_id", None)
        budget = extra.get("budget")
        if isinstance(budget, dict):
            # Lua's cjson encodes an empty list as {}: keep the wire types stable.
            for name in ("completed_agents", "incomplete_agents"):
                if budget.get(name) == {}:
                    budget[name] = []
        return {
            "type": "snapshot",
            "request_id": request_id,
            "epoch": _text(epoch),
            "seq": int(seq) if seq is not None else 0,
            "agents": agents,
            "budget": budget,
            "pending_decision": json.loads(pending) if pending is not None else None,
            "last_decision": extra.get("last_decision"),
            "synthesis_started": b"synthesis_seq" in state,
            "outcome": extra.get("outcome"),
            "texts": agent_texts(rows),
            # The seq every text above is complete up to; also ``seq`` today,
            # named apart so a reader of the texts need not know that.
            "text_seq": int(seq) if seq is not None else 0,
        }

    @staticmethod
    def _texted(fields: Any) -> list[str]:
        """Agents with text among the state's field names (``t:<agent_id>``)."""
        return [as_text(f)[2:] for f in fields if bytes(f).startswith(b"t:")]


_SNAPSHOT_ATTEMPTS = 8
"""Reads of a snapshot before giving up on agents that keep starting texts."""


def agent_texts(rows: list[Any]) -> dict[str, dict[str, Any]]:
    """``texts`` of a snapshot from rows of (agent, total bytes, latest bytes).

    A tail that is not the whole text may begin inside a UTF-8 character:
    its leading continuation bytes are dropped, so the text starts at a
    character (and ``truncated`` is true whenever bytes are missing).
    """
    texts: dict[str, dict[str, Any]] = {}
    for i in range(0, len(rows), 3):
        agent, total, raw = as_text(rows[i]), int(rows[i + 1]), bytes(rows[i + 2])
        if len(raw) < total:
            start = 0
            while start < min(len(raw), 3) and 0x80 <= raw[start] <= 0xBF:
                start += 1
            raw = raw[start:]
        texts[agent] = {
            "text": raw.decode("utf-8", errors="replace"),
            "truncated": len(raw) < total,
            "bytes": total,
        }
    return texts
