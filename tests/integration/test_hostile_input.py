"""Frames and bodies that used to kill a connection or answer 500, against a real gateway.

A 1,970-byte frame of nested brackets raised RecursionError in the reader and
dropped the socket without a close frame; a lone surrogate in ``command_id``
killed the writer when it was echoed; REST answered 500 for both, once after
already performing the cancel. Each is now refused up front with
``invalid_json`` (400 over REST), nothing is performed, and the connection
stays open. The gateway logs a bounded number of lines however often it is sent.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.support import Gateway, RedisServer, WsClient

DEEP = "[" * 985 + "]" * 985
HOSTILE = [
    DEEP,
    '{"type":"cancel_agent","agent_id":"%s","reason":%s}' % (uuid.uuid4(), DEEP),
    '{"type":"ping","command_id":"\\ud800"}',
    '{"type":"cancel_agent","agent_id":"%s","command_id":"\\udc00"}' % uuid.uuid4(),
]


def post_raw(url: str, body: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=body.encode(), method="POST", headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


async def test_hostile_frames_are_answered_over_a_real_socket(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway()
    async with WsClient(gateway.ws_url + "?stream=none") as client:
        for _ in range(50):  # repeated: answered every time, logged once per cause
            for frame in HOSTILE:
                await client.ws.send(frame)
        await client.wait_for(lambda c: len(c.of_type("error")) >= 50 * len(HOSTILE))
        await client.send({"type": "ping", "command_id": "still-here"})
        await client.wait_for(lambda c: bool(c.of_type("pong")))
        assert client.of_type("pong")[0]["command_id"] == "still-here"
        errors = client.of_type("error")
        assert len(errors) == 50 * len(HOSTILE)
        assert {e["code"] for e in errors} == {"invalid_json"}
        assert client.close_code is None
    assert "Traceback" not in gateway.output()
    assert gateway.output().count("\n") < 40


@pytest.mark.parametrize("body", HOSTILE[1:], ids=["deep-reason", "surrogate-id", "surrogate"])
def test_hostile_rest_bodies_are_400_and_perform_nothing(
    start_gateway: Callable[..., Gateway], redis_server: RedisServer, body: str
) -> None:
    gateway = start_gateway()
    target = str(uuid.uuid4())
    status, reply = post_raw(f"{gateway.http}/api/v1/agents/{target}/cancel", body)
    assert status == 400, reply
    assert reply["code"] == "invalid_json"
    r = redis.Redis.from_url(redis_server.url)
    try:
        assert r.keys("relay:*:cancel:*") == []  # nothing was cancelled
    finally:
        r.close()
    status, reply = post_raw(
        f"{gateway.http}/api/v1/requests/{target}/budget",
        '{"decision":"continue","command_id":"\\ud800"}',
    )
    assert status == 400 and reply["code"] == "invalid_json"
