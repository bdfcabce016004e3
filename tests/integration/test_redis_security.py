"""Redis over TLS with client certificates and the shipped least-privilege ACL users.

A real redis-server (``--tls-port`` only, ``tls-auth-clients yes``, an aclfile
written by deploy/redis-acl/relay-acl.sh) serves a real gateway process and an
in-process orchestrator; a second server presents a certificate from another CA.
The certificates are throwaway ones made by tests/tlscerts.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import websockets
from redis.exceptions import NoPermissionError, ResponseError

from relay import redisconn
from relay.aio import stop_task
from relay.config import LeaseConfig, RedisConfig
from relay.gateway.auth import CAPS, mint_token
from relay.orchestrator.budget import BudgetState, BudgetStatus, RequestBudget
from relay.orchestrator.cancel import CancelRegistry
from relay.orchestrator.client import OrchestratorLost, PublishError, RelayClient
from relay.wire.scripts import script
from tests.support import (
    REDIS_SERVER,
    Gateway,
    RedisServer,
    WsClient,
    free_port,
    metric,
    wait_for,
)
from tests.tlscerts import Authority, Issued, authority

ACL_SCRIPT = Path(__file__).parents[2] / "deploy" / "redis-acl" / "relay-acl.sh"
TENANTS = ("acme", "beta")


def _has_tls() -> bool:
    """Whether this redis-server build has TLS (BUILD_TLS=yes).

    Parsing stops at the first directive it does not know: a build without TLS
    stops at ``tls-port``, one with TLS at the deliberately unknown one after it.
    """
    probe = subprocess.run(
        [REDIS_SERVER, "--port", "0", "--tls-port", "0", "--relay-no-such-directive", "1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "'tls-port" not in probe.stdout + probe.stderr


pytestmark = pytest.mark.skipif(
    not _has_tls(), reason="this redis-server was built without TLS support"
)


def acl_rule(role: str, user: str, password: str, *tenants: str) -> str:
    """One ACL file line from the shipped generator (the very rules operators install)."""
    out = subprocess.run(
        ["bash", str(ACL_SCRIPT), role, user, *tenants],
        env={**os.environ, "RELAY_ACL_PASSWORD": password},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return out.stdout.strip()


@dataclass
class Users:
    """The ACL users of the secure server: name -> password."""

    passwords: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.passwords[name]


class TlsRedis:
    """A redis-server that speaks TLS only, on a free port."""

    def __init__(
        self,
        workdir: Path,
        ca: Authority,
        server: Issued,
        *,
        aclfile: Path | None = None,
        auth_clients: bool = True,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca, self.server = ca, server
        self.aclfile = aclfile
        self.auth_clients = auth_clients
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, admin: Callable[[], redis_sync.Redis]) -> TlsRedis:
        args = [
            REDIS_SERVER,
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.server.cert),
            "--tls-key-file", str(self.server.key),
            "--tls-ca-cert-file", str(self.ca.cert),
            "--tls-auth-clients", "yes" if self.auth_clients else "no",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        if self.aclfile is not None:
            args += ["--aclfile", str(self.aclfile)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def ping() -> bool:
            client = admin()
            try:
                return bool(client.ping())
            finally:
                client.close()

        wait_for(ping, 10, what=f"TLS redis-server on {self.port}")
        return self

    def url(self, user: str = "", password: str = "") -> str:
        auth = f"{user}:{password}@" if user else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Pki:
    ca: Authority
    server: Issued
    client: Issued
    rogue_ca: Authority
    rogue_server: Issued


@dataclass
class Secure:
    """The TLS + ACL server and how to reach it as each user."""

    redis: TlsRedis
    pki: Pki
    users: Users

    def config(self, user: str, *, tenant: str = "acme", **extra: Any) -> RedisConfig:
        return RedisConfig.model_validate(
            {
                "url": self.redis.url(user, self.users[user]),
                "tenant": tenant,
                "tls_ca_file": str(self.pki.ca.cert),
                "tls_cert_file": str(self.pki.client.cert),
                "tls_key_file": str(self.pki.client.key),
                **extra,
            }
        )

    def env(self, user: str, tenant: str = "acme") -> dict[str, str]:
        rc = self.config(user, tenant=tenant)
        return {
            "RELAY_REDIS_URL": rc.url,
            "RELAY_REDIS_TENANT": tenant,
            "RELAY_REDIS_TLS_CA_FILE": rc.tls_ca_file,
            "RELAY_REDIS_TLS_CERT_FILE": rc.tls_cert_file,
            "RELAY_REDIS_TLS_KEY_FILE": rc.tls_key_file,
        }

    def gateway_env(self, tenant: str = "acme") -> dict[str, str]:
        """A gateway as its ACL user, its lease reaper as the reaper's (same TLS settings)."""
        reaper = f"relay-reap-{tenant}"
        return {
            **self.env(f"relay-gw-{tenant}", tenant),
            "RELAY_LEASE_REAPER_REDIS_URL": self.redis.url(reaper, self.users[reaper]),
        }

    def admin(self) -> redis_sync.Redis:
        """An admin client built without relay's code, so it works whatever relay does."""
        return redis_sync.Redis(
            port=self.redis.port,
            username="admin",
            password=self.users["admin"],
            ssl=True,
            ssl_ca_certs=str(self.pki.ca.cert),
            ssl_certfile=str(self.pki.client.cert),
            ssl_keyfile=str(self.pki.client.key),
            socket_timeout=5.0,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    workdir = tmp_path_factory.mktemp("pki")
    ca = authority(workdir, "relay")
    rogue = authority(workdir, "rogue")
    return Pki(
        ca,
        ca.issue("redis", server=True),
        ca.issue("relay-client", server=False),
        rogue,
        rogue.issue("redis", server=True),
    )


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Secure]:
    workdir = tmp_path_factory.mktemp("secure-redis")
    users = Users({"admin": secrets.token_hex(16)})
    lines = ["user default off", f"user admin on >{users['admin']} ~* &* +@all"]
    for tenant in TENANTS:
        roles = (("gateway", "relay-gw"), ("orchestrator", "relay-orch"), ("reaper", "relay-reap"))
        for role, prefix in roles:
            name = f"{prefix}-{tenant}"
            users.passwords[name] = secrets.token_hex(16)
            lines.append(acl_rule(role, name, users[name], tenant))
    aclfile = workdir / "users.acl"
    aclfile.write_text("\n".join(lines) + "\n")
    server = TlsRedis(workdir, pki.ca, pki.server, aclfile=aclfile)
    state = Secure(server, pki, users)
    server.start(state.admin)
    yield state
    server.stop()


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsRedis]:
    """A TLS server whose certificate another CA signed (no ACL, no client certificates)."""
    server = TlsRedis(
        tmp_path_factory.mktemp("rogue-redis"), pki.rogue_ca, pki.rogue_server, auth_clients=False
    )
    server.start(
        lambda: redis_sync.Redis(
            port=server.port, ssl=True, ssl_ca_certs=str(pki.rogue_ca.cert), socket_timeout=5.0
        )
    )
    yield server
    server.stop()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gw in started:
        gw.stop()


