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
