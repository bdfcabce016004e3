"""The limits' bookkeeping on a fake clock, and the ``[limits]`` configuration."""

from __future__ import annotations

import json

import pytest

from relay.config import ConfigError, LimitsConfig, load_config
from relay.gateway.limits import (
    ConnectionLimits,
    Limits,
    RateLimited,
    TokenBucket,
    subject_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)
    clock.now = 0.5
    assert bucket.take() and not bucket.take()
    clock.now = 100.0
    assert bucket.available() == 3  # never more than the burst


def test_spend_goes_into_debt_by_one_item_at_most() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10.0, burst=100, clock=clock)
    assert bucket.spend(90) and bucket.spend(50)  # the second overshoots
    assert not bucket.spend(1)  # in debt: refused
    clock.now = 4.1  # -40 + 41
    assert bucket.spend(1)


def test_connections_are_capped_per_process_and_per_subject() -> None:
    limits = Limits(LimitsConfig(max_connections=3, max_connections_per_subject=2))
    assert limits.admit("ip:a") is None and limits.admit("ip:a") is None
    assert "this client" in (limits.admit("ip:a") or "")
    assert limits.admit("ip:b") is None
    assert "gateway" in (limits.admit("ip:c") or "")
    limits.release("ip:a")
    assert limits.admit("ip:c") is None
    assert limits.connections == 3 and limits.subject_connections("ip:a") == 1


def test_subject_table_is_bounded_and_keeps_open_connections() -> None:
    limits = Limits(LimitsConfig(max_tracked_subjects=10, cancels_per_minute=1))
    assert limits.admit("sub:held") is None
    for i in range(100):
        limits.check_cancel(f"ip:{i}")
    assert len(limits._subjects) <= 10
    assert limits.subject_connections("sub:held") == 1


def test_cancels_are_counted_per_subject() -> None:
    clock = Clock()
    limits = Limits(LimitsConfig(cancels_per_minute=2), clock)
    limits.check_cancel("sub:x")
    limits.check_cancel("sub:x")
    with pytest.raises(RateLimited) as refused:
        limits.check_cancel("sub:x", command_id=5)
    frame = refused.value.frame()
    assert frame["code"] == "rate_limited" and frame["command_id"] == 5
    assert frame["retry_after"] == pytest.approx(30.0)
    limits.check_cancel("sub:y")  # another subject is not affected
    clock.now = 30.0
    limits.check_cancel("sub:x")


def test_ignoring_the_command_rate_ends_in_a_close() -> None:
    clock = Clock()
    conn = ConnectionLimits(
        LimitsConfig(command_rate=1.0, command_burst=2, rate_limit_strikes=3), clock
    )
    msg = {"type": "websocket.receive", "text": json.dumps({"type": "ping", "command_id": "c"})}
    assert conn.frame(msg) is None and conn.frame(msg) is None
    refusals = [conn.frame(msg) for _ in range(3)]
    assert all(r is not None and r.frame and r.frame["command_id"] == "c" for r in refusals)
    last = conn.frame(msg)
    assert last is not None and last.frame is None  # the fourth refusal in a row: close
    # A client that slows down starts over.
    clock.now = 10.0
    conn2 = ConnectionLimits(LimitsConfig(rate_limit_strikes=3), clock)
    assert conn2.frame(msg) is None and conn2.strikes == 0


def test_a_refused_frame_echoes_only_a_valid_command_id() -> None:
    conn = ConnectionLimits(LimitsConfig(command_rate=1.0, command_burst=1))
    conn.frame({"text": "{}"})
    for text, cid in [
        ('{"command_id": 7}', 7),
        ('{"command_id": true}', None),
        ('{"command_id": "\\ud800"}', None),
        ("not json", None),
    ]:
        refused = conn.frame({"text": text})
        assert refused is not None and refused.frame is not None
        assert refused.frame.get("command_id") == cid, text
    refused = conn.frame({"bytes": b'{"command_id":"b"}'})
    assert refused is not None and refused.frame is not None
    assert refused.frame["command_id"] == "b"


def test_replay_is_refused_while_this_minutes_budget_is_spent() -> None:
    clock = Clock()
    conn = ConnectionLimits(LimitsConfig(replay_bytes_per_minute=6000), clock)
    conn.check_replay()
    assert conn.spend_replay(5000) and conn.spend_replay(5000)
    assert not conn.spend_replay(1)
    with pytest.raises(RateLimited):
        conn.check_replay()
    clock.now = 40.5  # the debt of 4000 is refilled (100 bytes per second), not a second more
    with pytest.raises(RateLimited) as refused:
        conn.check_replay()
    assert refused.value.retry_after == 0.5
    clock.now = 41.0
    conn.check_replay()


def test_subject_is_the_token_subject_else_the_peer_address() -> None:
    assert subject_key("alice", ("10.0.0.1", 5)) == "sub:alice"
    assert subject_key(None, ("10.0.0.1", 5)) == "ip:10.0.0.1"
    assert subject_key(None, None) == "ip:unknown"


def test_limits_have_defaults_and_environment_overrides() -> None:
    cfg = load_config(
        environ={"RELAY_LIMITS_COMMAND_RATE": "5", "RELAY_LIMITS_HEADER_TIMEOUT": "3"}
    )
    assert cfg.limits.command_rate == 5 and cfg.limits.header_timeout == 3
    assert load_config(environ={}).limits == LimitsConfig()
    with pytest.raises(ConfigError, match=r"limits\.max_body_bytes"):
        load_config(environ={"RELAY_LIMITS_MAX_BODY_BYTES": "0"})
    with pytest.raises(ConfigError, match=r"limits\.nope: unknown key"):
        load_config(environ={"RELAY_LIMITS_NOPE": "1"})


def test_max_subscriptions_keeps_its_old_name() -> None:
    old = load_config(environ={"RELAY_GATEWAY_MAX_SUBSCRIPTIONS": "5"})
    assert old.limits.max_subscriptions == 5 and old.gateway.max_subscriptions == 5
    new = load_config(environ={"RELAY_LIMITS_MAX_SUBSCRIPTIONS": "7"})
    assert new.limits.max_subscriptions == 7 and new.gateway.max_subscriptions == 7
    with pytest.raises(ConfigError, match="differ"):
        load_config(
            environ={
                "RELAY_LIMITS_MAX_SUBSCRIPTIONS": "7",
                "RELAY_GATEWAY_MAX_SUBSCRIPTIONS": "8",
            }
        )


def test_the_descriptor_limit_is_raised_or_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    import resource

    from relay.gateway.serve import check_descriptors

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        low = load_config(environ={"RELAY_LIMITS_MAX_CONNECTIONS": "100"})
        assert check_descriptors(low) >= 100 + 1024 + 64 + 64
        if hard != resource.RLIM_INFINITY:
            beyond = load_config(environ={"RELAY_LIMITS_MAX_CONNECTIONS": str(hard * 2)})
            with caplog.at_level("WARNING"):
                check_descriptors(beyond)
            assert "open-file limit" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
