"""``live=sse`` of the Durable Streams read API: one response that follows the stream.

Events are ``event: data`` (a JSON array of frames) each followed by an
``event: control`` (``streamNextOffset``, ``streamCursor``, ``upToDate``,
``streamClosed``), as section 5.8 of the protocol defines them. History is sent
first, in chunks, then what the hub brings. The response ends when the
stream closes (after a control event with ``streamClosed``), after
``durable.sse_max_seconds`` (the client reconnects from its last offset), when
the stream restarts under a new epoch (the reconnect is then answered 410),
or when the client goes. A comment line after ``durable.heartbeat_seconds``
of silence keeps proxies from timing the response out.

A write that the client does not take within ``gateway.ping_timeout`` ends
the response: meanwhile the hub's events wait in the read's bounded buffer
(drop_oldest, refilled from history), never in an unbounded queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from relay.gateway.dsoffset import Offset
from relay.gateway.dsread import (
    Answer,
    LiveRefused,
    LiveTail,
    RateLimitedRead,
    Read,
    StreamState,
    wait_for_wake,
)
from relay.gateway.guard import HttpRefusal
from relay.logs import LogOnce

if TYPE_CHECKING:
    from relay.gateway.durable import DurableReads

log = logging.getLogger(__name__)
log_once = LogOnce(log)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Nginx and some CDNs buffer responses unless told not to.
    (b"x-accel-buffering", b"no"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"cross-origin"),
]


class ClientTooSlow(Exception):
    """A write the client did not take in time."""


def data_event(text: str) -> str:
    """An ``event: data`` carrying ``text`` (split into ``data:`` lines if it has line breaks).

    >>> data_event('[{"a":1}]')
    'event: data\\ndata: [{"a":1}]\\n\\n'
    """
    if "\n" in text or "\r" in text:
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return "event: data\n" + "".join(f"data: {line}\n" for line in lines) + "\n"
    return f"event: data\ndata: {text}\n\n"


def control_event(fields: dict[str, Any]) -> str:
    """An ``event: control`` with the protocol's camelCase fields."""
    return f"event: control\ndata: {json.dumps(fields, separators=(',', ':'))}\n\n"


class SseStream:
    """The ASGI response of one ``live=sse`` read."""

    def __init__(self, reads: DurableReads, request: Request, read: Read) -> None:
        self.reads = reads
        self.request = request
        self.read = read
        self.config = reads.svc(request).config
        self.started = False
        self._send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        refusal: HttpRefusal | None = None
        retry_after: float | None = None
        try:
            async with self.reads.live(self.request, self.read, receive) as tail:
                state, after = await self.reads.state(self.read)
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                self.started = True
                await self.follow(tail, state.epoch or "", after, state.tail, state.closed)
        except HttpRefusal as exc:
            # Once the head is out a status cannot change: the response just
            # ends, and the client's reconnect from its offset is told why.
            refusal = exc
        except LiveRefused as exc:
            refusal, retry_after = HttpRefusal(exc.status, "rate_limited", str(exc)), 1
        except RateLimitedRead as exc:
            refusal, retry_after = exc.refusal(), exc.wait
        except ClientTooSlow:
            log_once("slow", "an SSE reader did not take a write in time; ending its response")
        except RedisError as exc:
            # Before the head: 503 (the client retries). After: the response
            # ends and the client reconnects from its offset.
            log.warning("SSE read failed: %s", exc)
            refusal = HttpRefusal(503, "unavailable", "Redis is unavailable; try again shortly")
            retry_after = 1
        if not self.started:
            assert refusal is not None
            await self.reads.refused(refusal, retry_after)(scope, receive, send)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def emit(self, text: str) -> None:
        """Write ``text``; :class:`ClientTooSlow` when the client does not take it in time."""
        assert self._send is not None
        message = {"type": "http.response.body", "body": text.encode(), "more_body": True}
        try:
            async with asyncio.timeout(self.config.gateway.ping_timeout):
                await self._send(message)
        except TimeoutError:
            raise ClientTooSlow from None

    def control(self, epoch: str, end: int, *, up_to_date: bool, closed: bool) -> str:
        """The control event after a batch (or on its own)."""
        fields: dict[str, Any] = {"streamNextOffset": str(Offset(epoch, end))}
        if closed:
            # Closed implies up to date; no cursor: the client must not reconnect.
            fields["streamClosed"] = True
            fields["upToDate"] = True
        else:
            fields["streamCursor"] = self.reads.cursor(self.request, self.read)
            if up_to_date:
                fields["upToDate"] = True
        return control_event(fields)

    async def send_answer(self, epoch: str, answer: Answer) -> None:
        """One data event (when there are events) and its control event, in one write."""
        text = ""
        if answer.events:
            text = data_event("[" + ",".join(e.frame for e in answer.events) + "]")
        text += self.control(epoch, answer.end, up_to_date=answer.up_to_date, closed=answer.closed)
        await self.emit(text)

    async def follow(
        self, tail: LiveTail, epoch: str, after: int, known: int, closed: bool
    ) -> None:
        """History from ``after`` up to ``known``, then the hub's events, until an end."""
        cfg = self.config.durable
        reads, request, read = self.reads, self.request, self.read
        deadline = time.monotonic() + cfg.sse_max_seconds
        if after >= known:
            # The first control event names the tail at once (section 8, offset=now).
            await self.emit(self.control(epoch, after, up_to_date=True, closed=closed))
            if closed:
                return
        while not tail.gone and not reads.closing and time.monotonic() < deadline:
            if after < known:
                answer = await reads.read_range(
                    request, read, StreamState(epoch, known, closed), after
                )
                await self.send_answer(epoch, answer)
                after = answer.end
                if answer.closed:
                    return
                continue
            quiet_until = min(deadline, time.monotonic() + cfg.heartbeat_seconds)
            if not await wait_for_wake(tail, max(0.0, quiet_until - time.monotonic())):
                if time.monotonic() < deadline:
                    await self.emit(": keep-alive\n\n")
                continue
            if tail.gone or reads.closing:
                return
            live = await reads.next_live(request, read, tail, epoch, after)
            if live is None:
                continue
            await self.send_answer(epoch, live)
            after = live.end
            if live.closed:
                return
            # A chunk cut short leaves the rest to history: catch up to the
            # last event the hub offered before waiting again.
            if tail.high[0] == epoch:
                known = max(known, tail.high[1])


__all__ = ["SseStream", "control_event", "data_event"]
