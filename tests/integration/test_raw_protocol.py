"""An orchestrator written from docs/PROTOCOL.md alone, without the relay package.

Everything this module publishes goes through the commands the protocol page
documents, issued with plain redis-py (and once over a bare socket, to see
the RESP types a client in any language sees): SCRIPT LOAD of the Lua file as
read from disk, EVALSHA with the documented KEYS and ARGV, ZADD to the
activity index in the same pipeline, and the documented NOSCRIPT and retry
handling. A real ``relay gateway`` process must then serve exactly those
events, with the seqs the script assigned, to WebSocket clients, live and
from history. Nothing here imports ``relay``: if this test needs to know
something the page does not say, the page is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from tests.support import Gateway, RedisServer, WsClient

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]

# As the page says: the scripts live in relay/wire/lua/ of the repository.
PUBLISH_LUA = Path(__file__).resolve().parents[2] / "relay" / "wire" / "lua" / "publish.lua"

TENANT = "default"
# The configuration defaults the page lists: history.max_events,
# history.ttl_seconds, history.state_ttl_seconds.
MAX_EVENTS, HISTORY_TTL, STATE_TTL = 10_000, 24 * 3600, 7 * 24 * 3600
RETRY_WINDOW_MS = 70_000


def keys_of(rid: str) -> list[str]:
    base = f"relay:{TENANT}:req:{{{rid}}}"
    return [f"{base}:seq", f"{base}:epoch", f"{base}:history", f"{base}:state"]


def compact(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


class RawOrchestrator:
    """The publish recipe of docs/PROTOCOL.md, step by step."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.source = PUBLISH_LUA.read_bytes()
        # EVALSHA needs the SHA1 of the script text; SCRIPT LOAD returns it too.
        self.sha = hashlib.sha1(self.source).hexdigest()

    async def load(self) -> None:
        loaded = await self.redis.script_load(self.source)
        assert loaded == self.sha

    def argv(self, rid: str, events: list[dict[str, Any]], publish_id: str) -> list[Any]:
        pairs: list[str] = []
        for event in events:
            pairs += [event["type"], compact(event)]
        return [rid, uuid.uuid4().hex[:12], MAX_EVENTS, HISTORY_TTL, STATE_TTL,
                f"relay:{TENANT}:req:{{{rid}}}:events", f"relay:{TENANT}:events",
                publish_id, "0", *pairs]  # fmt: skip

    async def call(self, rid: str, argv: list[Any]) -> list[Any]:
        """EVALSHA and ZADD in one round trip; on NOSCRIPT, SCRIPT LOAD and retry."""
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            pipe.evalsha(self.sha, 4, *keys_of(rid), *argv)
            pipe.zadd(f"relay:{TENANT}:active", {rid: int(time.time() * 1000)})
            result, _ = await pipe.execute(raise_on_error=False)
            if isinstance(result, NoScriptError):
                await self.load()
                continue
            if isinstance(result, Exception):
                raise result
            return list(result)
        raise AssertionError("NOSCRIPT twice")

    async def publish(self, rid: str, *events: dict[str, Any]) -> list[Any]:
        return await self.call(rid, self.argv(rid, list(events), uuid.uuid4().hex))


def resp_command(port: int, *args: str) -> bytes:
    """Send one command over a bare socket; the raw RESP reply, as any client reads it."""
    out = b"*%d\r\n" % len(args)
    for arg in args:
        raw = arg.encode()
        out += b"$%d\r\n%s\r\n" % (len(raw), raw)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(out)
        reply = b""
        # The replies read here are short and end with CRLF.
        while not reply.endswith(b"\r\n") or reply.count(b"\r\n") < expected_lines(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def expected_lines(reply: bytes) -> int:
    """Lines of a reply of the publish script: an error line, or a 4-element array."""
    if reply.startswith(b"*4"):
        return 1 + 2 + 2 + 1 + 1  # header, $epoch + data, $ts + data, :first, :last
    return 1


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), f"duplicate keys in a frame: {names}"
    return dict(pairs)


def spawned(agent: str) -> dict[str, Any]:
    return {"type": "agent_spawned", "agent_id": agent, "parent_id": None,
            "task_description": "research", "depth": 0, "index": 0, "total": 1}  # fmt: skip


def delta(agent: str, text: str) -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": agent, "text": text}


