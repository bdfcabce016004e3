"""Helpers of the Durable Streams read API tests: publishing a request, reading SSE."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from relay.orchestrator.client import RelayClient

PATH = "/v1/stream/requests/{}"


@dataclass
class Run:
    """A request published step by step, the way an orchestrator does."""

    client: RelayClient
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    root: str = field(default_factory=lambda: str(uuid.uuid4()))
    child: str = field(default_factory=lambda: str(uuid.uuid4()))

    async def start(self) -> int:
        """The root agent is spawned (the stream exists from here)."""
        return await self.client.publish(
            self.request_id,
            {
                "type": "agent_spawned",
                "agent_id": self.root,
                "parent_id": None,
                "task_description": "durable streams test",
                "depth": 0,
                "index": 0,
                "total": 1,
            },
        )

    async def delta(self, text: str = "x") -> int:
        return await self.client.publish(
            self.request_id, {"type": "agent_text_delta", "agent_id": self.root, "text": text}
        )

    async def deltas(self, n: int) -> int:
        seq = 0
        for i in range(n):
            seq = await self.delta(f"d{i}")
        return seq

    async def child_done(self) -> int:
        """A sub-agent spawns and completes: terminal, but not the request's outcome."""
        await self.client.publish(
            self.request_id,
            {
                "type": "agent_spawned",
                "agent_id": self.child,
                "parent_id": self.root,
                "task_description": "child",
                "depth": 1,
                "index": 0,
                "total": 1,
            },
        )
        return await self.complete(self.child)

    async def complete(self, agent_id: str | None = None) -> int:
        """An agent completes; the root's completion decides the request's outcome."""
        return await self.client.publish(
            self.request_id,
            {
                "type": "agent_completed",
                "agent_id": agent_id or self.root,
                "result_summary": "done",
                "tokens_used": 1,
                "duration_ms": 1,
            },
        )


def seqs(items: list[dict[str, Any]]) -> list[int]:
    return [int(i["seq"]) for i in items]


@dataclass
class SseEvent:
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Parse a ``text/event-stream`` body (comments skipped) as it arrives."""
    kind: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if kind is not None and data:
                yield SseEvent(kind, "\n".join(data))
            kind, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


async def follow_offsets(
    client: httpx.AsyncClient, url: str, offset: str = "-1"
) -> tuple[list[dict[str, Any]], list[httpx.Response]]:
    """Catch-up reads from ``offset`` until up to date: every item and every answer."""
    items: list[dict[str, Any]] = []
    answers: list[httpx.Response] = []
    while True:
        answer = await client.get(url, params={"offset": offset})
        assert answer.status_code == 200, answer.text
        answers.append(answer)
        items.extend(answer.json())
        offset = answer.headers["stream-next-offset"]
        if "stream-up-to-date" in answer.headers:
            return items, answers
