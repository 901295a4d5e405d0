"""Prometheus metrics of one server (its own registry, so several apps in one process do not clash)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mu.serve.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics(EngineStats):
    def __init__(self, queue_length: Callable[[], float], running: Callable[[], float]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mu_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mu_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("mu_generation_tokens", "tokens generated (EOS and cancelled requests included)", registry=r)
        self.queue = Gauge("mu_queue_length", "requests waiting for a slot in the decode batch", registry=r)
        self.queue.set_function(queue_length)
        self.running = Gauge("mu_running_rows", "rows (choices) in the decode batch now", registry=r)
        self.running.set_function(running)
        self.batch_size = Histogram("mu_batch_size", "rows in each decode step", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("mu_decode_step_seconds", "time of one decode step of the whole batch",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_seconds = Histogram("mu_prefill_seconds", "time of one prefill (the prompts admitted together)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_batch = Histogram("mu_prefill_batch_size", "prompts prefilled together", buckets=BATCH_BUCKETS,
                                       registry=r)
        self.ttft = Histogram("mu_time_to_first_token_seconds", "request received by the engine -> first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("mu_request_latency_seconds", "generation request latency, end to end, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)

    # EngineStats (called from the engine's thread; prometheus_client is thread-safe)
    def step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_seconds.observe(seconds)

    def prefill(self, prompts: int, seconds: float) -> None:
        self.prefill_batch.observe(prompts)
        self.prefill_seconds.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, count: int) -> None:
        self.generation_tokens.inc(count)
