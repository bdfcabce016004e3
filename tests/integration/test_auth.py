"""Authentication, capabilities and browser rules against real gateway processes.

Every gateway here runs with ``auth.mode = "jwt"`` and an HS256 secret; the
tokens are minted the way ``relay token`` mints them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets
from websockets.typing import Origin

from relay.gateway.auth import mint_token
from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer, WsClient, eventually

pytestmark = pytest.mark.integration

SECRET = "integration-secret-" + "x" * 32
METRICS_TOKEN = "metrics-" + "m" * 24
ALL = ("view", "cancel", "decide")


def token(
    tenant: str = "default",
    caps: tuple[str, ...] = ALL,
    *,
    sub: str = "ops",
    ttl: float = 600,
    requests: tuple[str, ...] = (),
    key: str = SECRET,
) -> str:
    return mint_token(key, tenant=tenant, caps=caps, sub=sub, ttl_seconds=ttl, requests=requests)


def auth_env(**extra: str) -> dict[str, str]:
    return {
        "RELAY_AUTH_MODE": "jwt",
        "RELAY_AUTH_JWT_SECRET": SECRET,
        "RELAY_AUTH_METRICS_TOKEN": METRICS_TOKEN,
        "RELAY_AUTH_LEEWAY_SECONDS": "0",
        **extra,
    }


def http(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, decoded JSON or raw text) also for 4xx/5xx answers."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            status, hdrs, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        status, hdrs, raw = err.code, dict(err.headers), err.read()
    try:
        return status, hdrs, json.loads(raw or b"{}")
    except ValueError:
        return status, hdrs, raw.decode()


def post(gw: Gateway, path: str, bearer: str | None, body: dict[str, Any] | None = None,
         content_type: str = "application/json", **headers: str) -> tuple[int, Any]:  # fmt: skip
    hdrs = {"content-type": content_type, **headers}
    if bearer is not None:
        hdrs["authorization"] = f"Bearer {bearer}"
    status, _, reply = http(
        gw.http + path, method="POST", body=json.dumps(body or {}).encode(), headers=hdrs
    )
    return status, reply


def metric_value(gw: Gateway, sample: str) -> float:
    status, _, raw = http(
        gw.http + "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert status == 200, raw
    for line in str(raw).splitlines():
        if line.startswith(sample + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


def spawned(agent: str) -> dict[str, Any]:
    return {"type": "agent_spawned", "agent_id": agent, "parent_id": None,
            "task_description": "root", "depth": 0, "index": 0, "total": 1}  # fmt: skip


def delta(text: str = "x") -> dict[str, Any]:
    return {"type": "agent_text_delta", "agent_id": str(uuid.uuid4()), "text": text}


async def closed_with(url: str, **connect: Any) -> tuple[int | None, str]:
    """Connect and wait for the server to close; (code, reason)."""
    client = WsClient(url, **connect)
    async with client:
        await eventually(client.closed.is_set, 10, "the gateway to close the socket")
        return client.close_code, client.ws.close_reason or ""


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
def auth_gateway(start_gateway: Callable[..., Gateway]) -> Callable[..., Gateway]:
    def start(**extra: str) -> Gateway:
        return start_gateway(auth_env(**extra))

    return start


# ---------------------------------------------------------------- refused tokens


def _refused_tokens() -> dict[str, str]:
    good = token()
    head, _, sig = good.split(".")
    now = int(time.time())
    other_tenant = _b64({"sub": "ops", "tenant": "t2", "caps": list(ALL), "exp": now + 600})
    unsigned = _b64({"sub": "ops", "tenant": "default", "caps": list(ALL), "exp": now + 600})
    return {
        "expired": mint_token(SECRET, tenant="default", caps=ALL, sub="ops", ttl_seconds=-5),
        "tampered": f"{head}.{other_tenant}.{sig}",
        "alg-none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{unsigned}.",
        "wrong-secret": token(key="not-the-secret-" + "y" * 32),
        "garbage": "not.a.jwt",
    }


async def test_missing_and_refused_tokens_close_1008_with_a_reason(
    auth_gateway: Callable[..., Gateway],
) -> None:
    gw = auth_gateway()
    code, reason = await closed_with(gw.ws_url)
    assert (code, reason) == (1008, "a bearer token is required")
    for name, bad in _refused_tokens().items():
        code, reason = await closed_with(f"{gw.ws_url}?token={bad}")
        assert code == 1008, name
        assert reason, name
    code, reason = await closed_with(
        gw.ws_url, subprotocols=["relay.v1", f"relay.bearer.{_refused_tokens()['expired']}"]
    )
    assert (code, reason) == (1008, "token expired")
    assert metric_value(gw, 'relay_auth_failures_total{reason="invalid"}') >= 6
    # REST: 401 with WWW-Authenticate, nothing performed.
    refused: list[str | None] = [None, *_refused_tokens().values()]
    for wrong in refused:
        status, reply = post(gw, f"/api/v1/agents/{uuid.uuid4()}/cancel", wrong)
        assert status == 401, (wrong, reply)
    status, hdrs, _ = http(gw.http + "/api/v1/requests")
    assert status == 401 and hdrs["www-authenticate"].startswith("Bearer")


async def test_each_token_source_is_accepted(auth_gateway: Callable[..., Gateway]) -> None:
    gw = auth_gateway()
    good = token()
    sources: list[tuple[str, dict[str, Any]]] = [
        (gw.ws_url, {"additional_headers": {"Authorization": f"Bearer {good}"}}),
        (gw.ws_url, {"subprotocols": ["relay.v1", f"relay.bearer.{good}"]}),
        (f"{gw.ws_url}?token={good}", {}),
    ]
    for url, connect in sources:
        async with WsClient(url, **connect) as client:
            assert (await client.request({"type": "ping"}, "pong"))["type"] == "pong"
            if "subprotocols" in connect:
                assert client.ws.subprotocol == "relay.v1"  # the token entry is never echoed


# ---------------------------------------------------------------- expiry and refresh


async def test_expiring_token_closes_4001_unless_refreshed(
    auth_gateway: Callable[..., Gateway],
) -> None:
    gw = auth_gateway()
    short = token(ttl=2)
    async with (
        WsClient(f"{gw.ws_url}?token={short}") as lapsing,
        WsClient(f"{gw.ws_url}?token={short}") as refreshed,
    ):
        bad = await refreshed.request({"type": "refresh", "token": token(sub="mallory")}, "x")
        assert (bad["type"], bad["code"]) == ("error", "forbidden")
        bad = await refreshed.request({"type": "refresh", "token": token("t2")}, "x")
        assert bad["code"] == "forbidden"
        bad = await refreshed.request({"type": "refresh", "token": "junk"}, "x")
        assert bad["code"] == "invalid_token"
        reply = await refreshed.request({"type": "refresh", "token": token(ttl=600)}, "refreshed")
        assert reply["type"] == "refreshed" and reply["exp"] > time.time() + 500
        await eventually(lapsing.closed.is_set, 10, "the lapsing connection to be closed")
        assert lapsing.close_code == 4001
        assert lapsing.ws.close_reason == "token expired"
        # The refreshed one outlives the first token.
        assert (await refreshed.request({"type": "ping"}, "pong"))["type"] == "pong"
        assert not refreshed.closed.is_set()


# ---------------------------------------------------------------- capabilities


async def test_view_only_token_cannot_cancel_or_decide(
    auth_gateway: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    gw = auth_gateway()
    rid, agent = str(uuid.uuid4()), str(uuid.uuid4())
    viewer = token(caps=("view",))
    async with (
        RelayClient.from_url(redis_server.url) as pub,
        WsClient(f"{gw.ws_url}?token={viewer}") as client,
    ):
        await pub.publish(rid, spawned(agent))
        await client.wait_for(lambda c: len(c.events(rid)) == 1)  # view works
        for frame in (
            {"type": "cancel_agent", "agent_id": agent},
            {"type": "cancel_agent", "agent_id": rid},
            {"type": "budget_continue", "request_id": rid},
            {"type": "budget_stop", "request_id": rid},
        ):
            reply = await client.request({**frame, "command_id": 7}, "ack")
            assert (reply["type"], reply["code"], reply["command_id"]) == ("error", "forbidden", 7)
    assert post(gw, f"/api/v1/agents/{agent}/cancel", viewer)[0] == 403
    status, reply = post(gw, f"/api/v1/requests/{rid}/budget", viewer, {"decision": "stop"})
    assert (status, reply["code"]) == (403, "forbidden")
    r = redis.Redis.from_url(redis_server.url)
    try:
        assert r.keys("relay:*:cancel:*") == []
    finally:
        r.close()
    forbidden = 'relay_commands_total{outcome="forbidden",type="cancel_agent"}'
    assert metric_value(gw, forbidden) == 3
    # A decide-only token sees nothing: no events, no subscription.
    async with WsClient(f"{gw.ws_url}?token={token(caps=('decide',))}") as blind:
        reply = await blind.request({"type": "subscribe", "request_id": rid}, "subscribed")
        assert reply["code"] == "forbidden"
        assert blind.events() == []
    status, _, _ = http(
        gw.http + "/api/v1/requests",
        headers={"authorization": f"Bearer {token(caps=('cancel',))}"},
    )
    assert status == 403


async def test_requests_scoped_token_touches_only_its_requests(
    auth_gateway: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    gw = auth_gateway()
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    my_agent, other_agent = str(uuid.uuid4()), str(uuid.uuid4())
    scoped = token(requests=(mine,))
    async with RelayClient.from_url(redis_server.url) as pub:
        await pub.publish(mine, spawned(my_agent))
        await pub.publish(other, spawned(other_agent))
        async with (
            WsClient(f"{gw.ws_url}?token={scoped}") as everything,
            WsClient(f"{gw.ws_url}?token={scoped}&stream=none") as narrow,
        ):
            await eventually(lambda: "tenants" in gw.get("/readyz")[1], 5, "readyz")
            reply = await narrow.request({"type": "subscribe", "request_id": other}, "subscribed")
            assert reply["code"] == "forbidden"
            reply = await narrow.request(
                {"type": "subscribe", "request_id": mine, "after_seq": 0}, "subscribed"
            )
            assert reply["type"] == "subscribed"
            await narrow.wait_for(lambda c: len(c.events(mine)) == 1)  # history of its own
            for i in range(3):
                await pub.publish(other, delta(f"o{i}"))
                await pub.publish(mine, delta(f"m{i}"))
            await everything.wait_for(lambda c: len(c.events(mine)) == 3)
            await narrow.wait_for(lambda c: len(c.events(mine)) == 4)
            assert everything.events(other) == [] and narrow.events(other) == []
            ack = await narrow.request({"type": "cancel_agent", "agent_id": my_agent}, "ack")
            assert ack["type"] == "ack"
            ack = await narrow.request({"type": "cancel_agent", "agent_id": mine}, "ack")
            assert ack["type"] == "ack"
            denied = await narrow.request({"type": "cancel_agent", "agent_id": other_agent}, "ack")
            assert denied["code"] == "forbidden"
            denied = await narrow.request({"type": "budget_stop", "request_id": other}, "ack")
            assert denied["code"] == "forbidden"
    status, _, listing = http(
        gw.http + "/api/v1/requests", headers={"authorization": f"Bearer {scoped}"}
    )
    assert status == 200
    assert [r["request_id"] for r in listing["requests"]] == [mine]


# ---------------------------------------------------------------- browsers


async def test_cross_origin_websocket_and_rest_are_refused(
    auth_gateway: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    gw = auth_gateway(RELAY_AUTH_ALLOWED_ORIGINS="https://ops.example")
    good = token()
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{gw.ws_url}?token={good}", origin=Origin("http://evil.example"))
    assert refused.value.response.status_code == 403
    for origin in ("https://ops.example", f"http://127.0.0.1:{gw.port}"):
        async with WsClient(f"{gw.ws_url}?token={good}", origin=origin) as client:
            assert (await client.request({"type": "ping"}, "pong"))["type"] == "pong"
    target = str(uuid.uuid4())
    path = f"/api/v1/agents/{target}/cancel"
    # The attack of the issue: a cross-site simple POST (text/plain, empty body).
    status, reply = post(gw, path, good, content_type="text/plain", origin="http://evil.example")
    assert (status, reply["code"]) == (403, "origin_not_allowed")
    status, reply = post(gw, path, good, content_type="text/plain")
    assert (status, reply["code"]) == (415, "unsupported_media_type")
    status, reply = post(gw, path, None, origin=f"http://127.0.0.1:{gw.port}")
    assert status == 401  # same origin, but no token: cookies are never enough
    status, _, _ = http(gw.http + "/api/v1/requests", headers={"origin": "http://evil.example"})
    assert status == 403
    r = redis.Redis.from_url(redis_server.url)
    try:
        assert r.keys("relay:*:cancel:*") == []
    finally:
        r.close()
    # CORS: the listed origin's preflight is answered; another origin's is not.
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    status, hdrs, _ = http(
        gw.http + path, method="OPTIONS", headers={**preflight, "origin": "https://ops.example"}
    )
    assert status == 200 and hdrs["access-control-allow-origin"] == "https://ops.example"
    status, hdrs, _ = http(
        gw.http + path, method="OPTIONS", headers={**preflight, "origin": "http://evil.example"}
    )
    assert status >= 400 and "access-control-allow-origin" not in hdrs
    status, reply = post(gw, path, good, origin="https://ops.example")
    assert status == 202, reply


def test_metrics_needs_the_metrics_token(auth_gateway: Callable[..., Gateway]) -> None:
    gw = auth_gateway()
    assert http(gw.http + "/metrics")[0] == 401
    assert http(gw.http + "/metrics", headers={"authorization": f"Bearer {token()}"})[0] == 401
    assert metric_value(gw, "relay_connections") == 0
    assert gw.get("/healthz")[0] == 200 and gw.ready()  # probes stay open


def test_gateway_refuses_to_start_in_jwt_mode_without_a_key(tmp_path: Path) -> None:
    """The default is jwt: a gateway nobody configured a key for does not serve anyone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "gateway", "--port", "0"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "auth.jwt_secret" in result.stderr and "auth.mode = 'none'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_mode_none_warns_at_startup_and_serves_without_a_token(
    start_gateway: Callable[..., Gateway],
) -> None:
    gw = start_gateway()  # the fixtures say RELAY_AUTH_MODE=none explicitly
    await eventually(lambda: "auth.mode is 'none'" in gw.output(), 5, "the startup warning")
    async with WsClient(gw.ws_url) as client:
        reply = await client.request({"type": "refresh", "token": "anything"}, "refreshed")
        assert reply == {"type": "refreshed", "exp": None}
