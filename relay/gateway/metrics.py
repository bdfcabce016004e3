"""Prometheus metrics of one gateway process.

Each app gets its own ``CollectorRegistry`` so several apps can live in one
test process without colliding in the global registry.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "LATENCY_SAMPLE", "Metrics"]

LATENCY_SAMPLE = 8
"""One delivery in this many is timed for ``relay_publish_to_send_seconds``."""


class Metrics:
    """The counters, gauges and histograms the gateway updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("relay_connections", "Open WebSocket connections", registry=r)
        self.connections_total = Counter(
            "relay_connections_opened", "WebSocket connections accepted", registry=r
        )
        self.events_in = Counter(
            "relay_events_received", "Events received from Redis pub/sub", registry=r
        )
        self.events_out = Counter("relay_events_sent", "Event frames sent to clients", registry=r)
        self.bytes_out = Counter("relay_bytes_sent", "Bytes of frames sent to clients", registry=r)
        self.events_direct = Counter(
            "relay_events_sent_direct",
            "Of relay_events_sent, those the hub wrote itself to a caught-up client",
            registry=r,
        )
        self.replayed = Counter(
            "relay_events_replayed", "Event frames sent from history (resume, lag)", registry=r
        )
        self.backfilled = Counter(
            "relay_events_backfilled",
            "Events routed from history by the hub (holes, reconnects), once per process",
            registry=r,
        )
        self.history_skipped = Counter(
            "relay_history_entries_skipped",
            "History entries that could not be parsed and were skipped on replay",
            registry=r,
        )
        self.internal_errors = Counter(
            "relay_internal_errors",
            "Unexpected exceptions while serving a connection, by where they happened",
            ["where"],
            registry=r,
        )
        self.queue_drops = Counter(
            "relay_queue_drops", "Events dropped from full client queues", registry=r
        )
        self.connections_shed = Counter(
            "relay_connections_shed",
            "Connections closed with 1013 because the event loop lagged (overload)",
            registry=r,
        )
        self.resyncs = Counter(
            "relay_resyncs", "resync_required frames sent", ["reason"], registry=r
        )
        self.redis_reconnects = Counter(
            "relay_redis_reconnects", "Pub/sub connections rebuilt", registry=r
        )
        self.probe_failures = Counter(
            "relay_probe_failures", "Delivery probes that did not come back", registry=r
        )
        self.commands = Counter(
            "relay_commands",
            "Client commands by type and outcome",
            ["type", "outcome"],
            registry=r,
        )
        self.auth_failures = Counter(
            "relay_auth_failures",
            "Refused tokens and origins (missing, invalid, origin)",
            ["reason"],
            registry=r,
        )
        self.requests_lost = Counter(
            "relay_requests_lost",
            "Requests this gateway finished because their orchestrator's lease expired",
            registry=r,
        )
        self.orchestrators_lost = Counter(
            "relay_orchestrators_lost",
            "Orchestrators this gateway declared lost (lease not renewed in time)",
            registry=r,
        )
        self.latency = Histogram(
            "relay_publish_to_send_seconds",
            "Time from the publish (Redis server clock) to the frame being written to a "
            "client (gateway clock), one delivery in 8 sampled: keep the clocks in sync "
            "(NTP); negative skew reads as 0",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def observe_latency(self, ts: int) -> None:
        """Time one delivery of an event published at ``ts`` (ms, Redis clock)."""
        self.latency.observe(max(0.0, time.time() - ts / 1000))
