"""Prometheus metrics of one server (own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series only double the output

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, float("inf"))
TOKENS_PER_FORWARD_BUCKETS = (1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8, 16, float("inf"))


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("cllm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.tokens = Counter("cllm_generated_tokens", "Tokens generated", registry=registry)
        self.forwards = Counter("cllm_row_forward_passes",
                                "Forward passes summed over the requests taking part in them", registry=registry)
        self.ttft = Histogram("cllm_time_to_first_token_seconds", "Arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("cllm_request_latency_seconds", "Arrival to the last generated token",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("cllm_queue_wait_seconds", "Arrival to joining the decoding batch",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens_per_forward = Histogram("cllm_request_tokens_per_forward", "Tokens per forward of each request",
                                            buckets=TOKENS_PER_FORWARD_BUCKETS, registry=registry)
        Gauge("cllm_queue_depth", "Requests waiting to join the batch",
              registry=registry).set_function(lambda: engine.queue_depth)
        Gauge("cllm_running_requests", "Requests in the decoding batch",
              registry=registry).set_function(lambda: engine.running)
        Gauge("cllm_tokens_per_forward", "Mean tokens per forward over all finished requests",
              registry=registry).set_function(self._mean_tokens_per_forward)
        self.engine = engine

    def _mean_tokens_per_forward(self) -> float:
        counters = self.engine.counters
        return counters.new_tokens / counters.forward_passes if counters.forward_passes else 0.0

    def finished(self, arrived: float, started: float | None, first_token: float | None, ended: float,
                 new_tokens: int, forward_passes: int) -> None:
        if started is not None:
            self.queue_wait.observe(started - arrived)
        if first_token is not None:
            self.ttft.observe(first_token - arrived)
        self.latency.observe(ended - arrived)
        self.tokens.inc(new_tokens)
        self.forwards.inc(forward_passes)
        if forward_passes:
            self.tokens_per_forward.observe(new_tokens / forward_passes)

    def text(self) -> bytes:
        return generate_latest(self.registry)
