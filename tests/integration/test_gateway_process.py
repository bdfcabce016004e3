"""The gateway as a process: graceful SIGTERM, and configuration errors at start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.orchestrator.client import RelayClient
from tests.support import Gateway, RedisServer, WsClient

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


def run_relay(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_sigterm_closes_clients_with_1012_and_exits(
    redis_server: RedisServer, start_gateway: StartGateway
) -> None:
    gw = start_gateway()
    rid = str(uuid.uuid4())
    clients = [WsClient(gw.ws_url) for _ in range(3)]
    for client in clients:
        await client.__aenter__()
    try:
        await clients[0].request({"type": "ping"}, "pong")
        await clients[1].request({"type": "subscribe", "request_id": rid}, "subscribed")
        await clients[2].request({"type": "subscribe", "request_id": rid}, "subscribed")
        async with RelayClient.from_url(redis_server.url) as pub:
            await pub.publish(rid, {"type": "synthesis_started", "request_id": rid})
        for client in clients:
            await client.wait_for(lambda c: len(c.events(rid)) == 1)

        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        for client in clients:
            await asyncio.wait_for(client.closed.wait(), 10)
            assert client.close_code == 1012
        code = await asyncio.to_thread(gw.wait, 10)
        elapsed = time.monotonic() - started
        # uvicorn re-raises the signal it handled once shutdown is complete, so
        # a graceful stop ends "killed by SIGTERM" (what supervisors expect).
        assert code in (0, -signal.SIGTERM), gw.output()
        assert "Application shutdown complete" in gw.output()
        assert elapsed < 10
    finally:
        for client in clients:
            await client.close()


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[gateway]\nport = "abc"\n', "gateway.port"),
        ("[gateway]\nport = 70000\n", "gateway.port"),
        ("[gateway]\nsend_queue_max = 0\n", "gateway.send_queue_max"),
        ('[gateway]\noverflow_policy = "sometimes"\n', "gateway.overflow_policy"),
        ("[gateway]\nprot = 8000\n", "gateway.prot"),
    ],
)
def test_invalid_config_file_exits_2_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(toml)
    result = run_relay(["gateway", "--config", str(bad)], {}, tmp_path)
    assert result.returncode == 2, result
    assert key in result.stderr, result.stderr
    assert "bad.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_env_override_exits_2_naming_key_and_variable(tmp_path: Path) -> None:
    result = run_relay(["gateway"], {"RELAY_GATEWAY_PORT": "abc"}, tmp_path)
    assert result.returncode == 2, result
    assert "gateway.port" in result.stderr, result.stderr
    assert "RELAY_GATEWAY_PORT" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_that_is_not_toml_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\nport = ")
    result = run_relay(["gateway", "--config", str(bad)], {}, tmp_path)
    assert result.returncode == 2, result
    assert "bad.toml" in result.stderr
