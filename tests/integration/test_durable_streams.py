"""The Durable Streams read API against real redis-server and gateway processes.

Offsets, chunked catch-up, closure, cache headers, long-poll woken by the
hub, SSE, bad input, auth, tenancy and limits (docs/PROTOCOL.md, "Durable
Streams read API").
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from relay.config import HistoryConfig
from relay.gateway.auth import mint_token
from relay.orchestrator.client import RelayClient
from tests.integration.durable_support import PATH, Run, follow_offsets, seqs, sse_events
from tests.support import Gateway, RedisServer, eventually, numsub

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]
SECRET = "durable-streams-secret-" + "x" * 32


@pytest.fixture
async def relay_client(redis_server: RedisServer) -> AsyncIterator[RelayClient]:
    client = RelayClient.from_url(redis_server.url)
    yield client
    await client.aclose()


def url(gw: Gateway, rid: str) -> str:
    return gw.http + PATH.format(rid)


def watched(gw: Gateway) -> int:
    return int(gw.get("/readyz")[1]["watched_requests"])


async def test_catch_up_reads_chunks_and_resumes_from_any_offset_it_was_given(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway({"RELAY_DURABLE_MAX_CHUNK_EVENTS": "10"})
    run = Run(relay_client)
    await run.start()
    last = await run.deltas(24)
    async with httpx.AsyncClient(timeout=10) as http:
        items, answers = await follow_offsets(http, url(gw, run.request_id))
        assert seqs(items) == list(range(1, last + 1))
        assert [len(a.json()) for a in answers] == [10, 10, 5]
        offsets = [a.headers["stream-next-offset"] for a in answers]
        assert offsets == sorted(offsets) and len(set(offsets)) == 3, offsets
        # Full chunks can no longer change; the one at the open tail can.
        for full in answers[:2]:
            assert full.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert "stream-up-to-date" not in full.headers
        assert answers[2].headers["cache-control"] == "no-cache"
        assert answers[2].headers["stream-up-to-date"] == "true"
        assert "stream-closed" not in answers[2].headers
        # Each item is the frame the WebSocket sends: the event plus request_id, seq, ts.
        assert items[1]["type"] == "agent_text_delta" and items[1]["request_id"] == run.request_id
        assert "ts" in items[1]

        # Resuming from the first offset returns exactly what followed it.
        resumed, _ = await follow_offsets(http, url(gw, run.request_id), offsets[0])
        assert seqs(resumed) == list(range(11, last + 1))

        # A repeat read with the ETag costs nothing.
        again = await http.get(
            url(gw, run.request_id),
            params={"offset": "-1"},
            headers={"if-none-match": answers[0].headers["etag"]},
        )
        assert again.status_code == 304 and again.content == b""

        # The tail itself: an empty array, up to date.
        tail = await http.get(url(gw, run.request_id), params={"offset": offsets[-1]})
        assert tail.json() == [] and tail.headers["stream-next-offset"] == offsets[-1]


async def test_head_and_now_name_the_tail_and_are_never_cached(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway()
    run = Run(relay_client)
    await run.start()
    await run.deltas(3)
    async with httpx.AsyncClient(timeout=10) as http:
        head = await http.head(url(gw, run.request_id))
        assert head.status_code == 200
        assert head.headers["content-type"] == "application/json"
        assert head.headers["cache-control"] == "no-store"
        assert "stream-closed" not in head.headers
        now = await http.get(url(gw, run.request_id), params={"offset": "now"})
        assert now.status_code == 200 and now.json() == []
        assert now.headers["stream-next-offset"] == head.headers["stream-next-offset"]
        assert now.headers["stream-up-to-date"] == "true"
        assert now.headers["cache-control"] == "no-store" and "etag" not in now.headers
        _, answers = await follow_offsets(http, url(gw, run.request_id))
        assert answers[-1].headers["stream-next-offset"] == head.headers["stream-next-offset"]


async def test_the_stream_closes_at_the_outcome_and_stays_closed(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway({"RELAY_DURABLE_LONG_POLL_TIMEOUT": "60"})
    run = Run(relay_client)
    await run.start()
    await run.deltas(2)
    await run.child_done()
    async with httpx.AsyncClient(timeout=20) as http:
        # A sub-agent's end is not the request's: still open.
        assert "stream-closed" not in (await http.head(url(gw, run.request_id))).headers
        final = await run.complete()
        # Published after the outcome: not part of the stream.
        await run.delta("late")
        items, answers = await follow_offsets(http, url(gw, run.request_id))
        assert seqs(items) == list(range(1, final + 1))
        end = answers[-1]
        assert end.headers["stream-closed"] == "true"
        assert end.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert end.headers["etag"].endswith(':c"')
        tail = end.headers["stream-next-offset"]
        head = await http.head(url(gw, run.request_id))
        assert head.headers["stream-closed"] == "true"
        assert head.headers["stream-next-offset"] == tail
        eof = await http.get(url(gw, run.request_id), params={"offset": tail})
        assert eof.status_code == 200 and eof.json() == []
        assert eof.headers["stream-closed"] == "true"
        # Long-poll at the end of a closed stream answers at once (the timeout is 60 s).
        poll = await http.get(url(gw, run.request_id), params={"offset": tail, "live": "long-poll"})
        assert poll.status_code == 204
        assert poll.headers["stream-closed"] == "true"
        assert poll.headers["stream-up-to-date"] == "true"
        assert "stream-cursor" not in poll.headers
        now = await http.get(url(gw, run.request_id), params={"offset": "now", "live": "long-poll"})
        assert now.status_code == 204 and now.headers["stream-next-offset"] == tail


async def test_long_poll_is_woken_by_the_hub_not_by_polling_redis(
    start_gateway: StartGateway, relay_client: RelayClient, redis_server: RedisServer
) -> None:
    gw = start_gateway({"RELAY_DURABLE_LONG_POLL_TIMEOUT": "60"})
    run = Run(relay_client)
    await run.start()
    channel = relay_client.keys.request_channel(run.request_id)
    async with httpx.AsyncClient(timeout=30) as http:
        head = await http.head(url(gw, run.request_id))
        tail = head.headers["stream-next-offset"]
        poll = asyncio.create_task(
            http.get(url(gw, run.request_id), params={"offset": tail, "live": "long-poll"})
        )
        await eventually(lambda: watched(gw) == 1, 10, "the long-poll registered with the hub")
        # The wait holds the request's channel on the gateway's one pub/sub connection.
        assert numsub(redis_server, channel) == 1
        seq = await run.delta("wake up")
        answer = await poll
        assert answer.status_code == 200, answer.text
        assert seqs(answer.json()) == [seq]
        assert answer.headers["cache-control"] == "no-cache"
        assert answer.headers["stream-cursor"].isdigit()
        assert answer.headers["stream-up-to-date"] == "true"
        assert answer.headers["stream-next-offset"] > tail
        await eventually(lambda: watched(gw) == 0, 10, "the hub forgot the finished read")
        assert numsub(redis_server, channel) == 0

        # A long-poll behind the tail answers at once from history.
        behind = await http.get(
            url(gw, run.request_id), params={"offset": "-1", "live": "long-poll"}
        )
        assert seqs(behind.json()) == [1, seq]


async def test_long_poll_times_out_with_204_and_a_cursor(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway({"RELAY_DURABLE_LONG_POLL_TIMEOUT": "1"})
    run = Run(relay_client)
    await run.start()
    async with httpx.AsyncClient(timeout=20) as http:
        tail = (await http.head(url(gw, run.request_id))).headers["stream-next-offset"]
        answer = await http.get(
            url(gw, run.request_id), params={"offset": tail, "live": "long-poll"}
        )
        assert answer.status_code == 204
        assert answer.headers["stream-next-offset"] == tail
        assert answer.headers["stream-up-to-date"] == "true"
        assert answer.headers["cache-control"] == "no-store"
        cursor = answer.headers["stream-cursor"]
        # Echoing the cursor of the current interval moves it strictly forward.
        again = await http.get(
            url(gw, run.request_id), params={"offset": tail, "live": "long-poll", "cursor": cursor}
        )
        assert int(again.headers["stream-cursor"]) > int(cursor)


async def test_sse_sends_history_then_live_events_then_closes(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway({"RELAY_DURABLE_MAX_CHUNK_EVENTS": "4"})
    run = Run(relay_client)
    await run.start()
    await run.deltas(5)
    got: list[dict[str, Any]] = []
    controls: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("GET", url(gw, run.request_id), params={"offset": "-1", "live": "sse"}) as sse,
    ):
        assert sse.status_code == 200
        assert sse.headers["content-type"].startswith("text/event-stream")
        assert sse.headers["cache-control"] == "no-cache"
        assert sse.headers["x-accel-buffering"] == "no"
        kinds: list[str] = []
        async for event in sse_events(sse):
            kinds.append(event.event)
            if event.event == "data":
                got.extend(event.json())
            else:
                control = event.json()
                controls.append(control)
                if control.get("upToDate") and len(controls) == 2:
                    # Caught up (6 events in chunks of 4): now live.
                    await run.deltas(2)
                    await run.complete()
        # The server ended the response after the closing control event.
    final = seqs(got)[-1]
    assert seqs(got) == list(range(1, final + 1)) and got[-1]["type"] == "agent_completed"
    assert kinds[0] == "data" and kinds[-1] == "control"
    assert all(a != b or a == "control" for a, b in itertools.pairwise(kinds))
    assert "upToDate" not in controls[0] and controls[1]["upToDate"] is True
    assert controls[-1]["streamClosed"] is True and "streamCursor" not in controls[-1]
    assert all(c["streamCursor"].isdigit() for c in controls[:-1])
    offsets = [c["streamNextOffset"] for c in controls]
    assert offsets == sorted(offsets)
    async with httpx.AsyncClient(timeout=10) as sync:
        tail = (await sync.head(url(gw, run.request_id))).headers["stream-next-offset"]
        assert offsets[-1] == tail
        # Reconnecting at the end of a closed stream: one closing control event, then EOF.
        again = await sync.get(url(gw, run.request_id), params={"offset": tail, "live": "sse"})
    assert again.text.count("event: control") == 1 and "event: data" not in again.text
    closing = json.loads(again.text.split("data: ", 1)[1].split("\n", 1)[0])
    assert closing == {"streamNextOffset": tail, "streamClosed": True, "upToDate": True}


async def test_bad_input_gets_a_clear_json_error(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway()
    run = Run(relay_client)
    await run.start()
    base = url(gw, run.request_id)
    async with httpx.AsyncClient(timeout=10) as http:
        tail = (await http.head(base)).headers["stream-next-offset"]
        epoch = tail.rpartition("_")[0]
        cases: list[tuple[dict[str, str], int, str]] = [
            ({"offset": "garbage"}, 400, "bad_offset"),
            ({"offset": f"{epoch}_12"}, 400, "bad_offset"),
            ({"offset": "a/b_0000000000000001"}, 400, "bad_offset"),
            ({"live": "long-poll"}, 400, "invalid_field"),
            ({"offset": "-1", "live": "websocket"}, 400, "invalid_field"),
            ({"offset": "otherepoch_0000000000000001"}, 410, "epoch_changed"),
            ({"offset": f"{epoch}_00000000000000ff"}, 410, "ahead_of_stream"),
        ]
        for params, status, code in cases:
            answer = await http.get(base, params=params)
            assert answer.status_code == status, (params, answer.text)
            assert answer.json()["code"] == code and answer.json()["message"], answer.text
            assert answer.headers["cache-control"] == "no-store"
        assert (await http.get(url(gw, "not-a-uuid"))).status_code == 400
        missing = await http.get(url(gw, "00000000-0000-4000-8000-000000000000"))
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        for method in ("POST", "PUT", "DELETE"):
            write = await http.request(method, base, content=b"[{}]")
            assert write.status_code == 405, method
            assert write.headers["allow"] == "GET, HEAD"
            assert write.json()["code"] == "method_not_allowed"


async def test_history_that_no_longer_reaches_the_offset_is_gone(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gw = start_gateway()
    async with RelayClient.from_url(redis_server.url, history=HistoryConfig(max_events=5)) as c:
        run = Run(c)
        await run.start()
        await run.deltas(10)
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(url(gw, run.request_id), params={"offset": "-1"})
        assert answer.status_code == 410 and answer.json()["code"] == "history_trimmed"
        # From the tail there is nothing to miss.
        assert (
            await http.get(url(gw, run.request_id), params={"offset": "now"})
        ).status_code == 200


def jwt_env(**extra: str) -> dict[str, str]:
    return {"RELAY_AUTH_MODE": "jwt", "RELAY_AUTH_JWT_SECRET": SECRET, **extra}


def bearer(tenant: str = "default", caps: tuple[str, ...] = ("view",), **kw: Any) -> dict[str, str]:
    token = mint_token(SECRET, tenant=tenant, caps=caps, sub="reader", ttl_seconds=600, **kw)
    return {"authorization": f"Bearer {token}"}


async def test_auth_and_tenancy_are_the_websockets(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway(jwt_env())
    run = Run(relay_client)
    await run.start()
    base = url(gw, run.request_id)
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(base)).status_code == 401
        assert (await http.get(base, headers={"authorization": "Bearer nope"})).status_code == 401
        assert (await http.get(base, headers=bearer(caps=("cancel",)))).status_code == 403
        other = "00000000-0000-4000-8000-000000000000"
        assert (await http.get(base, headers=bearer(requests=[other]))).status_code == 403
        # Another tenant's token finds no such request in its own tenant.
        assert (await http.get(base, headers=bearer(tenant="other"))).status_code == 404
        ok = await http.get(base, headers=bearer(requests=[run.request_id]))
        assert ok.status_code == 200 and seqs(ok.json()) == [1]
        # Tenant data is never offered to shared caches.
        await run.complete()
        closed = await http.get(base, headers=bearer())
        assert closed.headers["cache-control"] == "private, max-age=31536000, immutable"


async def test_live_reads_count_against_the_connection_limits(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway(
        {
            "RELAY_LIMITS_MAX_CONNECTIONS_PER_SUBJECT": "1",
            "RELAY_DURABLE_LONG_POLL_TIMEOUT": "60",
        }
    )
    run = Run(relay_client)
    await run.start()
    async with httpx.AsyncClient(timeout=30) as http:
        tail = (await http.head(url(gw, run.request_id))).headers["stream-next-offset"]
        params = {"offset": tail, "live": "long-poll"}
        first = asyncio.create_task(http.get(url(gw, run.request_id), params=params))
        await eventually(lambda: watched(gw) == 1, 10, "the first long-poll waiting")
        second = await http.get(url(gw, run.request_id), params=params)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["code"] == "rate_limited"
        await run.delta()
        assert (await first).status_code == 200
        # Released: the next one is admitted.
        third = await http.get(
            url(gw, run.request_id), params={"offset": "-1", "live": "long-poll"}
        )
        assert third.status_code == 200


async def test_history_reads_are_charged_to_the_replay_budget(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway(
        {"RELAY_LIMITS_REPLAY_BYTES_PER_MINUTE": "2000", "RELAY_DURABLE_MAX_CHUNK_EVENTS": "10"}
    )
    run = Run(relay_client)
    await run.start()
    await run.deltas(40)
    async with httpx.AsyncClient(timeout=10) as http:
        offset, statuses = "-1", []
        for _ in range(6):
            answer = await http.get(url(gw, run.request_id), params={"offset": offset})
            statuses.append(answer.status_code)
            if answer.status_code != 200:
                assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
                assert answer.json()["code"] == "rate_limited"
                break
            offset = answer.headers["stream-next-offset"]
        assert statuses[0] == 200 and statuses[-1] == 429, statuses


async def test_sigterm_ends_live_reads_so_clients_move_on(
    start_gateway: StartGateway, relay_client: RelayClient
) -> None:
    gw = start_gateway({"RELAY_DURABLE_LONG_POLL_TIMEOUT": "60"})
    run = Run(relay_client)
    await run.start()
    async with httpx.AsyncClient(timeout=30) as http:
        params = {"offset": "now", "live": "long-poll"}
        poll = asyncio.create_task(http.get(url(gw, run.request_id), params=params))

        async def sse_text() -> str:
            params = {"offset": "now", "live": "sse"}
            async with http.stream("GET", url(gw, run.request_id), params=params) as sse:
                return "".join([chunk async for chunk in sse.aiter_text()])

        sse = asyncio.create_task(sse_text())
        await eventually(lambda: watched(gw) == 1, 10, "both live reads registered")
        gw.signal(signal.SIGTERM)
        answer = await poll
        # Answered by the draining gateway (not cut off or failed at the drain timeout).
        assert answer.status_code == 204, answer.text
        assert answer.headers["stream-up-to-date"] == "true"
        text = await sse
        assert text.count("event: control") == 1 and text.endswith("\n\n")
    code = await asyncio.to_thread(gw.wait, 15)
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in gw.output()
