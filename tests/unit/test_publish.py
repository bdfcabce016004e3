"""The publish path: one atomic script assigns seq, keeps history and state, publishes."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, TypeAlias

import fakeredis
import pytest
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from relay.config import HistoryConfig
from relay.gateway.envelope import Envelope
from relay.orchestrator.client import PublishError, RelayClient
from relay.wire.events import AGENT_SCOPED, EVENT_TYPES
from relay.wire.keys import Keys, validate_tenant
from relay.wire.scripts import script

# fakeredis types every reply as a union of bytes, str and None; the tests
# read replies of known types, so the client is typed loosely.
FakeRedis: TypeAlias = Any

RID = str(uuid.uuid4())
ROOT = str(uuid.uuid4())
CHILD = str(uuid.uuid4())


def spawned(agent: str, parent: str | None, depth: int = 0) -> dict[str, object]:
    return {"type": "agent_spawned", "agent_id": agent, "parent_id": parent,
            "task_description": "t", "depth": depth, "index": 0, "total": 1}  # fmt: skip


def test_every_key_of_a_request_shares_one_hash_tag() -> None:
    rk = Keys("acme").request(RID)
    tags = {k[k.index("{") : k.index("}") + 1] for k in (*rk.script_keys, rk.pending, rk.decision,
                                                           rk.budget)}  # fmt: skip
    assert tags == {"{" + RID + "}"}
    assert Keys("acme").cancel(RID).endswith("{" + RID + "}")
    assert Keys("acme").request_id_from_channel(rk.channel) == RID
    assert "acme" in rk.seq and "acme" in Keys("acme").firehose_channel


def test_tenant_names_are_validated() -> None:
    with pytest.raises(ValueError, match="invalid tenant"):
        validate_tenant("a:b")


async def test_seq_is_assigned_atomically_and_never_reused(
    fake_redis: FakeRedis,
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    seqs = await asyncio.gather(
        *(client.publish(RID, {"type": "agent_text_delta", "agent_id": ROOT, "text": str(i)})
          for i in range(50))
    )  # fmt: skip
    assert sorted(seqs) == list(range(1, 51))
    history = await fake_redis.xrange(client.keys.request(RID).history)
    assert [int(eid.split(b"-")[0]) for eid, _ in history] == list(range(1, 51))


async def test_frame_is_the_event_plus_request_id_seq_ts(
    fake_redis: FakeRedis,
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(client.keys.request_channel(RID))
    await client.publish(RID, spawned(ROOT, None))
    message = None
    while message is None or message["type"] != "message":
        message = await pubsub.get_message(timeout=1)
    env = Envelope.parse(message["data"])
    frame = json.loads(env.frame)
    assert frame["type"] == "agent_spawned" and frame["parent_id"] is None
    assert frame["request_id"] == RID and frame["seq"] == 1 and isinstance(frame["ts"], int)
    assert (env.request_id, env.seq, env.type) == (RID, 1, "agent_spawned")
    await pubsub.aclose()


async def test_batch_is_one_contiguous_seq_range(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, spawned(ROOT, None))
    published = await client.publish_text_deltas(RID, ROOT, ["a", "b", "c"])
    assert (published.first_seq, published.last_seq) == (2, 4)


async def test_history_is_capped_by_count(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, history=HistoryConfig(max_events=5), owns_connection=False)
    for i in range(12):
        await client.publish(RID, {"type": "agent_text_delta", "agent_id": ROOT, "text": str(i)})
    rk = client.keys.request(RID)
    history = await fake_redis.xrange(rk.history)
    assert [int(e.split(b"-")[0]) for e, _ in history] == [8, 9, 10, 11, 12]
    assert 0 < await fake_redis.ttl(rk.history) <= HistoryConfig().ttl_seconds


async def test_state_tracks_agents_budget_and_outcome(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, spawned(ROOT, None))
    await client.publish(RID, spawned(CHILD, ROOT, 1))
    await client.publish(RID, {"type": "budget_update", "request_id": RID, "tokens_used": 10,
                               "budget_total": 100, "percentage": 10.0})  # fmt: skip
    await client.publish(RID, {"type": "agent_cancelled", "agent_id": CHILD, "reason": "r"})
    done = {"type": "agent_completed", "agent_id": ROOT, "result_summary": "ok",
            "tokens_used": 9, "duration_ms": 5}  # fmt: skip
    await client.publish(RID, done)
    state = await fake_redis.hgetall(client.keys.request(RID).state)
    child = json.loads(state[f"a:{CHILD}".encode()])
    assert child["status"] == "cancelled" and child["parent_id"] == ROOT
    assert json.loads(state[b"budget"])["tokens_used"] == 10
    outcome = json.loads(state[b"outcome"])
    assert outcome["status"] == "completed" and outcome["agent_id"] == ROOT


async def test_invalid_events_never_reach_redis(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    with pytest.raises(ValidationError, match="agent_id"):
        await client.publish(RID, {"type": "agent_text_delta", "agent_id": "x", "text": "t"})
    with pytest.raises(ValueError, match="request_id"):
        await client.publish("not-a-uuid", {"type": "synthesis_started", "request_id": RID})
    other = str(uuid.uuid4())
    with pytest.raises(ValueError, match="request_id"):
        await client.publish(RID, {"type": "synthesis_started", "request_id": other})
    assert await fake_redis.keys("*") == []


async def test_retry_after_an_ambiguous_failure_does_not_duplicate(
    fake_redis: FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    real = client._run
    calls = 0

    async def lose_first_reply(rid: str, keys: list[str], args: list[object]):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        result = await real(rid, keys, args)
        if calls == 1:
            raise RedisConnectionError("reply lost")
        return result

    monkeypatch.setattr(client, "_run", lose_first_reply)
    seq = await client.publish(RID, {"type": "agent_text_delta", "agent_id": ROOT, "text": "x"})
    assert seq == 1 and calls == 2
    assert await fake_redis.xlen(client.keys.request(RID).history) == 1


async def test_publish_error_after_the_retry_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    dead.connection_pool.connection_kwargs["server"].connected = False
    client = RelayClient(dead, publish_retry_seconds=0.3, owns_connection=False)
    with pytest.raises(PublishError, match="failed after"):
        await client.publish(RID, {"type": "agent_text_delta", "agent_id": ROOT, "text": "x"})
    await dead.aclose()


async def test_an_event_with_its_own_request_id_has_it_once(
    fake_redis: FakeRedis,
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await client.publish(RID, {"type": "synthesis_started", "request_id": RID})
    [(_, fields)] = await fake_redis.xrange(client.keys.request(RID).history)
    frame = fields[b"f"].decode()
    assert frame.count('"request_id"') == 1
    assert json.loads(frame) == {"type": "synthesis_started", "request_id": RID, "seq": 1,
                                 "ts": json.loads(frame)["ts"]}  # fmt: skip


async def test_a_lost_seq_starts_a_new_incarnation(fake_redis: FakeRedis) -> None:
    """Evicted or lost seq with history kept: a new epoch at seq 1, never a stuck request."""
    client = RelayClient(fake_redis, owns_connection=False)
    first = await client.publish_many(RID, [{"type": "synthesis_started", "request_id": RID}] * 3)
    rk = client.keys.request(RID)
    await fake_redis.delete(rk.seq)
    again = await client.publish_many(RID, [{"type": "synthesis_started", "request_id": RID}])
    assert again.last_seq == 1 and again.epoch != first.epoch
    assert await fake_redis.xlen(rk.history) == 1


async def test_script_refusals_are_publish_errors(fake_redis: FakeRedis) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    await fake_redis.set(client.keys.request(RID).history, "not a stream")
    await fake_redis.set(client.keys.request(RID).seq, 1)
    await fake_redis.set(client.keys.request(RID).epoch, "e")
    with pytest.raises(PublishError, match="refused by Redis"):
        await client.publish(RID, {"type": "synthesis_started", "request_id": RID})


# ---------------------------------------------------------------- refusals
#
# The script is the last gate for orchestrators in other languages: every
# refusal must leave Redis exactly as it was, because a malformed history
# entry is served to every client that resumes across it.

OTHER = str(uuid.uuid4())
DELTA = '{"type":"agent_text_delta","agent_id":"%s","text":"hi"}' % ROOT


def script_args(rid: str = RID, **override: Any) -> tuple[list[str], list[object]]:
    """KEYS and the nine fixed ARGV of a publish to ``rid`` (``argN=`` replaces ARGV[N])."""
    keys = Keys()
    rk = keys.request(rid)
    args: list[object] = [rid, "epoch1", 100, 3600, 7200, rk.channel, keys.firehose_channel,
                          "pid1", "0"]  # fmt: skip
    for name, value in override.items():
        args[int(name.removeprefix("arg")) - 1] = value
    return rk.script_keys, args


async def raw_publish(redis: FakeRedis, *pairs: str, rid: str = RID) -> Any:
    keys, args = script_args(rid)
    return await script("publish")(redis, keys, [*args, *pairs])


async def keyspace(redis: FakeRedis) -> dict[bytes, object]:
    """Every key with its whole value, to prove a refused call changed nothing."""
    dump: dict[bytes, object] = {}
    for key in await redis.keys("*"):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            dump[key] = await redis.get(key)
        elif kind == "hash":
            dump[key] = await redis.hgetall(key)
        elif kind == "stream":
            dump[key] = await redis.xrange(key)
        else:  # pragma: no cover - the publish script writes nothing else
            dump[key] = kind
    return dump


EVENT_REFUSALS = [
    pytest.param(["agent_text_delta", '{"type":"agent_text_delta",'],
                 r'^relay: event 2: is not valid JSON$', id="invalid-json"),
    pytest.param(["agent_text_delta", '["agent_text_delta"]'],
                 r"^relay: event 2: is not a JSON object$", id="array"),
    pytest.param(["agent_text_delta", '"agent_text_delta"'],
                 r"^relay: event 2: is not a JSON object$", id="string"),
    pytest.param(["synthesis_started", '{"type":"synthesis_started","request_id":"%s"}' % OTHER],
                 r'^relay: event 2: request_id "%s" does not match the request "%s"$'
                 % (OTHER, RID),
                 id="foreign-request-id"),
    pytest.param(["synthesis_started", '{"type":"synthesis_started","request_id":null}'],
                 r'^relay: event 2: request_id null does not match', id="null-request-id"),
    pytest.param(["agent_text_delta", DELTA[:-1] + ',"seq":7}'],
                 r'^relay: event 2: carries "seq": seq and ts are assigned by the script$',
                 id="seq"),
    pytest.param(["agent_text_delta", DELTA[:-1] + ',"ts":7}'],
                 r'^relay: event 2: carries "ts"', id="ts"),
    pytest.param(["agent_text_delta", DELTA[:-1] + ',"seq":null}'],
                 r'^relay: event 2: carries "seq"', id="null-seq"),
    pytest.param(["agent_completed", DELTA],
                 r'^relay: event 2: type argument "agent_completed" does not match the '
                 r'event\'s "type" "agent_text_delta"$', id="type-mismatch"),
    pytest.param(["agent_text_delta", '{"agent_id":"%s","text":"hi"}' % ROOT],
                 r'^relay: event 2: type argument "agent_text_delta" does not match the '
                 r'event\'s "type" null$', id="type-missing"),
    pytest.param(["agent_dance", '{"type":"agent_dance","agent_id":"%s"}' % ROOT],
                 r'^relay: event 2: unknown event type "agent_dance"$', id="unknown-type"),
    # Two known words: the type is one word of the channel header, never more.
    pytest.param(["agent_spawned agent_text_delta",
                  '{"type":"agent_spawned agent_text_delta","agent_id":"%s"}' % ROOT],
                 r'^relay: event 2: unknown event type "agent_spawned agent_text_delta"$',
                 id="two-types"),
    pytest.param(["agent_spawned|agent_text_delta",
                  '{"type":"agent_spawned|agent_text_delta","agent_id":"%s"}' % ROOT],
                 r'^relay: event 2: unknown event type "agent_spawned|agent_text_delta"$',
                 id="two-types-bar"),
    pytest.param(["agent_text_delta", DELTA + "\n"],
                 r'^relay: event 2: must end with "}"', id="trailing-newline"),
    pytest.param(["agent_spawned", '{"type":"agent_spawned","agent_id":null,"parent_id":null}'],
                 r"^relay: event 2: agent_spawned needs agent_id as a string, got null$",
                 id="agent-id-null"),
    pytest.param(["agent_text_delta", '{"type":"agent_text_delta","text":"hi"}'],
                 r"^relay: event 2: agent_text_delta needs agent_id as a string, got null$",
                 id="agent-id-missing"),
    pytest.param(["agent_text_delta", '{"type":"agent_text_delta","agent_id":5,"text":"x"}'],
                 r"^relay: event 2: agent_text_delta needs agent_id as a string, got 5$",
                 id="agent-id-number"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "message"), EVENT_REFUSALS)
async def test_a_bad_event_refuses_the_whole_call_and_leaves_no_trace(
    fake_redis: FakeRedis, bad: list[str], message: str
) -> None:
    await raw_publish(fake_redis, "agent_spawned", json.dumps(spawned(ROOT, None)))
    before = await keyspace(fake_redis)
    # A good event first: validation of the whole call precedes any write.
    with pytest.raises(ResponseError, match=message):
        await raw_publish(fake_redis, "agent_text_delta", DELTA, *bad)
    assert await keyspace(fake_redis) == before


ARGUMENT_REFUSALS = [
    pytest.param({"arg1": RID.upper()},
                 r"^relay: request_id .* is not a lowercase hyphenated UUID$",
                 id="uppercase-request-id"),
    pytest.param({"arg1": "r1"}, r'^relay: request_id "r1" is not a lowercase', id="not-uuid"),
    pytest.param({"arg1": RID.replace("-", "x")}, r"^relay: request_id .* is not a lowercase",
                 id="no-hyphens"),
    pytest.param({"arg1": RID[:7] + "-" + RID[7] + RID[9:]},
                 r"^relay: request_id .* is not a lowercase", id="misplaced-hyphen"),
    pytest.param({"arg6": Keys().request(OTHER).channel},
                 r"^relay: ARGV\[6\] .* is not the channel of request %s$" % RID,
                 id="foreign-channel"),
    pytest.param({"arg2": "two words"}, r'^relay: epoch candidate "two words" must be 1-64',
                 id="epoch-with-space"),
    pytest.param({"arg2": ""}, r"^relay: epoch candidate", id="empty-epoch"),
    pytest.param({"arg3": "0"}, r'^relay: ARGV\[3\] "0" is not a positive integer$',
                 id="history-max-zero"),
    pytest.param({"arg4": "1.5"}, r"^relay: ARGV\[4\] .* is not a positive integer$",
                 id="history-ttl-fraction"),
    pytest.param({"arg5": "-1"}, r"^relay: ARGV\[5\] .* is not a positive integer$",
                 id="state-ttl-negative"),
    pytest.param({"arg8": ""}, r"^relay: publish id \(ARGV\[8\]\) is empty$",
                 id="empty-publish-id"),
    pytest.param({"arg9": "yes"}, r"^relay: retry window \(ARGV\[9\]\) .* is not an integer",
                 id="retry-flag"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), ARGUMENT_REFUSALS)
async def test_bad_arguments_are_refused_before_any_write(
    fake_redis: FakeRedis, override: dict[str, Any], message: str
) -> None:
    keys, args = script_args(**override)
    with pytest.raises(ResponseError, match=message):
        await script("publish")(fake_redis, keys, [*args, "agent_text_delta", DELTA])
    assert await fake_redis.keys("*") == []


@pytest.mark.parametrize("index", [0, 1, 2, 3])
async def test_keys_of_another_request_are_refused(fake_redis: FakeRedis, index: int) -> None:
    keys, args = script_args()
    keys[index] = Keys().request(OTHER).script_keys[index]
    name = ["seq", "epoch", "history", "state"][index]
    with pytest.raises(
        ResponseError,
        match=r"^relay: KEYS\[%d\] .* is not the %s key of request %s$" % (index + 1, name, RID),
    ):
        await script("publish")(fake_redis, keys, [*args, "agent_text_delta", DELTA])
    assert await fake_redis.keys("*") == []


async def test_keys_of_another_tenant_are_refused(fake_redis: FakeRedis) -> None:
    keys, args = script_args()
    keys[3] = Keys("acme").request(RID).state
    with pytest.raises(ResponseError, match=r"^relay: KEYS\[4\] .* is not the state key"):
        await script("publish")(fake_redis, keys, [*args, "agent_text_delta", DELTA])
    assert await fake_redis.keys("*") == []


async def test_keys_in_the_wrong_order_are_refused(fake_redis: FakeRedis) -> None:
    (seq, epoch, history, state), args = script_args()
    with pytest.raises(ResponseError, match=r"^relay: KEYS\[3\] .* is not the history key"):
        await script("publish")(
            fake_redis, [seq, epoch, state, history], [*args, "agent_text_delta", DELTA]
        )
    with pytest.raises(ResponseError, match=r"^relay: expected 4 keys .* got 3$"):
        await script("publish")(
            fake_redis, [seq, epoch, history], [*args, "agent_text_delta", DELTA]
        )
    assert await fake_redis.keys("*") == []


@pytest.mark.parametrize("pairs", [[], ["agent_text_delta"], ["agent_text_delta", DELTA, "x"]])
async def test_events_must_come_in_type_json_pairs(fake_redis: FakeRedis, pairs: list[str]) -> None:
    keys, args = script_args()
    with pytest.raises(ResponseError, match=r"^relay: expected 9 arguments then \(type, event"):
        await script("publish")(fake_redis, keys, [*args, *pairs])
    assert await fake_redis.keys("*") == []


async def test_a_refused_call_publishes_nothing(fake_redis: FakeRedis) -> None:
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe(Keys().request_channel(RID))
    with pytest.raises(ResponseError):
        await raw_publish(fake_redis, "agent_text_delta", DELTA, "agent_text_delta", "{")
    marker = '{"type":"agent_text_delta","agent_id":"%s","text":"after"}' % ROOT
    await raw_publish(fake_redis, "agent_text_delta", marker)
    # The first event message on the channel is the later call's: nothing
    # of the refused call, not even its valid first event, went out.
    message = None
    while message is None or message["type"] != "message":
        message = await pubsub.get_message(timeout=1)
    env = Envelope.parse(message["data"])
    assert env.seq == 1 and json.loads(env.frame)["text"] == "after"
    await pubsub.aclose()


async def test_every_contract_type_is_accepted(fake_redis: FakeRedis) -> None:
    """The script's list of types is the contract's (relay.wire.events.EVENT_TYPES)."""
    pairs: list[str] = []
    for kind in sorted(EVENT_TYPES):
        body: dict[str, object] = {"type": kind}
        if kind in AGENT_SCOPED:
            body["agent_id"] = ROOT
        pairs += [kind, json.dumps(body, separators=(",", ":"))]
    result = await raw_publish(fake_redis, *pairs)
    assert isinstance(result, list) and result[3] == len(EVENT_TYPES)


async def test_reply_types_are_bulk_strings_then_integers(
    fake_redis: FakeRedis,
) -> None:
    epoch, ts, first, last = await raw_publish(fake_redis, "agent_text_delta", DELTA)
    assert (epoch, first, last) == (b"epoch1", 1, 1)
    assert isinstance(ts, bytes) and ts.isdigit()


async def test_sdk_surfaces_a_script_refusal_as_publish_error(
    fake_redis: FakeRedis,
) -> None:
    """The SDK validates first; anything that still reaches the script and is
    refused is a PublishError carrying the script's own message."""
    client = RelayClient(fake_redis, owns_connection=False)
    with pytest.raises(PublishError) as info:
        await client._publish_encoded(RID, ["agent_text_delta", DELTA, "agent_text_delta", "{"])
    assert "relay: event 2: is not valid JSON" in str(info.value)
    assert RID in str(info.value)
    # Only the activity index (same pipeline, harmless: readers skip requests
    # without state) is written; the request itself is untouched.
    assert await fake_redis.keys("*") == [client.keys.active.encode()]


