"""Small asyncio helpers for code that owns its tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def stop_task(task: asyncio.Future[Any], retry_every: float = 0.1) -> BaseException | None:
    """Cancel ``task``, wait until it has finished, and return its exception, if any.

    One ``cancel()`` is not always enough: on Python 3.11, ``asyncio.wait_for``
    returns the result instead of raising when the cancellation lands just as
    the awaited operation completes (CPython gh-86296, fixed in 3.12), and
    redis-py sends every command through ``wait_for`` when ``socket_timeout``
    is set. A task cancelled while it talks to Redis then carries on, and an
    ``await task`` after a single cancel can hang for good (a hub that never
    rebuilds its connection, a shutdown that never ends). So cancel again
    until it is done. Our own cancellation is never swallowed: ``asyncio.wait``
    lets it through.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=retry_every)
    if task.cancelled():
        return None
    return task.exception()


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until every one of them has finished (see :func:`stop_task`).

    Nothing is caught here: the tasks' own ``CancelledError`` never reaches
    the caller, while a cancellation of the *caller* propagates as usual.
    Failures raised while the tasks unwound are retrieved, so they are not
    reported as "never retrieved".
    """
    for task in tasks:
        task.cancel()
    for task in tasks:
        await stop_task(task)


async def wait_first(*aws: Coroutine[Any, Any, object]) -> None:
    """Return as soon as one of ``aws`` finishes; the others are cancelled and awaited."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(*tasks)


class Signal:
    """An ``asyncio.Event`` for one waiter at a time, about a tenth of its size.

    Every connection keeps a few of these for its whole life (its writer's
    wake-up, its token refresh). An ``asyncio.Event`` carries a waiter deque
    (760 bytes even when empty) and an instance dict, over 1 KiB in all; this
    keeps one future, made only while someone waits. A second concurrent
    waiter is refused: a cancelled waiter cancels the shared future.
    """

    __slots__ = ("_value", "_waiter")

    def __init__(self) -> None:
        self._value = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        """Whether the signal is set."""
        return self._value

    def set(self) -> None:
        """Set the signal and wake the waiter, if any."""
        if not self._value:
            self._value = True
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        """Clear the signal: the next :meth:`wait` waits for a :meth:`set`."""
        self._value = False

    async def wait(self) -> None:
        """Return once the signal is set (at once if it is)."""
        if self._value:
            return
        if self._waiter is not None and not self._waiter.done():
            raise RuntimeError("Signal allows one waiter at a time")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
