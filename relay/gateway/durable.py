"""The Durable Streams read API: each request's stream at ``/v1/stream/requests/{id}``.

Implements the read side of the Durable Streams protocol (ElectricSQL,
PROTOCOL.md) in JSON mode: ``HEAD`` metadata, catch-up ``GET`` from an offset
(``-1``, ``now`` or a ``Stream-Next-Offset``), ``live=long-poll`` and
``live=sse``, closure once the request's outcome is decided, ``ETag`` / 304
and cache headers that let a CDN keep what can no longer change. Every item
of a JSON array body is the same frame JSON the WebSocket sends. Writes stay
with the orchestrator SDK: any other method is answered 405.

Live reads register a :class:`~relay.gateway.dsread.LiveTail` with the hub of
the principal's tenant, like a WebSocket subscription: events arrive on the
process's one pub/sub connection, and Redis is read only for catch-up ranges
and for the outcome after an event that may have decided it.

Example::

    $ curl -i 'http://gw:8000/v1/stream/requests/<id>?offset=-1'
    HTTP/1.1 200 OK
    content-type: application/json
    stream-next-offset: 5f2c0a9e81d4_0000000000000020
    stream-up-to-date: true
    [{"type":"agent_spawned",...,"seq":1,"ts":...}, ...]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.gateway.dsoffset import BadOffset, Offset, parse_offset, response_cursor
from relay.gateway.dsread import (
    TERMINAL_TYPES,
    Answer,
    Gone,
    LiveRefused,
    LiveTail,
    RateLimitedRead,
    Read,
    ReplayBudgets,
    StreamState,
    body_of,
    read_chunk,
    read_outcome_seq,
    stream_state,
    wait_for_wake,
    watch_disconnect,
)
from relay.gateway.dssse import SseStream
from relay.gateway.guard import HttpRefusal, rest_principal
from relay.gateway.hub import HubUnavailable
from relay.gateway.limits import subject_key
from relay.gateway.store import HistoryGap
from relay.wire.commands import CommandError

if TYPE_CHECKING:
    from relay.gateway.app import Services

log = logging.getLogger(__name__)

PATH = "/v1/stream/requests/{request_id}"
IMMUTABLE = "max-age=31536000, immutable"
EXPOSED_HEADERS = [
    "Stream-Next-Offset",
    "Stream-Cursor",
    "Stream-Up-To-Date",
    "Stream-Closed",
    "ETag",
]
"""Response headers a cross-origin browser client must be allowed to read."""
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "cross-origin-resource-policy": "cross-origin",
}


class DurableReads:
    """The ASGI app behind :data:`PATH` (one per gateway app; its state is per process)."""

    def __init__(self) -> None:
        self._budgets: ReplayBudgets | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tails: set[LiveTail] = set()
        self.closing = False
        """The gateway is draining (SIGTERM): live reads end now, new ones at once."""

    def drain(self) -> None:
        """End every live read soon: long-polls answer 204, SSE responses end.

        Called from the signal handler when shutdown starts, so clients move
        to another gateway at once instead of waiting out ``gateway.drain_timeout``.
        """
        self.closing = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for tail in self._tails:
            tail.wake.set()

    def svc(self, request: Request) -> Services:
        """The running app's shared services."""
        svc: Services = request.app.state.services
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._budgets is None:
            lim = svc.config.limits
            self._budgets = ReplayBudgets(lim.replay_bytes_per_minute, lim.max_tracked_subjects)
        return svc

    @property
    def budgets(self) -> ReplayBudgets:
        """Per-subject history budgets (made with the first request)."""
        assert self._budgets is not None
        return self._budgets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        response: ASGIApp
        try:
            response = await self.dispatch(request, receive)
        except HttpRefusal as refusal:
            response = self.refused(refusal)
        except LiveRefused as exc:
            response = self.refused(HttpRefusal(exc.status, "rate_limited", str(exc)), 1)
        except RateLimitedRead as exc:
            response = self.refused(exc.refusal(), retry_after=exc.wait)
        except RedisError as exc:
            log.warning("durable read of %s failed: %s", scope.get("path"), exc)
            response = self.refused(
                HttpRefusal(503, "unavailable", "Redis is unavailable; try again shortly"),
                retry_after=1,
            )
        await response(scope, receive, send)

    def refused(self, refusal: HttpRefusal, retry_after: float | None = None) -> Response:
        """The JSON error of a refused read; never cached."""
        response = refusal.response()
        response.headers.update({"cache-control": "no-store", **SECURITY_HEADERS})
        if retry_after is not None:
            response.headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        return response

    async def dispatch(self, request: Request, receive: Receive) -> ASGIApp:
        """Route by method: HEAD, GET (catch-up, long-poll, SSE), 405 for the rest."""
        method = request.method
        if method not in ("GET", "HEAD"):
            response = self.refused(
                HttpRefusal(
                    405,
                    "method_not_allowed",
                    "request streams are read-only here: their orchestrator writes them",
                )
            )
            response.headers["allow"] = "GET, HEAD"
            return response
        read = await self.validate(request)
        if method == "HEAD":
            return await self.head(request, read)
        if read.live == "sse":
            return SseStream(self, request, read)
        if read.live == "long-poll":
            return await self.long_poll(request, read, receive)
        return await self.catch_up(request, read)

    # ---------------------------------------------------------------- validation

    async def validate(self, request: Request) -> Read:
        """Authenticate and parse a read; :class:`HttpRefusal` (400/401/403) otherwise."""
        svc = self.svc(request)
        raw_id = request.path_params["request_id"]
        try:
            rid = str(uuid.UUID(raw_id))
        except ValueError:
            raise HttpRefusal(400, "invalid_field", "the request id must be a UUID") from None
        principal = await rest_principal(request, svc.auth, svc.anonymous, svc.metrics)
        try:
            principal.require("view", rid)
        except CommandError as exc:
            raise HttpRefusal(403, exc.code, exc.message) from None
        query = request.query_params
        live = query.get("live")
        if live not in (None, "long-poll", "sse"):
            raise HttpRefusal(400, "invalid_field", "query parameter 'live': 'long-poll' or 'sse'")
        if live is not None and "offset" not in query:
            raise HttpRefusal(400, "invalid_field", f"live={live} needs an offset")
        try:
            offset = parse_offset(query.get("offset"))
        except BadOffset as exc:
            raise HttpRefusal(400, "bad_offset", str(exc)) from None
        return Read(
            rid,
            principal,
            svc.hub.tenant(principal.tenant),
            offset,
            live,
            query.get("cursor"),
            subject_key(principal.sub, request.client),
        )

    async def state(self, read: Read) -> tuple[StreamState, int]:
        """The stream's state and the seq the read starts after (404 / 410 otherwise)."""
        hub = read.hub
        state = await stream_state(hub.redis, hub.keys, read.request_id)
        if state.epoch is None:
            raise HttpRefusal(404, "not_found", f"no stream for request {read.request_id}")
        offset = read.offset
        if offset == "-1":
            return state, 0
        if offset == "now" or not isinstance(offset, Offset):
            return state, state.tail
        if offset.epoch != state.epoch:
            raise Gone(
                "epoch_changed",
                "the request's stream restarted (Redis lost events); read it again from -1",
            )
        if offset.seq > state.tail:
            raise Gone(
                "ahead_of_stream",
                "the offset is past the end of the stream (Redis lost events); read from -1",
            )
        return state, offset.seq

    # ---------------------------------------------------------------- headers

    def headers(self, epoch: str, end: int, *, up_to_date: bool, closed: bool) -> dict[str, str]:
        """What every successful answer carries: the next offset, up-to-date and EOF flags."""
        headers = {
            "content-type": "application/json",
            "stream-next-offset": str(Offset(epoch, end)),
            **SECURITY_HEADERS,
        }
        if up_to_date or closed:
            headers["stream-up-to-date"] = "true"
        if closed:
            headers["stream-closed"] = "true"
        return headers

    def answer_headers(self, epoch: str, answer: Answer) -> dict[str, str]:
        """The headers of an answer carrying events."""
        return self.headers(epoch, answer.end, up_to_date=answer.up_to_date, closed=answer.closed)

    def visibility(self, request: Request) -> str:
        """``public`` while auth is off; ``private`` (no shared cache) for tenant data."""
        return "private" if self.svc(request).auth.enabled else "public"

    def cursor(self, request: Request, read: Read) -> str:
        """The ``Stream-Cursor`` of a live answer."""
        return response_cursor(
            read.cursor, self.svc(request).config.durable.cursor_interval_seconds
        )

    # ---------------------------------------------------------------- HEAD

    async def head(self, request: Request, read: Read) -> Response:
        """Metadata: the tail offset and whether the stream is closed (never cached)."""
        read.offset = "now"
        state, tail = await self.state(read)
        headers = self.headers(state.epoch or "", tail, up_to_date=False, closed=state.closed)
        headers.pop("stream-up-to-date", None)
        headers["cache-control"] = "no-store"
        return Response(b"", 200, headers)

    # ---------------------------------------------------------------- catch-up

    async def read_range(
        self, request: Request, read: Read, state: StreamState, after: int
    ) -> Answer:
        """One chunk from history after ``after`` (charged to the subject's replay budget)."""
        if after >= state.tail:
            return Answer([], after, True, state.closed)
        wait = self.budgets.retry_after(read.subject)
        if wait is not None:
            raise RateLimitedRead(wait)
        cfg = self.svc(request).config.durable
        try:
            chunk = await read_chunk(
                read.hub.store,
                read.request_id,
                state.epoch or "",
                after,
                state.tail,
                cfg.max_chunk_events,
                cfg.max_chunk_bytes,
            )
        except HistoryGap as gap:
            raise Gone(
                "history_trimmed",
                f"history no longer reaches back to this offset (it starts at seq "
                f"{gap.first_available}); read from -1 or now",
            ) from None
        self.budgets.spend(read.subject, chunk.events)
        up_to_date = chunk.end >= state.tail
        return Answer(chunk.events, chunk.end, up_to_date, state.closed and up_to_date)

    async def catch_up(self, request: Request, read: Read) -> Response:
        """``GET ?offset=``: a bounded range, cacheable for good once it can no longer change."""
        state, after = await self.state(read)
        if read.offset == "now":
            headers = self.headers(
                state.epoch or "", state.tail, up_to_date=True, closed=state.closed
            )
            headers["cache-control"] = "no-store"
            return Response(b"[]", 200, headers)
        cfg = self.svc(request).config.durable
        stop = min(state.tail, after + cfg.max_chunk_events)
        # The range (after, stop] of an epoch always yields the same answer, so
        # its tag is known before history is read, and a 304 costs no read.
        final = ":c" if state.closed and stop >= state.tail else ""
        etag = f'"{read.request_id}:{state.epoch}:{after:x}:{stop:x}{final}"'
        complete = stop < state.tail or state.closed
        cache = f"{self.visibility(request)}, {IMMUTABLE}" if complete else "no-cache"
        if request.headers.get("if-none-match") == etag:
            return Response(None, 304, {"etag": etag, "cache-control": cache, **SECURITY_HEADERS})
        answer = await self.read_range(request, read, state, after)
        headers = self.answer_headers(state.epoch or "", answer)
        headers.update({"etag": etag, "cache-control": cache})
        return Response(body_of(answer.events), 200, headers)

    # ---------------------------------------------------------------- live

    @contextlib.asynccontextmanager
    async def live(self, request: Request, read: Read, receive: Receive) -> AsyncIterator[LiveTail]:
        """Count the read as a connection, and route the request's events to it meanwhile."""
        svc = self.svc(request)
        refusal = svc.limits.admit(read.subject)
        if refusal is not None:
            busy = svc.limits.connections >= svc.config.limits.max_connections
            raise LiveRefused(503 if busy else 429, refusal)
        tail = LiveTail(read.request_id, svc.config.durable.live_buffer)
        gone = asyncio.create_task(watch_disconnect(receive, tail), name="relay-ds-disconnect")
        self._tails.add(tail)
        try:
            try:
                await read.hub.watch(read.request_id, tail)
            except HubUnavailable as exc:
                raise LiveRefused(503, f"live reads are unavailable: {exc}") from None
            yield tail
        finally:
            try:
                gone.cancel()
                await read.hub.unwatch(read.request_id, tail)
            finally:
                self._tails.discard(tail)
                svc.limits.release(read.subject)
                with contextlib.suppress(asyncio.CancelledError):
                    await gone

    async def closure(self, read: Read, answer: Answer) -> Answer:
        """Cut live events at the outcome, if one of them decided it."""
        if not any(e.type in TERMINAL_TYPES for e in answer.events):
            return answer
        final = await read_outcome_seq(read.hub.redis, read.hub.keys, read.request_id)
        if final is None or final > answer.end:
            return answer
        kept = [e for e in answer.events if e.seq <= final]
        return Answer(kept, final, True, True)

    async def next_live(
        self, request: Request, read: Read, tail: LiveTail, epoch: str, after: int
    ) -> Answer | None:
        """What the hub brought since ``after`` (None: nothing new); holes come from history."""
        if tail.was_reset and tail.reset_epoch != epoch:
            raise Gone("epoch_changed", "the request's stream restarted; read it again from -1")
        events, contiguous = tail.take(after, epoch)
        if not events:
            return None
        if not contiguous:
            # Events the buffer dropped (drop_oldest) or the hub has not routed
            # yet: history has them, in order.
            state = StreamState(epoch, events[-1].seq, False)
            return await self.closure(read, await self.read_range(request, read, state, after))
        cfg = self.svc(request).config.durable
        # Past one chunk, the rest is dropped with the buffer: the next take
        # sees the hole and reads it from history.
        events = events[: cfg.max_chunk_events]
        return await self.closure(read, Answer(events, events[-1].seq, True, False))

    async def long_poll(self, request: Request, read: Read, receive: Receive) -> Response:
        """``live=long-poll``: data at once if there is any, else wait for the hub (204 then)."""
        cfg = self.svc(request).config.durable
        async with self.live(request, read, receive) as tail:
            state, after = await self.state(read)
            epoch = state.epoch or ""
            answer: Answer | None = None
            if after < state.tail:
                answer = await self.read_range(request, read, state, after)
            elif not state.closed:
                deadline = time.monotonic() + cfg.long_poll_timeout
                while answer is None and not tail.gone and not self.closing:
                    left = deadline - time.monotonic()
                    if left <= 0 or not await wait_for_wake(tail, left):
                        break
                    answer = await self.next_live(request, read, tail, epoch, after)
        if answer is None:
            # Timeout, or closed at the tail (answered at once, no waiting).
            headers = self.headers(epoch, after, up_to_date=True, closed=state.closed)
            del headers["content-type"]  # a 204 has no body
            headers["cache-control"] = "no-store"
            if not state.closed:
                headers["stream-cursor"] = self.cursor(request, read)
            return Response(None, 204, headers)
        headers = self.answer_headers(epoch, answer)
        mark = ":c" if answer.closed else ""
        headers["etag"] = f'"{read.request_id}:{epoch}:{after:x}:{answer.end:x}{mark}"'
        headers["cache-control"] = "no-cache"
        if not answer.closed:
            headers["stream-cursor"] = self.cursor(request, read)
        return Response(body_of(answer.events), 200, headers)


def durable_routes(drain_hooks: list[Callable[[], None]]) -> list[Route]:
    """The read API's routes; appends to ``drain_hooks`` what ends its live reads at shutdown."""
    reads = DurableReads()
    drain_hooks.append(reads.drain)
    return [Route(PATH, reads)]


__all__ = ["EXPOSED_HEADERS", "PATH", "DurableReads", "body_of", "durable_routes"]