def denied_entries(admin: redis_sync.Redis) -> list[dict[str, Any]]:
    """ACL LOG entries other than redis-py's optional CLIENT SETINFO (Redis >= 7.2)."""
    entries = admin.acl_log()
    return [e for e in entries if not str(e.get("object", "")).startswith("client|setinfo")]


def relay_cli(
    args: list[str], env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def get_json(url: str, token: str) -> Any:
    """GET ``url`` with a bearer token; the decoded JSON of a 200 answer."""
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


# ---------------------------------------------------------------- the whole path


async def test_gateway_and_orchestrator_work_over_tls_as_their_acl_users(
    secure: Secure, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Every Redis command of publish, replay, live delivery, the probe, a cancel, a budget
    answer and the console's list runs under the shipped ACL users, over TLS with client
    certificates; the server's ACL LOG shows no denied command afterwards."""
    admin = secure.admin()
    admin.acl_log_reset()
    secret = secrets.token_hex(32)
    auth = {"RELAY_AUTH_MODE": "jwt", "RELAY_AUTH_JWT_SECRET": secret}
    gw = Gateway(secure.redis.url(), tmp_path / "gw.log", {**secure.gateway_env(), **auth})
    gateways.append(gw)
    gw.start()  # ready: subscribed, and its probe (relay:acme:probe:G) came back
    rid, aid = str(uuid.uuid4()), str(uuid.uuid4())
    # Scoped to the request: the gateway checks scope in Redis (HEXISTS, ZMSCORE).
    token = mint_token(secret, tenant="acme", caps=CAPS, sub="ops", ttl_seconds=600, requests=[rid])
    async with RelayClient.from_config(secure.config("relay-orch-acme")) as orch:
        await orch.publish(rid, {"type": "synthesis_started", "request_id": rid})
        registry = CancelRegistry(orch.redis, orch.keys, poll_interval=0.2)
        await registry.start()
        try:
            cancelled = await registry.token(aid, lineage=[rid])
            url = f"{gw.ws_url}?request_id={rid}&after_seq=0&token={token}"
            async with WsClient(url) as viewer:
                await viewer.wait_for(lambda c: len(c.events(rid)) == 1)  # replayed
                await orch.publish(
                    rid,
                    {
                        "type": "agent_spawned",
                        "agent_id": aid,
                        "parent_id": None,
                        "task_description": "over TLS",
                        "depth": 0,
                        "index": 0,
                        "total": 1,
                    },
                )
                await viewer.wait_for(lambda c: len(c.events(rid)) == 2)  # live

                # Texts for snapshots: APPEND, and past 128 KiB the cut (GETRANGE,
                # SET, HINCRBY); the gateway's snapshot read (HKEYS, then STRLEN
                # and GETRANGE in the MULTI with the state).
                piece = {"type": "agent_text_delta", "agent_id": aid, "text": "t" * 1000}
                for _ in range(3):
                    await orch.publish_many(rid, [piece] * 50)
                snap_url = f"{gw.ws_url}?request_id={rid}&snapshot=1&token={token}"
                async with WsClient(snap_url) as joiner:
                    await joiner.wait_for(lambda c: bool(c.of_type("snapshot")))
                    text = joiner.of_type("snapshot")[0]["texts"][aid]
                    assert text["bytes"] == 150_000 and text["truncated"], text

                ack = await viewer.request({"type": "cancel_agent", "agent_id": aid}, "ack")
                assert ack["type"] == "ack", ack
                assert await asyncio.wait_for(cancelled.wait(), 10)

                budget = RequestBudget(orch.redis, orch.keys, rid)
                state = BudgetState(BudgetStatus.EXHAUSTED, 20_000, 10_000)

                async def publish(event: Any) -> object:
                    return await orch.publish(rid, event)

                pause = asyncio.create_task(budget.pause(publish, state, timeout=20))
                try:
                    await viewer.wait_for(lambda c: bool(c.of_type("budget_warning")))
                    answer = {"type": "budget_continue", "request_id": rid}
                    assert (await viewer.request(answer, "ack"))["type"] == "ack"
                    outcome = await asyncio.wait_for(pause, 10)
                finally:
                    pause.cancel()
                assert (outcome.decision, outcome.decided_by) == ("continue", "client")

            listing = await asyncio.to_thread(get_json, gw.http + "/api/v1/requests", token)
            assert [r["request_id"] for r in listing["requests"]] == [rid]
        finally:
            await registry.close()
    assert gw.ready()
    assert denied_entries(admin) == [], denied_entries(admin)
    assert "NOPERM" not in gw.output()
    admin.close()


async def test_a_token_for_a_tenant_outside_the_acl_is_refused_not_fatal(
    secure: Secure, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """A gateway whose Redis user covers only ``acme`` must not try to subscribe to
    ``beta``'s channels for a valid ``beta`` token: Redis would refuse the SUBSCRIBE
    and the shared pub/sub link, every tenant's delivery, would go down with it.
    ``redis.tenants`` makes the gateway refuse such a token up front."""
    secret = secrets.token_hex(32)
    env = {
        **secure.gateway_env(),
        "RELAY_REDIS_TENANTS": "acme",
        "RELAY_AUTH_MODE": "jwt",
        "RELAY_AUTH_JWT_SECRET": secret,
    }
    gw = Gateway(secure.redis.url(), tmp_path / "gw.log", env)
    gateways.append(gw)
    gw.start()
    acme, beta = (
        mint_token(secret, tenant=t, caps=CAPS, sub=t, ttl_seconds=600) for t in ("acme", "beta")
    )
    rid = str(uuid.uuid4())
    async with WsClient(f"{gw.ws_url}?request_id={rid}&token={acme}") as viewer:
        await viewer.request({"type": "ping"}, "pong")
        refused = WsClient(f"{gw.ws_url}?token={beta}")
        try:
            await refused.__aenter__()
            await asyncio.wait_for(refused.closed.wait(), 10)
            assert refused.close_code == 1008
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code in (401, 403)
        finally:
            await refused.close()
        async with RelayClient.from_config(secure.config("relay-orch-acme")) as orch:
            await orch.publish(rid, {"type": "synthesis_started", "request_id": rid})
        await viewer.wait_for(lambda c: len(c.events(rid)) == 1)
    assert gw.ready()
    assert "no permissions" not in gw.output()


async def test_the_cli_uses_the_tls_settings_and_acl_users(secure: Secure) -> None:
    rid = str(uuid.uuid4())
    event = f'{{"type":"synthesis_started","request_id":"{rid}"}}'
    done = relay_cli(["publish", rid, event], secure.env("relay-orch-acme"))
    assert (done.returncode, done.stdout.strip()) == (0, "1"), done.stderr
    # The operator commands run as the gateway user (they do what a gateway does).
    done = relay_cli(["cancel", rid, "--reason", "from the CLI"], secure.env("relay-gw-acme"))
    assert done.returncode == 0, done.stderr
    admin = secure.admin()
    assert admin.exists(f"relay:acme:req:{{{rid}}}:history")
    assert admin.exists(f"relay:acme:cancel:{{{rid}}}")
    admin.close()
    # And a Redis error names the server without the password.
    env = {**secure.env("relay-gw-acme"), "RELAY_REDIS_TENANT": "beta"}
    done = relay_cli(["cancel", rid], env)
    assert done.returncode == 1
    assert "rediss://relay-gw-acme:***@127.0.0.1" in done.stderr, done.stderr
    assert secure.users["relay-gw-acme"] not in done.stderr


# ---------------------------------------------------------------- what the ACL forbids


Command = tuple[str, ...]
ADMIN_COMMANDS: tuple[Command, ...] = (
    ("EVAL", "return 1", "0"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("ACL", "LIST"),
    ("CLIENT", "LIST"),
    ("MONITOR",),
    ("SCRIPT", "FLUSH"),
)
"""Commands neither role may run (scanning, admin, arbitrary scripts)."""


def deny(client: redis_sync.Redis, *command: str) -> str:
    """Run ``command``; the NOPERM message (names "keys", "channels" or the command)."""
    with pytest.raises(NoPermissionError) as info:
        client.execute_command(*command)
    return str(info.value)


def test_gateway_user_stays_inside_its_tenant_and_its_role(secure: Secure) -> None:
    rid = str(uuid.uuid4())
    gw = redisconn.sync_client(secure.config("relay-gw-acme"), socket_timeout=5.0)
    try:
        acme = f"relay:acme:req:{{{rid}}}"
        assert gw.get(f"{acme}:seq") is None  # its tenant: readable
        assert gw.set(f"relay:acme:cancel:{{{rid}}}", "x", ex=60)
        # Another tenant, keys outside relay, keys relay never writes from a gateway.
        command: Command
        for command in (
            ("GET", f"relay:beta:req:{{{rid}}}:seq"),
            ("SET", f"relay:beta:cancel:{{{rid}}}", "x"),
            ("GET", "session:42"),
            ("SET", "relay-config", "x"),
            ("HSET", f"{acme}:state", "outcome", "forged"),
            ("SET", f"{acme}:seq", "999"),
        ):
            assert "keys" in deny(gw, *command), command
        # Commands a gateway never needs: forging events, scanning, admin.
        for command in (
            ("XADD", f"{acme}:history", "1-0", "f", "x"),
            ("INCR", f"{acme}:seq"),
            *ADMIN_COMMANDS,
        ):
            assert "command" in deny(gw, *command), command
        # Subscribing is allowed on its tenant's channels; publishing only cancels and probes.
        assert gw.publish("relay:acme:cancels", "{}") >= 0
        assert gw.publish("relay:acme:probe:test", "p") == 0
        for command in (
            ("PUBLISH", f"{acme}:events", "forged"),
            ("PUBLISH", "relay:acme:events", "forged"),
            ("PUBLISH", "relay:beta:cancels", "{}"),
            ("SUBSCRIBE", "relay:beta:events"),
            ("SUBSCRIBE", "other"),
        ):
            assert "channels" in deny(gw, *command), command
        # A script it loads runs with its own permissions: no way around the rules.
        forge = f"return redis.call('XADD', '{acme}:history', '1-0', 'f', 'x')"
        sha = gw.script_load(forge)
        with pytest.raises(ResponseError, match="can't run this command"):
            gw.evalsha(sha, 0)
    finally:
        gw.close()
    other = redisconn.sync_client(secure.config("relay-gw-beta", tenant="beta"), socket_timeout=5)
    try:
        assert "keys" in deny(other, "GET", f"relay:acme:req:{{{rid}}}:seq")
        assert "keys" in deny(other, "XRANGE", f"relay:acme:req:{{{rid}}}:history", "-", "+")
    finally:
        other.close()


async def test_orchestrator_user_publishes_but_cannot_listen_or_cancel(secure: Secure) -> None:
    rid = str(uuid.uuid4())
    orch = redisconn.sync_client(secure.config("relay-orch-acme"), socket_timeout=5.0)
    try:
        command: Command
        for command in (
            ("SUBSCRIBE", "relay:acme:events"),
            ("SUBSCRIBE", f"relay:acme:req:{{{rid}}}:events"),
            ("SUBSCRIBE", "relay:acme:probe:g1"),
            ("SUBSCRIBE", "relay:beta:cancels"),
            ("PUBLISH", "relay:acme:cancels", "{}"),
            ("PUBLISH", "relay:beta:events", "x"),
        ):
            assert "channels" in deny(orch, *command), command
        for command in (
            ("SET", f"relay:acme:cancel:{{{rid}}}", "x"),  # cancels come from operators
            ("GET", f"relay:beta:req:{{{rid}}}:seq"),
            ("GET", "session:42"),
        ):
            assert "keys" in deny(orch, *command), command
        for command in ADMIN_COMMANDS:
            assert "command" in deny(orch, *command), command
    finally:
        orch.close()
    # What it needs: the cancel channel, through the pub/sub client relay uses.
    client = redisconn.client(secure.config("relay-orch-acme"))
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("relay:acme:cancels")
        message = await pubsub.get_message(timeout=5)
        assert message is not None and message["type"] == "subscribe"
    finally:
        await pubsub.aclose()
        await client.aclose()
    # The SDK publishing under another tenant is refused with Redis's reason.
    wrong = secure.config("relay-orch-acme", tenant="beta", publish_retry_seconds=0)
    async with RelayClient.from_config(wrong) as sdk:
        with pytest.raises(PublishError, match="no permissions to access one of the keys"):
            await sdk.publish(rid, {"type": "synthesis_started", "request_id": rid})


# ---------------------------------------------------------------- leases


async def test_a_lost_orchestrator_is_reaped_under_the_acl_users(
    secure: Secure, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """The lease path end to end as the shipped users: an orchestrator (its role) holds
    and renews, stops renewing; the gateway's reaper (the reaper role) declares it
    lost, closes its pause and publishes its terminal events; the orchestrator's next
    publish is refused. ``ACL LOG`` stays empty: each role has what it uses."""
    admin = secure.admin()
    admin.acl_log_reset()
    lease_env = {"RELAY_LEASE_REAP_INTERVAL": "0.1"}
    gw = Gateway(secure.redis.url(), tmp_path / "gw.log", {**secure.gateway_env(), **lease_env})
    gateways.append(gw)
    gw.start()
    rid, aid = str(uuid.uuid4()), str(uuid.uuid4())
    lease = LeaseConfig(renew_interval=0.1, ttl_seconds=0.5)
    async with (
        RelayClient.from_config(secure.config("relay-orch-acme"), lease=lease) as orch,
        WsClient(f"{gw.ws_url}?request_id={rid}&after_seq=0") as viewer,
    ):
        keeper = orch.lease
        assert keeper is not None
        await keeper.hold(rid)
        await orch.publish(
            rid,
            {"type": "agent_spawned", "agent_id": aid, "parent_id": None,
             "task_description": "leased", "depth": 0, "index": 0, "total": 1},
        )  # fmt: skip
        budget = RequestBudget(orch.redis, orch.keys, rid)
        await budget.add(9_000)  # the budget hash exists, as in a real run
        rk = orch.keys.request(rid)
        pause = {"pause_id": "p1", "deadline_ts": 10**13, "timeout_decision": "stop"}
        await script("budget_open")(
            orch.redis, [rk.pending, rk.decision], [json.dumps(pause), 60_000]
        )
        await viewer.wait_for(lambda c: len(c.events(rid)) == 1)
        # The process "dies": renewals stop, nothing is released.
        assert keeper._task is not None
        await stop_task(keeper._task)
        await viewer.wait_for(lambda c: bool(c.of_type("agent_failed")), timeout=15)
        (failed,) = viewer.of_type("agent_failed")
        (decision,) = viewer.of_type("budget_decision")
        assert (decision["decision"], decision["decided_by"]) == ("stop", "timeout")
        assert failed["agent_id"] == aid and "orchestrator lost" in failed["error"]
        with pytest.raises(OrchestratorLost, match="orchestrator lost"):
            await orch.publish_text_deltas(rid, aid, ["too late"])
    assert metric(gw, "relay_requests_lost_total") == 1
    assert denied_entries(admin) == [], denied_entries(admin)
    assert "no permissions" not in gw.output().lower(), gw.output()
    admin.close()


def test_reaper_user_cannot_listen_cancel_or_leave_its_tenant(secure: Secure) -> None:
    rid = str(uuid.uuid4())
    reaper = redisconn.sync_client(secure.config("relay-reap-acme"), socket_timeout=5.0)
    try:
        command: Command
        for command in (
            ("PUBLISH", "relay:acme:cancels", "{}"),
            ("PUBLISH", "relay:acme:probe:g1", "p"),
            ("PUBLISH", "relay:beta:events", "x"),
        ):
            assert "channels" in deny(reaper, *command), command
        for command in (
            ("SET", f"relay:acme:cancel:{{{rid}}}", "x"),
            ("GET", f"relay:acme:cancel:{{{rid}}}"),
            ("GET", f"relay:beta:req:{{{rid}}}:seq"),
            ("ZADD", "relay:beta:leases:{beta}", "1", "o"),
            ("GET", "session:42"),
        ):
            assert "keys" in deny(reaper, *command), command
        for command in (
            ("SUBSCRIBE", "relay:acme:events"),
            ("SUBSCRIBE", "relay:acme:cancels"),
            ("BLPOP", f"relay:acme:req:{{{rid}}}:decision", "1"),
            *ADMIN_COMMANDS,
        ):
            assert "command" in deny(reaper, *command), command
    finally:
        reaper.close()


# ---------------------------------------------------------------- verification


async def test_a_server_certificate_from_another_ca_is_refused(
    secure: Secure, rogue: TlsRedis
) -> None:
    """Verification is on by default, with the configured CA and with the system store."""
    rid = str(uuid.uuid4())
    event = {"type": "synthesis_started", "request_id": rid}
    for ca in (str(secure.pki.ca.cert), ""):
        rc = RedisConfig(url=rogue.url(), tls_ca_file=ca, publish_retry_seconds=0)
        async with RelayClient.from_config(rc) as client:
            with pytest.raises(PublishError, match="certificate verify failed"):
                await client.publish(rid, event)
    done = relay_cli(
        ["publish", rid, f'{{"type":"synthesis_started","request_id":"{rid}"}}'],
        {
            "RELAY_REDIS_URL": rogue.url(),
            "RELAY_REDIS_TLS_CA_FILE": str(secure.pki.ca.cert),
            "RELAY_REDIS_PUBLISH_RETRY_SECONDS": "0",
        },
    )
    assert done.returncode == 1
    assert "certificate verify failed" in done.stderr, done.stderr


async def test_a_client_without_a_certificate_is_refused(secure: Secure) -> None:
    rc = secure.config("relay-orch-acme", publish_retry_seconds=0)
    bare = RedisConfig(
        url=rc.url, tenant="acme", tls_ca_file=rc.tls_ca_file, publish_retry_seconds=0
    )
    rid = str(uuid.uuid4())
    async with RelayClient.from_config(bare) as client:
        with pytest.raises(PublishError, match="failed after 1 attempts"):
            await client.publish(rid, {"type": "synthesis_started", "request_id": rid})


async def test_verification_off_connects_and_warns_loudly(
    rogue: TlsRedis, caplog: pytest.LogCaptureFixture, tmp_path: Path, gateways: list[Gateway]
) -> None:
    caplog.set_level(logging.WARNING, "relay.redisconn")
    rid = str(uuid.uuid4())
    rc = RedisConfig(url=rogue.url(), tls_verify=False)
    async with RelayClient.from_config(rc) as client:
        assert await client.publish(rid, {"type": "synthesis_started", "request_id": rid}) == 1
    assert any("INSECURE Redis TLS" in r.getMessage() for r in caplog.records)

    gw = Gateway(rogue.url(), tmp_path / "gw.log", {"RELAY_REDIS_TLS_VERIFY": "false"})
    gateways.append(gw)
    gw.start()
    warnings = [ln for ln in gw.output().splitlines() if "INSECURE Redis TLS" in ln]
    roles = ("gateway commands", "gateway control", "gateway pub/sub")
    assert all(any(role in ln for ln in warnings) for role in roles), gw.output()


# ---------------------------------------------------------------- socket timeout


def test_relay_publish_honours_the_socket_timeout() -> None:
    """A Redis that accepts but never answers: ``relay publish`` gives up after
    ``RELAY_REDIS_SOCKET_TIMEOUT`` (0.3 s here), not after redis-py's default (5 s).

    Timed on the server side, from the first connection accepted to the last one
    closed, so the interpreter's start-up does not count.
    """
    held: list[float] = []

    def serve(listener: socket.socket) -> None:
        first: float | None = None
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                first = first or time.monotonic()
                with conn:
                    while conn.recv(4096):  # read the command, never answer it
                        pass
                held.append(time.monotonic() - first)

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(30)
        thread = threading.Thread(target=serve, args=(silent,), daemon=True)
        thread.start()
        port = silent.getsockname()[1]
        rid = str(uuid.uuid4())
        done = relay_cli(
            ["publish", rid, f'{{"type":"synthesis_started","request_id":"{rid}"}}'],
            {
                "RELAY_REDIS_URL": f"redis://127.0.0.1:{port}/0",
                "RELAY_REDIS_SOCKET_TIMEOUT": "0.3",
                "RELAY_REDIS_PUBLISH_RETRY_SECONDS": "0",
            },
            timeout=30,
        )
        silent.shutdown(socket.SHUT_RDWR)
    thread.join(10)
    assert done.returncode == 1, done
    assert "Timeout" in done.stderr, done.stderr
    assert held and held[-1] < 2.0, held


# ---------------------------------------------------------------- the generator


def test_setuser_form_matches_the_acl_file_form(secure: Secure, redis_server: RedisServer) -> None:
    """``relay-acl.sh --setuser`` piped to redis-cli makes the same user as the file line."""
    password = secure.users["relay-gw-acme"]
    out = subprocess.run(
        ["bash", str(ACL_SCRIPT), "--setuser", "gateway", "relay-gw-acme", "acme"],
        env={**os.environ, "RELAY_ACL_PASSWORD": password},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    loaded = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port)],
        input=out.stdout,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert loaded.stdout.strip() == "OK", loaded
    admin = secure.admin()
    try:
        listed = [u.decode() if isinstance(u, bytes) else str(u) for u in admin.acl_list()]
        from_file = [u for u in listed if u.startswith("user relay-gw-acme ")]
    finally:
        admin.close()
    from_setuser = [
        line
        for line in redis_server.command("ACL", "LIST").decode().splitlines()
        if line.startswith("user relay-gw-acme ")
    ]
    assert len(from_file) == 1 and len(from_setuser) == 1

    def parts(rule: str) -> list[set[str]]:
        # Redis lists a user's commands in hash order: compare them as sets.
        return [set(part.split()) for part in rule.replace(")", "").split("(")]

    assert parts(from_setuser[0]) == parts(from_file[0])


def test_setuser_form_of_the_reaper_role_loads(redis_server: RedisServer) -> None:
    """The reaper role has no selector: its ``--setuser`` line is accepted as it is."""
    out = subprocess.run(
        ["bash", str(ACL_SCRIPT), "--setuser", "reaper", "relay-reap-acme", "acme"],
        env={**os.environ, "RELAY_ACL_PASSWORD": "x"},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    loaded = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port)],
        input=out.stdout,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert loaded.stdout.strip() == "OK", loaded
    (rule,) = [
        line
        for line in redis_server.command("ACL", "LIST").decode().splitlines()
        if line.startswith("user relay-reap-acme ")
    ]
    assert "~relay:acme:leases:*" in rule and "&relay:acme:events" in rule, rule
    assert "+subscribe" not in rule and "cancel" not in rule, rule


@pytest.mark.parametrize(
    ("args", "password", "message"),
    [
        (["gateway", "gw", "a*"], "x", "invalid tenant: a*"),
        (["gateway", "gw", "acme"], "", "set RELAY_ACL_PASSWORD"),
        (["admin", "gw", "acme"], "x", "usage:"),
        (["gateway", "g w", "acme"], "x", "invalid user name"),
    ],
)
def test_the_generator_refuses_bad_input(args: list[str], password: str, message: str) -> None:
    done = subprocess.run(
        ["bash", str(ACL_SCRIPT), *args],
        env={**os.environ, "RELAY_ACL_PASSWORD": password},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 2 and message in done.stderr, done
    assert done.stdout == ""