# ---------------------------------------------------------------- snapshot budget


def budget_event(kind: str, used: int, **extra: object) -> dict[str, object]:
    return {"type": kind, "request_id": RID, "tokens_used": used, "budget_total": 1000, **extra}


async def test_budget_summary_is_the_latest_budget_event_as_a_whole(
    fake_redis: FakeRedis,
) -> None:
    client = RelayClient(fake_redis, owns_connection=False)
    state_key = client.keys.request(RID).state

    async def summary() -> dict[str, object]:
        raw = await fake_redis.hget(state_key, "budget")
        assert raw is not None
        value: dict[str, object] = json.loads(raw)
        return value

    await client.publish(RID, budget_event("budget_update", 100, percentage=10.0))
    assert await summary() == {"tokens_used": 100, "budget_total": 1000, "percentage": 10.0,
                               "completed_agents": None, "incomplete_agents": None,
                               "warned": False, "exhausted": False, "seq": 1}  # fmt: skip
    # A warning carries no percentage: the summary must not keep the update's.
    await client.publish(RID, budget_event("budget_warning", 800))
    after_warning = await summary()
    assert after_warning["tokens_used"] == 800 and after_warning["percentage"] is None
    assert after_warning["warned"] is True and after_warning["seq"] == 2
    await client.publish(
        RID, budget_event("budget_exhausted", 1000, completed_agents=[CHILD], incomplete_agents=[])
    )
    exhausted = await summary()
    assert exhausted["completed_agents"] == [CHILD] and exhausted["exhausted"] is True
    # A later update replaces the summary again; the flags are history and stay.
    await client.publish(RID, budget_event("budget_update", 1000, percentage=100.0))
    last = await summary()
    assert (last["tokens_used"], last["percentage"]) == (1000, 100.0)
    assert last["completed_agents"] is None
    assert last["warned"] is True and last["exhausted"] is True


