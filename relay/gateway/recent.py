"""The newest events of each request this process has delivered, kept in memory.

Every refill the writers make reads a range of a request's history: a client
that lagged (its queue overflowed), a gap after a hub reconnect, a resume a
few events back. Under overload thousands of clients lag on the same request
at once, and each read the same range from Redis and parsed it again: the
refills cost far more than the live deliveries they replaced, saturated the
command pool (readiness and the probe waited behind them) and the gateway
collapsed instead of shedding.

The hub already holds every event it delivers as an :class:`Envelope`. This
keeps the newest of them per request (the same objects, so the memory is
mostly shared with the send queues), and a refill that falls inside what is
kept is served from here: no Redis read, no parse, the same bytes.

Bounded by bytes over the whole process (``gateway.recent_events_bytes``) and
by events per request (``gateway.recent_events_per_request``). Overflow
policy: evict the oldest events of the least recently published request
first; a range that is no longer (or not yet) complete here is read from
Redis as before, so eviction costs speed, never correctness.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import islice

from relay.gateway.envelope import Envelope


@dataclass(slots=True)
class _Run:
    """Contiguous events of one request, one epoch: seqs first..first+len-1."""

    epoch: str
    events: deque[Envelope] = field(default_factory=deque)
    nbytes: int = 0


class RecentEvents:
    """Per request, the newest contiguous events delivered; see the module doc."""

    def __init__(self, max_bytes: int, per_request: int) -> None:
        self.max_bytes = max_bytes
        self.per_request = per_request
        self.nbytes = 0
        self._runs: OrderedDict[tuple[str, str], _Run] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(run.events) for run in self._runs.values())

    def add(self, tenant: str, env: Envelope) -> None:
        """Remember ``env`` (called once per event per process, in seq order)."""
        if self.max_bytes <= 0:
            return
        key = (tenant, env.request_id)
        run = self._runs.get(key)
        if run is not None and run.epoch == env.epoch and run.events:
            last = run.events[-1].seq
            if env.seq <= last:
                return  # already kept
            if env.seq != last + 1:
                run = None  # a hole: what is kept can no longer serve ranges past it
        elif run is not None and run.epoch != env.epoch:
            run = None
        if run is None:
            self._drop(key)
            run = self._runs[key] = _Run(env.epoch)
        else:
            self._runs.move_to_end(key)
        run.events.append(env)
        run.nbytes += env.nbytes
        self.nbytes += env.nbytes
        if len(run.events) > self.per_request:
            self._pop_oldest(key, run)
        while self.nbytes > self.max_bytes and self._runs:
            oldest_key = next(iter(self._runs))
            self._pop_oldest(oldest_key, self._runs[oldest_key])

    def range(
        self, tenant: str, request_id: str, epoch: str, after: int, until: int
    ) -> list[Envelope] | None:
        """Events ``after < seq <= until`` of ``epoch``, or None unless all are kept."""
        run = self._runs.get((tenant, request_id))
        if run is None or run.epoch != epoch or not run.events or until <= after:
            return None
        first = run.events[0].seq
        last = run.events[-1].seq
        if after + 1 < first or until > last:
            return None
        return list(islice(run.events, after + 1 - first, until + 1 - first))

    def forget(self, tenant: str, request_id: str) -> None:
        """Drop what is kept of a request (its stream was reset)."""
        self._drop((tenant, request_id))

    def _pop_oldest(self, key: tuple[str, str], run: _Run) -> None:
        env = run.events.popleft()
        run.nbytes -= env.nbytes
        self.nbytes -= env.nbytes
        if not run.events:
            del self._runs[key]

    def _drop(self, key: tuple[str, str]) -> None:
        run = self._runs.pop(key, None)
        if run is not None:
            self.nbytes -= run.nbytes
