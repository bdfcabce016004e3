"""Resolve the short ids people see (``relay tail`` and the console show 8 characters).

``relay cancel 1a2b3c4d`` must find the one agent or request whose id starts
that way. The candidates come straight from Redis (layout in
:mod:`relay.wire.keys`): with ``--request R``, R itself and the agents in R's
snapshot state (fields ``a:<agent_id>`` of ``relay:T:req:{R}:state``);
without it, the :data:`RECENT_REQUESTS` most recently active requests of the
tenant (``relay:T:active``) and their agents. A full UUID is taken as it is,
without a lookup, so a cancel can still be written before the agent exists.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from relay.wire.keys import Keys
from relay.wire.scripts import as_text

RECENT_REQUESTS = 500
"""Requests searched without ``--request``, newest first: a bound on the reads."""
MIN_PREFIX = 4
"""Shortest prefix accepted: shorter ones match too much to cancel safely."""
SHOWN_MATCHES = 5

Kind = Literal["request", "agent"]
_PREFIX_RE = re.compile(r"^[0-9a-f-]+$")


class ResolveError(Exception):
    """No id, or more than one, matches; the message says which and what to do."""


class PrefixSyntaxError(ResolveError):
    """The prefix cannot be the start of an id at all (bad usage)."""


@dataclass(frozen=True, slots=True)
class Match:
    """One id a prefix matched, and where it was found."""

    id: str
    kind: Kind
    request_id: str

    def describe(self) -> str:
        if self.kind == "request":
            return f"request {self.id}"
        return f"agent {self.id} of request {self.request_id}"


def _hex(value: str) -> str:
    return value.replace("-", "")


def _as_uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def full_id(text: str) -> str | None:
    """``text`` as a canonical UUID when it is a complete one, else None."""
    return _as_uuid(text.strip())


async def candidates(
    redis: Redis, keys: Keys, request_id: str | None, kinds: Collection[Kind]
) -> list[Match]:
    """Every id a prefix may resolve to, read from Redis."""
    if request_id is not None:
        requests = [request_id]
        if not await redis.exists(keys.request(request_id).state):
            raise ResolveError(
                f"request {request_id} has no state in Redis (unknown, or expired after "
                "history.state_ttl_seconds)"
            )
    else:
        raw = await redis.zrevrange(keys.active, 0, RECENT_REQUESTS - 1)
        requests = [rid for rid in (_as_uuid(as_text(r)) for r in raw) if rid is not None]
    found: list[Match] = []
    if "request" in kinds:
        found += [Match(rid, "request", rid) for rid in requests]
    if "agent" in kinds and requests:
        pipe = redis.pipeline(transaction=False)
        for rid in requests:
            pipe.hkeys(keys.request(rid).state)
        for rid, fields in zip(requests, await pipe.execute(), strict=True):
            for field in map(as_text, fields):
                agent = _as_uuid(field[2:]) if field.startswith("a:") else None
                if agent is not None:
                    found.append(Match(agent, "agent", rid))
    return found


async def resolve_id(
    redis: Redis,
    keys: Keys,
    prefix: str,
    *,
    request_id: str | None = None,
    kinds: Collection[Kind] = ("request", "agent"),
) -> Match | None:
    """The one agent or request id starting with ``prefix``.

    Returns None for a full UUID (use it as it is; nothing was looked up).
    Raises :class:`PrefixSyntaxError` for text that cannot start an id and
    :class:`ResolveError` when no id or several ids match.
    """
    text = prefix.strip().lower()
    if full_id(text) is not None:
        return None
    if not _PREFIX_RE.fullmatch(text) or len(_hex(text)) < MIN_PREFIX:
        raise PrefixSyntaxError(
            f"{prefix!r} is neither a UUID nor an id prefix "
            f"(at least {MIN_PREFIX} hexadecimal digits, as `relay tail` shows them)"
        )
    found = await candidates(redis, keys, request_id, kinds)
    wanted = _hex(text)
    matches = list({m.id: m for m in found if _hex(m.id).startswith(wanted)}.values())
    where = (
        f"request {request_id} and its agents"
        if request_id is not None
        else f"the {RECENT_REQUESTS} most recently active requests"
        + (" and their agents" if "agent" in kinds else "")
    )
    if not matches:
        raise ResolveError(
            f"no id starts with {text} (searched {where}); give the full id"
            + ("" if request_id is not None else " or narrow the search with --request")
        )
    if len(matches) > 1:
        shown = "; ".join(m.describe() for m in matches[:SHOWN_MATCHES])
        more = f"; and {len(matches) - SHOWN_MATCHES} more" if len(matches) > SHOWN_MATCHES else ""
        raise ResolveError(
            f"{text} is ambiguous ({len(matches)} matches: {shown}{more}); give more characters"
        )
    return matches[0]