async def test_a_stray_agent_id_on_a_budget_event_adds_no_agent(
    fake_redis: FakeRedis,
) -> None:
    body = json.dumps(budget_event("budget_update", 1, percentage=0.1, agent_id=ROOT),
                      separators=(",", ":"))  # fmt: skip
    await raw_publish(fake_redis, "budget_update", body)
    state = await fake_redis.hgetall(Keys().request(RID).state)
    assert not any(k.startswith(b"a:") for k in state) and b"budget" in state


# ---------------------------------------------------------------- budget scripts


async def test_budget_answer_refuses_other_decisions(fake_redis: FakeRedis) -> None:
    rk = Keys().request(RID)
    await fake_redis.set(rk.pending, json.dumps({"pause_id": "p1", "timeout_decision": "stop"}))
    with pytest.raises(
        ResponseError, match=r'^relay: decision "maybe" is not "continue" or "stop"'
    ):
        await script("budget_answer")(fake_redis, [rk.pending, rk.decision, rk.decided],
                                      ["maybe", 300, ""])  # fmt: skip
    with pytest.raises(ResponseError, match=r"^relay: ttl \(ARGV\[2\]\) is not a positive"):
        await script("budget_answer")(fake_redis, [rk.pending, rk.decision, rk.decided],
                                      ["stop", "0", ""])  # fmt: skip
    assert await fake_redis.exists(rk.pending, rk.decision, rk.decided) == 1


