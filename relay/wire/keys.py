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
    relay:T:req:{R}:text:A       string  agent A's text so far (its latest bytes), for snapshots
    relay:T:cancel:{X}           string  cancel tombstone for agent or request X
    relay:T:active               zset    request ids by last publish time (ms)

    relay:T:req:{R}:events       channel every frame of request R
    relay:T:events               channel every frame of the tenant (firehose)
    relay:T:cancels              channel cancel nudges (payload: the tombstone JSON)
    relay:T:probe:G              channel liveness probe of gateway G (T: its redis.tenant)

The part in braces is a Redis Cluster hash tag: every key of one request lands
in the same slot, so the Lua scripts that touch them all stay single-slot. A
cancel tombstone for a request id shares that slot too. ``active`` is a
tenant-wide index and is written in the same pipeline, never inside a script.

Everything, the gateways' probe channels included, is under ``relay:T:``, so
one ACL rule (``~relay:T:* &relay:T:*``) confines a Redis user to one tenant
(deploy/redis-acl/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "relay"

_TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is usable inside key names, else raise ``ValueError``."""
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError(
            f"invalid tenant {tenant!r}: 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return tenant


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
    """Key and channel builder for one tenant."""

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
            text_prefix=f"{tag}:text:",
        )

    def request_channel(self, request_id: str) -> str:
        """The pub/sub channel carrying every frame of ``request_id``."""
        return f"{self._base}:req:{{{request_id}}}:events"

    @property
    def firehose_channel(self) -> str:
        """The channel carrying every frame of the tenant."""
        return f"{self._base}:events"

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
