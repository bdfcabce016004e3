"""Automatic pipelining: the Redis calls made in one pass of the loop share a round trip.

Each Redis round trip from asyncio costs far more client CPU than the command
itself: taking a pooled connection, a timeout, a socket write, a wakeup, a
read. Twenty agents that each publish one delta at a time therefore spend
most of their time on round trips, not on Redis (measured in
docs/BENCHMARKS.md, "Unbatched publishing"). An :class:`AutoPipeline` queues
the calls made while the loop runs and sends them as one non-transactional
pipeline: each call is still its own command (a publish script call stays
atomic on its own, with its own seqs), only the round trip is shared. This is
what ioredis calls auto-pipelining and what Lettuce does on one connection.

On a single Redis or a Sentinel-managed one the commands are packed here and
written on a pooled connection directly (redis-py's pipeline object spends
more on its own bookkeeping and per-argument encoding than Redis spends
running a publish); on a Redis Cluster, where commands must be routed by
slot, redis-py's cluster pipeline sends them.

At most ``max_in_flight`` pipelines are on the wire at once; calls made while
they are out wait for the next one, so the batch grows with the load and a
lone call is sent in the very next pass of the loop. Each pipeline carries at
most ``max_calls`` calls (bounded; the overflow policy is *wait for the next
pipeline*, which backs callers up on their own futures).

Cancelling a caller never cancels a pipeline others share: a call cancelled
before its pipeline leaves is dropped, one cancelled after is still run (its
reply is discarded). :meth:`aclose` cancels and awaits the pipelines in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import DataError, ResponseError

from relay import redisconn
from relay.aio import cancel_and_wait

MAX_CALLS = 256
"""Calls per pipeline: keeps one pipeline's reply parsing to a bounded slice of the loop."""
MAX_ARGS = 2048
"""Arguments per pipeline, about: large calls (a batch of 256 deltas is over 1,000
arguments) gain nothing from sharing a round trip, and Redis replies to a
pipeline only once it has run all of it, so big ones travel (nearly) alone."""
MAX_IN_FLIGHT = 8
"""Pipelines on the wire at once: Redis runs some while this process reads others
(measured: 2 and 8 alike for small calls; 8 keeps big batches of 20 agents overlapping)."""


def pack_commands(commands: list[tuple[Any, ...]]) -> bytes:
    """The RESP encoding of ``commands``, as redis-py's would be: utf-8 text, bytes
    as they are, numbers in decimal; anything else is refused as redis-py does."""
    out: list[bytes] = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, int) and not isinstance(arg, bool):
                arg = b"%d" % arg
            elif isinstance(arg, float):
                arg = repr(arg).encode()
            elif not isinstance(arg, bytes):
                raise DataError(f"invalid input of type {type(arg).__name__!r} in {args[0]!r}")
            out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


class AutoPipeline:
    """Sends the calls queued in one pass of the event loop as one pipeline.

    >>> calls = AutoPipeline(redis)
    >>> seq, ok = await asyncio.gather(calls.call("INCR", "k"), calls.call("SET", "x", 1))
    >>> await calls.aclose()   # one round trip carried both
    """

    def __init__(
        self, redis: Redis, *, max_calls: int = MAX_CALLS, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        if max_calls < 1:
            raise ValueError("max_calls: must be >= 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight: must be >= 1")
        self.redis = redis
        self.max_calls = max_calls
        self.max_in_flight = max_in_flight
        self._queue: deque[tuple[tuple[Any, ...], asyncio.Future[Any]]] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._direct = not redisconn.is_cluster(redis)
        self.pipelines = 0
        """Pipelines sent so far (for tests and benchmarks)."""
        self.calls = 0
        """Calls sent so far."""

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (``"EVALSHA", sha, ...``); its future gets the reply.

        The future's exception is the command's own error (a ``ResponseError``
        such as NOSCRIPT or a script's refusal) or, when the pipeline could
        not be sent or read, the connection error, for every call in it.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if not self._scheduled and len(self._in_flight) < self.max_in_flight:
            # Not at once: the rest of this pass of the loop joins the pipeline.
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    async def call(self, *args: Any) -> Any:
        """Run one command in the next pipeline; returns its reply or raises its error."""
        return await self.submit(*args)

    @property
    def queued(self) -> int:
        """Calls waiting for a pipeline."""
        return len(self._queue)

    async def aclose(self) -> None:
        """Cancel and await the pipelines in flight; calls still queued are cancelled."""
        while self._queue:
            self._queue.popleft()[1].cancel()
        await cancel_and_wait(*self._in_flight)

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and len(self._in_flight) < self.max_in_flight:
            batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
            size = 0
            while self._queue and len(batch) < self.max_calls and size < MAX_ARGS:
                args, future = self._queue.popleft()
                if not future.done():  # a caller cancelled before it left: drop it
                    batch.append((args, future))
                    size += len(args)
            if not batch:
                return
            task = asyncio.create_task(self._send(batch), name="relay-autopipeline")
            self._in_flight.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        self.pipelines += 1
        self.calls += len(batch)
        commands = [args for args, _ in batch]
        try:
            if self._direct:
                replies = await self._write_and_read(commands)
            else:
                pipe = self.redis.pipeline(transaction=False)
                for args in commands:
                    pipe.execute_command(*args)
                replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            # The connection failed: no call knows whether it ran; each caller's
            # retry (with its publish id) sorts that out.
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _write_and_read(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pool = self.redis.connection_pool
        # (redis-py leaves get_connection untyped.)
        connection = await pool.get_connection()
        try:
            packed = pack_commands(commands)

            async def attempt() -> list[Any]:
                await connection.send_packed_command(packed)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as exc:  # this command's error reply
                        replies.append(exc)
                return replies

            async def failed(_: BaseException) -> None:
                await connection.disconnect()

            # As redis-py's own pipeline: resent on a fresh connection on a
            # connection error, as the client's retry policy says. A resent
            # publish is recognised by its publish id.
            replies: list[Any] = await connection.retry.call_with_retry(attempt, failed)
            return replies
        finally:
            await pool.release(connection)