async def test_an_orchestrator_without_relay_is_served_by_a_gateway(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gateway = start_gateway()
    rid, root = str(uuid.uuid4()), str(uuid.uuid4())
    redis = Redis.from_url(redis_server.url)
    orch = RawOrchestrator(redis)
    try:
        async with WsClient(f"{gateway.ws_url}?request_id={rid}") as live:
            await live.wait_for(lambda c: bool(c.of_type("subscribed")))

            # The script is not loaded yet: the first EVALSHA gets NOSCRIPT.
            epoch, ts, first, last = await orch.publish(rid, spawned(root))
            assert (first, last) == (1, 1) and isinstance(epoch, bytes)
            assert isinstance(ts, bytes) and ts.isdigit()
            reply = await orch.publish(rid, *(delta(root, t) for t in ("a", "b", "c")))
            assert reply[0] == epoch and reply[2:] == [2, 4]
            reply = await orch.publish(
                rid,
                {"type": "budget_update", "request_id": rid, "tokens_used": 900,
                 "budget_total": 1000, "percentage": 90.0},
                {"type": "synthesis_started", "request_id": rid},
                {"type": "agent_completed", "agent_id": root, "result_summary": "done",
                 "tokens_used": 900, "duration_ms": 12},
            )  # fmt: skip
            assert reply[2:] == [5, 7]

            # Reply types on the wire: epoch and ts bulk strings, seqs integers.
            argv = orch.argv(rid, [delta(root, "d")], uuid.uuid4().hex)
            raw = resp_command(
                redis_server.port, "EVALSHA", orch.sha, "4", *keys_of(rid), *map(str, argv)
            )
            lines = raw.split(b"\r\n")
            assert lines[0] == b"*4" and lines[1].startswith(b"$") and lines[3].startswith(b"$")
            assert lines[2] == epoch and lines[5:7] == [b":8", b":8"], raw

            # A refused call: an error reply with the documented prefix, and nothing
            # of it (not even its valid first event) is stored or published.
            other = str(uuid.uuid4())
            bad = orch.argv(
                rid,
                [delta(root, "lost"), {"type": "synthesis_started", "request_id": other}],
                uuid.uuid4().hex,
            )
            raw = resp_command(
                redis_server.port, "EVALSHA", orch.sha, "4", *keys_of(rid), *map(str, bad)
            )
            assert raw == (
                b'-ERR relay: event 2: request_id "%s" does not match the request "%s"\r\n'
                % (other.encode(), rid.encode())
            )
            with pytest.raises(ResponseError, match=r"^relay: event 2: request_id"):
                await orch.call(rid, bad)

            # A retry of a call whose reply was lost: same arguments and publish id,
            # ARGV[9] the retry window in ms; the original result, nothing twice.
            argv = orch.argv(rid, [delta(root, "once")], uuid.uuid4().hex)
            assert (await orch.call(rid, argv))[2:] == [9, 9]
            argv[8] = str(RETRY_WINDOW_MS)
            assert (await orch.call(rid, argv))[2:] == [9, 9]

            # After SCRIPT FLUSH (a restarted Redis), NOSCRIPT again, handled.
            await redis.script_flush()
            assert (await orch.publish(rid, delta(root, "z")))[2:] == [10, 10]

            await live.wait_for(lambda c: len(c.events(rid)) >= 10)
            frames = live.events(rid)
            assert [f["seq"] for f in frames] == list(range(1, 11))
            assert [f["type"] for f in frames[:7]] == [
                "agent_spawned", *["agent_text_delta"] * 3,
                "budget_update", "synthesis_started", "agent_completed",
            ]  # fmt: skip
            assert all(f["request_id"] == rid and isinstance(f["ts"], int) for f in frames)
            assert [f.get("text") for f in frames[1:4]] == ["a", "b", "c"]
            assert frames[7]["text"] == "d" and frames[8]["text"] == "once"
            assert frames[9]["text"] == "z"
            assert not live.of_type("error")

        # History entries (field "f") are the frames, each key exactly once.
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(keys_of(rid)[2])  # type: ignore[assignment]
        for entry_id, fields in entries:
            frame = json.loads(fields[b"f"], object_pairs_hook=no_duplicate_keys)
            assert entry_id == b"%d-0" % frame["seq"]

        # Resume from history on the same gateway: every entry is a whole frame.
        subscribed = {"type": "subscribe", "request_id": rid, "after_seq": 2,
                      "epoch": epoch.decode()}  # fmt: skip
        async with WsClient(gateway.ws_url) as resumed:
            answer = await resumed.request(subscribed, "subscribed")
            assert answer["seq"] == 10 and answer["epoch"] == epoch.decode()
            await resumed.wait_for(lambda c: len(c.events(rid)) >= 8)
            assert [f["seq"] for f in resumed.events(rid)] == list(range(3, 11))
            assert not resumed.of_type("resync_required")

        # The snapshot state the script keeps, and the activity index.
        async with WsClient(gateway.ws_url) as viewer:
            await viewer.send({"type": "subscribe", "request_id": rid, "snapshot": True})
            await viewer.wait_for(lambda c: bool(c.of_type("snapshot")))
            snap = viewer.of_type("snapshot")[0]
            assert snap["seq"] == 10 and snap["outcome"]["status"] == "completed"
            assert snap["budget"]["tokens_used"] == 900 and snap["synthesis_started"] is True
        status, listing = gateway.get("/api/v1/requests")
        assert status == 200 and rid in [r["request_id"] for r in listing["requests"]]
    finally:
        await redis.aclose()