async def test_budget_timeout_refuses_other_defaults(fake_redis: FakeRedis) -> None:
    rk = Keys().request(RID)
    await fake_redis.set(rk.pending, json.dumps({"pause_id": "p1", "timeout_decision": "stop"}))
    keys = [rk.pending, rk.decision, rk.decided]
    with pytest.raises(ResponseError, match=r'^relay: default decision "go" is not "continue"'):
        await script("budget_timeout")(fake_redis, keys, ["p1", "go", 300])
    with pytest.raises(ResponseError, match=r"^relay: pause_id \(ARGV\[1\]\) is empty$"):
        await script("budget_timeout")(fake_redis, keys, ["", "stop", 300])
    with pytest.raises(ResponseError, match=r"^relay: ttl \(ARGV\[3\]\) is not a positive"):
        await script("budget_timeout")(fake_redis, keys, ["p1", "stop", "x"])
    assert await fake_redis.exists(rk.pending, rk.decision, rk.decided) == 1


@pytest.mark.parametrize(
    ("pause", "ttl", "message"),
    [
        ("{", "1000", r"^relay: pause \(ARGV\[1\]\) is not a JSON object$"),
        ('{"timeout_decision":"stop"}', "1000", r"^relay: pause has no pause_id string$"),
        ('{"pause_id":"p","timeout_decision":"later"}', "1000",
         r'^relay: pause timeout_decision is not "continue" or "stop"$'),
        ('{"pause_id":"p","timeout_decision":"stop"}', "0",
         r"^relay: ttl \(ARGV\[2\]\) is not a positive integer$"),
    ],
)  # fmt: skip
async def test_budget_open_refuses_a_malformed_pause(
    fake_redis: FakeRedis, pause: str, ttl: str, message: str
) -> None:
    rk = Keys().request(RID)
    with pytest.raises(ResponseError, match=message):
        await script("budget_open")(fake_redis, [rk.pending, rk.decision], [pause, ttl])
    assert await fake_redis.keys("*") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-5", "1000", "0.8", "60"], r"^relay: tokens \(ARGV\[1\]\) is not an integer >= 0$"),
        (["5", "0", "0.8", "60"], r"^relay: total \(ARGV\[2\]\) is not a positive integer$"),
        (["5", "1000", "80", "60"], r"^relay: threshold \(ARGV\[3\]\) is not a fraction in"),
        (["5", "1000", "0", "60"], r"^relay: threshold \(ARGV\[3\]\)"),
        (["5", "1000", "0.8", "1h"], r"^relay: ttl \(ARGV\[4\]\) is not a positive integer$"),
    ],
)
async def test_budget_add_refuses_out_of_range_arguments(
    fake_redis: FakeRedis, args: list[str], message: str
) -> None:
    rk = Keys().request(RID)
    with pytest.raises(ResponseError, match=message):
        await script("budget_add")(fake_redis, [rk.budget, rk.pending], args)
    assert await fake_redis.keys("*") == []
