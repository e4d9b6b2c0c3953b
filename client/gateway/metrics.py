"""Prometheus metrics of the gateway, in their own registry (one per app). Names start with mesh_;
times are in seconds, sizes in tokens."""

from __future__ import annotations

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mesh_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.in_flight = Gauge("mesh_requests_in_flight", "requests being served", registry=r)
        self.time_to_first_token = Histogram("mesh_time_to_first_token_seconds", "request start to first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("mesh_inter_token_latency_seconds", "time between consecutive tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("mesh_request_duration_seconds", "request start to last byte",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mesh_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("mesh_generated_tokens", "tokens generated", registry=r)
        self.hop_latency = Histogram("mesh_hop_latency_seconds", "round trip of one hop of one step, compute included",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.failovers = Counter("mesh_failovers", "donors replaced in the middle of a session", registry=r)
        self.stream_errors = Counter("mesh_stream_errors", "streams ended by an error event", registry=r)

    # the RemoteSession observer interface
    def hop(self, seconds: float) -> None:
        self.hop_latency.observe(seconds)

    def failover(self) -> None:
        self.failovers.inc()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
