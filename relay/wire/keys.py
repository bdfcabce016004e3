"""Every Redis key and channel name relay uses, built in one place.

Layout (``T`` is the tenant, ``R`` a request id, ``X`` an agent or request id)::

    relay:T:req:{R}:seq          string  last seq assigned to the request (INCR)
    relay:T:req:{R}:epoch        string  id of this incarnation of the stream
    relay:T:req:{R}:history      stream  the request's frames, entry id = "<seq>-0"
    relay:T:req:{R}:state        hash    snapshot state: agents, budget, outcome
    relay:T:req:{R}:budget       hash    shared token budget: used, total, warned
    relay:T:req:{R}:pending      string  the pending budget pause (JSON), if any
    relay:T:req:{R}:decision     list    wake-ups of pause waiters (pause ids)
    relay:T:req:{R}:decided      hash    pause_id -> "client:<decision>" / "timeout:<decision>"
    relay:T:req:{R}:lease        hash    o:<O> -> "held"/"lost"; lost, lost_ts once declared lost
    relay:T:orch:{O}:requests    set     request ids orchestrator O holds
    relay:T:leases:{T}           zset    orchestrator id -> lease deadline (ms, Redis clock)
    relay:T:leases:{T}:lost      zset    orchestrator id -> when it was declared lost (ms)
    relay:T:req:{R}:text:A       string  agent A's text so far (its latest bytes), for snapshots
    relay:T:cancel:{X}           string  cancel tombstone for agent or request X
    relay:T:active               zset    request ids by last publish time (ms)

    relay:T:req:{R}:events       channel every frame of request R
    relay:T:events               channel every frame of the tenant (firehose)
    relay:T:events:{N}           shard   on a Redis Cluster, the firehose of one slot
    relay:T:cancels              channel cancel nudges (payload: the tombstone JSON)
    relay:T:probe:G              channel liveness probe of gateway G (T: its redis.tenant)

The part in braces is a Redis Cluster hash tag: every key of one request lands
in the same slot, so the Lua scripts that touch them all stay single-slot. A
cancel tombstone for a request id shares that slot too. ``active`` is a
tenant-wide index and is written in the same pipeline, never inside a script.
The two lease indexes share the tag ``{T}``, so the script that renews a lease
and the one that declares it lost run in one slot and cannot interleave.

On a Redis Cluster every channel is a shard channel (SPUBLISH/SSUBSCRIBE),
delivered only by the node that owns its slot. The firehose is split by slot:
the frames of request R also go to ``relay:T:events:{N}`` where ``N`` is the
slot tag of R's slot (:func:`slot_tag`: the smallest decimal number whose
CRC16 lands in that slot), so the publish script stays single-slot and each
frame is carried by one node. A tenant-wide reader subscribes all 16384 of
them, each on its owner.

Everything, the gateways' probe channels included, is under ``relay:T:``, so
one ACL rule (``~relay:T:* &relay:T:*``) confines a Redis user to one tenant
(deploy/redis-acl/).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from functools import cache

PREFIX = "relay"
SLOTS = 16384
"""Hash slots of a Redis Cluster."""

_TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is usable inside key names, else raise ``ValueError``."""
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError(
            f"invalid tenant {tenant!r}: 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return tenant


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot of ``key`` (CRC16 of its hash tag, if it has one).

    >>> key_slot("relay:t:req:{abc}:seq") == key_slot("{abc}")
    True
    """
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % SLOTS


@cache
def _slot_tags() -> tuple[str, ...]:
    # 109,758 CRCs (about 0.1 s, once per process, on first use): the
    # smallest decimal number landing in each slot.
    tags: list[str | None] = [None] * SLOTS
    left, n = SLOTS, 0
    while left:
        text = str(n)
        slot = binascii.crc_hqx(text.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = text
            left -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def slot_tag(slot: int) -> str:
    """A hash tag landing in ``slot``: the smallest decimal number whose CRC16 does.

    >>> key_slot("{" + slot_tag(42) + "}") == 42
    True
    """
    return _slot_tags()[slot]


@dataclass(frozen=True, slots=True)
class RequestKeys:
    """The keys and channel of one request, all in one cluster slot."""

    seq: str
    epoch: str
    history: str
    state: str
    budget: str
    pending: str
    decision: str
    decided: str
    channel: str
    lease: str
    """Which orchestrators hold the request, and whether it was declared lost."""
    text_prefix: str
    """``text_prefix + agent_id`` is the agent's text so far (see :meth:`text`)."""

    def text(self, agent_id: str) -> str:
        """The key of ``agent_id``'s text so far; the publish script builds the same name."""
        return self.text_prefix + agent_id

    @property
    def script_keys(self) -> list[str]:
        """KEYS of the publish script, in the order the script expects them."""
        return [self.seq, self.epoch, self.history, self.state]


@dataclass(frozen=True, slots=True)
class Keys:
    """Key and channel builder for one tenant.

    >>> Keys("acme").request("3f0c2a6e-0d6b-4c1e-9e4b-8d6a1f2b3c4d").seq
    'relay:acme:req:{3f0c2a6e-0d6b-4c1e-9e4b-8d6a1f2b3c4d}:seq'
    """

    tenant: str = "default"

    def __post_init__(self) -> None:
        validate_tenant(self.tenant)

    @property
    def _base(self) -> str:
        return f"{PREFIX}:{self.tenant}"

    def request(self, request_id: str) -> RequestKeys:
        """Every key of ``request_id``."""
        tag = f"{self._base}:req:{{{request_id}}}"
        return RequestKeys(
            seq=f"{tag}:seq",
            epoch=f"{tag}:epoch",
            history=f"{tag}:history",
            state=f"{tag}:state",
            budget=f"{tag}:budget",
            pending=f"{tag}:pending",
            decision=f"{tag}:decision",
            decided=f"{tag}:decided",
            channel=f"{tag}:events",
            lease=f"{tag}:lease",
            text_prefix=f"{tag}:text:",
        )

    def request_channel(self, request_id: str) -> str:
        """The pub/sub channel carrying every frame of ``request_id``."""
        return f"{self._base}:req:{{{request_id}}}:events"

    @property
    def firehose_channel(self) -> str:
        """The channel carrying every frame of the tenant."""
        return f"{self._base}:events"

    def firehose_shard(self, request_id: str) -> str:
        """On a Redis Cluster, the firehose shard channel in ``request_id``'s slot."""
        return self.firehose_shard_of_slot(key_slot(request_id))

    def firehose_shard_of_slot(self, slot: int) -> str:
        """The firehose shard channel of hash slot ``slot``."""
        return f"{self._base}:events:{{{slot_tag(slot)}}}"

    def firehose_shards(self) -> list[str]:
        """Every firehose shard channel, indexed by slot (what a tenant-wide reader holds)."""
        return [self.firehose_shard_of_slot(s) for s in range(SLOTS)]

    def is_firehose_shard(self, channel: str) -> bool:
        """Whether ``channel`` is one of :meth:`firehose_shards`."""
        head = f"{self._base}:events:{{"
        return channel.startswith(head) and channel.endswith("}")

    @property
    def active(self) -> str:
        """Sorted set of request ids scored by their last publish time (ms)."""
        return f"{self._base}:active"

    def cancel(self, target_id: str) -> str:
        """The cancel tombstone of an agent or request id."""
        return f"{self._base}:cancel:{{{target_id}}}"

    @property
    def cancel_channel(self) -> str:
        """The channel that nudges orchestrators when a tombstone is written."""
        return f"{self._base}:cancels"

    @property
    def leases(self) -> str:
        """Sorted set of orchestrator ids scored by their lease deadline (ms, Redis clock)."""
        return f"{self._base}:leases:{{{self.tenant}}}"

    @property
    def leases_lost(self) -> str:
        """Sorted set of orchestrator ids declared lost, scored by when (ms); same slot
        as :attr:`leases`."""
        return f"{self._base}:leases:{{{self.tenant}}}:lost"

    def orchestrator_requests(self, orchestrator_id: str) -> str:
        """The set of request ids orchestrator ``orchestrator_id`` holds a lease on."""
        return f"{self._base}:orch:{{{orchestrator_id}}}:requests"

    def request_id_from_channel(self, channel: str) -> str | None:
        """Inverse of :meth:`request_channel`; ``None`` for any other channel."""
        head = f"{self._base}:req:{{"
        if channel.startswith(head) and channel.endswith("}:events"):
            return channel[len(head) : -len("}:events")]
        return None


def probe_channel(tenant: str, gateway_id: str) -> str:
    """The liveness probe channel of one gateway process, under its tenant.

    Under ``relay:T:`` (not a global ``relay:probe:``) so a gateway's Redis
    user needs no channel outside its tenant, and a user of another tenant
    can neither read nor spoof this gateway's probe.
    """
    return f"{Keys(tenant)._base}:probe:{gateway_id}"


def probe_shard(probe: str, slot: int) -> str:
    """On a Redis Cluster, ``probe`` as a shard channel in ``slot`` (one per node)."""
    return f"{probe}:{{{slot_tag(slot)}}}"
