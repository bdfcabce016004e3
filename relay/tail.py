"""Placeholder replaced by the tail implementation."""
from __future__ import annotations
import asyncio, json
from typing import Any
import websockets

def run_tail(args: Any) -> int:
    async def go() -> None:
        async with websockets.connect(args.url) as ws:
            async for msg in ws:
                print(msg, flush=True)
    asyncio.run(go())
    return 0
