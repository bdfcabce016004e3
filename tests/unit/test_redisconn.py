"""relay.redisconn and the ``[redis]`` TLS settings: validation, client building, warnings.

No Redis is contacted here (redis-py connects lazily); the real TLS and ACL
server is in tests/integration/test_redis_security.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection

from relay import redisconn
from relay.config import ConfigError, GlobalConfig, HistoryConfig, RedisConfig, load_config
from relay.gateway.app import _redis_clients
from relay.orchestrator.client import RelayClient
from relay.wire.keys import Keys, probe_channel
from tests.tlscerts import Authority, Issued, authority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Authority, Issued]]:
    ca = authority(tmp_path_factory.mktemp("pki"), "unit")
    yield ca, ca.issue("relay-client", server=False)


def env(**values: str) -> dict[str, str]:
    return {f"RELAY_REDIS_{k.upper()}": v for k, v in values.items()}


def error(**values: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(environ=env(**values))
    return str(info.value)


def tls(pki: tuple[Authority, Issued], **extra: str) -> dict[str, str]:
    ca, client = pki
    return {
        "url": "rediss://relay-gw:secret@127.0.0.1:6380/0",
        "tls_ca_file": str(ca.cert),
        "tls_cert_file": str(client.cert),
        "tls_key_file": str(client.key),
        **extra,
    }


def tls_config(pki: tuple[Authority, Issued], **extra: Any) -> RedisConfig:
    return RedisConfig.model_validate({**tls(pki), **extra})


# ---------------------------------------------------------------- validation


def test_tls_settings_load_from_the_environment(pki: tuple[Authority, Issued]) -> None:
    config = load_config(environ=env(**tls(pki), tls_verify="true"))
    assert config.redis.tls_ca_file == str(pki[0].cert)
    assert redisconn.tls_kwargs(config.redis) == {
        "ssl_ca_certs": str(pki[0].cert),
        "ssl_certfile": str(pki[1].cert),
        "ssl_keyfile": str(pki[1].key),
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }


def test_tls_settings_from_the_file(tmp_path: Path, pki: tuple[Authority, Issued]) -> None:
    path = tmp_path / "config.toml"
    lines = [f'{k} = "{v}"' for k, v in tls(pki).items()]
    path.write_text("[redis]\n" + "\n".join(lines) + "\ntls_verify = false\n")
    rc = load_config(path, environ={}).redis
    assert rc.tls_verify is False
    assert redisconn.tls_kwargs(rc)["ssl_cert_reqs"] == "none"


def test_unknown_tls_key_is_an_error() -> None:
    assert "redis.tls_ca_cert: unknown key" in error(tls_ca_cert="/x")


def test_missing_files_are_named(pki: tuple[Authority, Issued], tmp_path: Path) -> None:
    gone = str(tmp_path / "nope.pem")
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        message = error(**tls(pki, **{key: gone}))
        assert f"redis.{key}: Value error, no such file: {gone}" in message, message


def test_a_certificate_without_its_key(pki: tuple[Authority, Issued]) -> None:
    values = tls(pki)
    del values["tls_key_file"]
    message = error(**values)
    assert "redis.tls_key_file: Value error, required with redis.tls_cert_file" in message


def test_a_key_without_a_certificate(pki: tuple[Authority, Issued]) -> None:
    values = tls(pki)
    del values["tls_cert_file"]
    message = error(**values)
    assert "redis.tls_key_file: Value error, set without redis.tls_cert_file" in message


def test_a_combined_certificate_and_key_file_needs_no_key(
    pki: tuple[Authority, Issued], tmp_path: Path
) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(pki[1].cert.read_bytes() + pki[1].key.read_bytes())
    values = tls(pki, tls_cert_file=str(both))
    del values["tls_key_file"]
    assert load_config(environ=env(**values)).redis.tls_cert_file == str(both)


def test_a_key_that_does_not_match(pki: tuple[Authority, Issued]) -> None:
    other = pki[0].issue("other", server=False)
    message = error(**tls(pki, tls_key_file=str(other.key)))
    assert "redis.tls_key_file: Value error, cannot load the client certificate" in message


def test_a_ca_file_that_is_not_pem(tmp_path: Path, pki: tuple[Authority, Issued]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    message = error(**tls(pki, tls_ca_file=str(junk)))
    assert "redis.tls_ca_file: Value error" in message
    assert "holds no usable CA certificate" in message


@pytest.mark.parametrize("url", ["", "redis://127.0.0.1:6379/0", "unix:///run/redis.sock"])
@pytest.mark.parametrize("key", ["tls_ca_file", "tls_cert_file", "tls_verify"])
def test_tls_settings_without_rediss_are_an_error(
    pki: tuple[Authority, Issued], url: str, key: str
) -> None:
    value = "false" if key == "tls_verify" else str(pki[0].cert)
    values = {"url": url, key: value}
    if key == "tls_cert_file":
        values["tls_key_file"] = str(pki[1].key)
        values[key] = str(pki[1].cert)
    message = error(**values)
    assert f"redis.{key}: Value error, needs a rediss:// url (TLS)" in message, message


def test_tls_in_the_url_and_in_the_section_is_an_error(pki: tuple[Authority, Issued]) -> None:
    url = "rediss://127.0.0.1:6380/0?ssl_ca_certs=/etc/ca.pem"
    message = error(url=url, tls_ca_file=str(pki[0].cert))
    assert "redis.tls_ca_file: Value error, redis.url carries TLS query parameters" in message


def test_a_url_with_a_bad_port_is_refused() -> None:
    assert "redis.url: Value error, not a valid URL" in error(url="redis://h:port/0")


def test_defaults_build_no_tls() -> None:
    assert redisconn.tls_kwargs(RedisConfig()) == {}
    assert redisconn.tls_kwargs(RedisConfig(url="rediss://h:6380")) == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }


def test_tenants_list_from_the_environment() -> None:
    config = load_config(environ=env(tenant="acme", tenants="acme, beta,acme"))
    assert config.redis.tenants == ["acme", "beta"]
    assert "redis.tenants: Value error, must include redis.tenant ('acme')" in error(
        tenant="acme", tenants="beta"
    )
    assert "redis.tenants: Value error, invalid tenant 'a*'" in error(tenants="default,a*")
    assert load_config(environ={}).redis.tenants == []


# ---------------------------------------------------------------- clients


def kwargs(client: Redis) -> dict[str, Any]:
    return dict(client.connection_pool.connection_kwargs)


async def test_gateway_clients_keep_their_semantics(pki: tuple[Authority, Issued]) -> None:
    rc = tls_config(pki, socket_timeout=1.5, max_connections=7, pool_timeout=2.5)
    commands, control, pubsub = _redis_clients(GlobalConfig(redis=rc))
    try:
        pool = commands.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.max_connections == 7 and pool.timeout == 2.5
        assert commands.auto_close_connection_pool  # aclose() closes the pool too
        assert kwargs(commands)["retry"].get_retries() == 8
        assert control.connection_pool.max_connections == redisconn.CONTROL_MAX_CONNECTIONS
        assert kwargs(control)["retry"].get_retries() == 2
        assert kwargs(pubsub)["retry"].get_retries() == 0
        assert "socket_timeout" not in kwargs(pubsub)
        assert kwargs(pubsub)["socket_keepalive"] is True
        for client in (commands, control, pubsub):
            kw = kwargs(client)
            assert client.connection_pool.connection_class is SSLConnection
            assert kw["username"] == "relay-gw" and kw["password"] == "secret"
            assert kw["ssl_ca_certs"] == str(pki[0].cert)
            assert kw["ssl_certfile"] == str(pki[1].cert)
            assert kw["ssl_cert_reqs"] == "required"
            assert kw["socket_connect_timeout"] == 1.5
        assert kwargs(commands)["socket_timeout"] == 1.5
    finally:
        for client in (commands, control, pubsub):
            await client.aclose()


async def test_unix_socket_pubsub_client_builds() -> None:
    client = redisconn.pubsub_client(RedisConfig(url="unix:///run/redis.sock"))
    assert "socket_keepalive" not in kwargs(client)
    await client.aclose()


async def test_relay_client_from_config_applies_every_setting(
    pki: tuple[Authority, Issued],
) -> None:
    history = HistoryConfig(max_events=5)
    rc = tls_config(pki, tenant="acme", socket_timeout=0.7, publish_retry_seconds=3)
    async with RelayClient.from_config(GlobalConfig(redis=rc, history=history)) as client:
        assert client.tenant == "acme"
        assert client.history.max_events == 5
        assert client.publish_retry_seconds == 3
        assert isinstance(client.redis.connection_pool, BlockingConnectionPool)
        kw = kwargs(client.redis)
        assert kw["socket_timeout"] == 0.7 and kw["ssl_keyfile"] == str(pki[1].key)
    async with RelayClient.from_config(rc) as client:
        assert client.history == HistoryConfig()
    async with RelayClient.from_url("redis://h:1/0", tenant="t", socket_timeout=0.2) as client:
        assert client.tenant == "t" and kwargs(client.redis)["socket_timeout"] == 0.2


def test_sync_client_for_the_demo(pki: tuple[Authority, Issued]) -> None:
    client = redisconn.sync_client(tls_config(pki), socket_timeout=1.0)
    try:
        assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(pki[0].cert)
    finally:
        client.close()


# ---------------------------------------------------------------- warnings


def insecure_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "relay.redisconn" and r.levelno == logging.WARNING and "INSECURE" in r.msg
    ]


async def test_verification_off_warns_at_every_client_build(
    caplog: pytest.LogCaptureFixture, pki: tuple[Authority, Issued]
) -> None:
    caplog.set_level(logging.WARNING, "relay.redisconn")
    rc = RedisConfig(url="rediss://u:hunter2@redis.internal:6380/0", tls_verify=False)
    clients = [*_redis_clients(GlobalConfig(redis=rc)), redisconn.client(rc)]
    redisconn.sync_client(rc, socket_timeout=1).close()
    for client in clients:
        assert kwargs(client)["ssl_cert_reqs"] == "none"
        await client.aclose()
    records = insecure_warnings(caplog)
    assert [r.redis_role for r in records] == [  # type: ignore[attr-defined]
        "gateway commands",
        "gateway control",
        "gateway pub/sub",
        "client",
        "probe",
    ]
    text = records[0].getMessage()
    assert "redis.tls_verify = false" in text
    assert "impersonate Redis" in text
    assert "rediss://u:***@redis.internal:6380/0" in text
    assert "hunter2" not in text


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("ssl_cert_reqs=none", "redis.url carries ssl_cert_reqs=none"),
        ("ssl_cert_reqs=NONE&ssl_ca_certs=/x", "redis.url carries ssl_cert_reqs=none"),
        ("ssl_check_hostname=false", "ssl_check_hostname=false"),
    ],
)
async def test_verification_off_in_the_url_warns(
    caplog: pytest.LogCaptureFixture, query: str, reason: str
) -> None:
    caplog.set_level(logging.WARNING, "relay.redisconn")
    client = redisconn.client(RedisConfig(url=f"rediss://127.0.0.1:6380/0?{query}"))
    await client.aclose()
    (record,) = insecure_warnings(caplog)
    assert reason in record.getMessage()


async def test_verified_tls_and_plain_urls_do_not_warn(
    caplog: pytest.LogCaptureFixture, pki: tuple[Authority, Issued]
) -> None:
    caplog.set_level(logging.WARNING, "relay.redisconn")
    for rc in (tls_config(pki), RedisConfig(), RedisConfig(url="rediss://h:1/0")):
        for client in (*_redis_clients(GlobalConfig(redis=rc)), redisconn.client(rc)):
            await client.aclose()
    assert insecure_warnings(caplog) == []


def test_redacted_url() -> None:
    assert redisconn.redacted_url("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert redisconn.redacted_url("rediss://:p@[::1]:6380") == "rediss://:***@[::1]:6380"
    assert redisconn.redacted_url("redis://h:1/0") == "redis://h:1/0"
    assert redisconn.redacted_url("unix:///s.sock") == "unix:///s.sock"


# ---------------------------------------------------------------- key layout


def test_probe_channel_is_under_the_tenant() -> None:
    assert probe_channel("acme", "g1") == "relay:acme:probe:g1"
    assert probe_channel("acme", "g1").startswith(Keys("acme")._base + ":")
    with pytest.raises(ValueError, match="invalid tenant"):
        probe_channel("a*", "g1")
