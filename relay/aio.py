"""Small asyncio helpers for code that owns its tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until every one of them has finished.

    Nothing is caught here: the tasks' own ``CancelledError`` never reaches
    the caller (``asyncio.wait`` does not raise it), while a cancellation of
    the *caller* propagates as usual. Failures raised while the tasks unwound
    are retrieved, so they are not reported as "never retrieved".
    """
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()


async def wait_first(*aws: Coroutine[Any, Any, object]) -> None:
    """Return as soon as one of ``aws`` finishes; the others are cancelled and awaited."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(*tasks)
