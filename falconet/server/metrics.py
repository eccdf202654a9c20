"""Prometheus metrics of the server, through `prometheus_client`.

    falconet_http_requests_total{endpoint,status}  requests answered, by route and status
    falconet_prompt_tokens_total                   prompt tokens of accepted requests
    falconet_generation_tokens_total               tokens generated (streamed or not)
    falconet_client_disconnects_total              generation requests (OpenAI routes, RAG
                                                   answers) whose client left before the end
    falconet_sequences_running / _waiting          engine.stats(), read at scrape time
    falconet_max_batch / falconet_max_queue        the engine's limits
    falconet_prefix_cache_hit_rate                 prompt tokens found in the prefix cache /
                                                   prompt tokens looked up (tokens, not blocks)
    falconet_prefix_cache_hit_tokens /             the two counts behind it, since the start
      falconet_prefix_cache_query_tokens
    falconet_prefix_cache_blocks                   KV blocks holding a cached prefix (shared
                                                   by running sequences or idle)
    falconet_time_to_first_token_seconds           request arrival -> first generated token
    falconet_inter_token_latency_seconds           gap between tokens of one sequence

Each `Metrics` has its own CollectorRegistry (not prometheus_client's global one), so
several apps in one process (tests, an embedding application) count separately.
Latencies are measured in the server as deltas arrive, so they include the queue wait
and the event loop, which is what a client sees.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The text format `generate_latest` writes (prometheus_client's `choose_encoder` pairs
# the two); newer prometheus_client versions name a later format CONTENT_TYPE_LATEST.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets for the same two histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class EngineStats(Protocol):
    running: int
    queued: int
    max_batch: int
    max_queue: int
    prefix_cached_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float: ...


class Metrics:
    """The server's counters, in one registry. Updated from the event loop; a scrape
    (also on the event loop) reads them between updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, text, labels, registry=self.registry)

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, registry=self.registry)

        self.requests = counter("falconet_http_requests_total",
                                "HTTP requests answered, by endpoint and status.",
                                ("endpoint", "status"))  # fmt: skip
        self.prompt_tokens = counter("falconet_prompt_tokens_total",
                                     "Prompt tokens of accepted generation requests.")  # fmt: skip
        self.generation_tokens = counter("falconet_generation_tokens_total", "Tokens generated.")
        self.client_disconnects = counter(
            "falconet_client_disconnects_total",
            "Generation requests whose client went away before the answer ended.",
        )
        self.running = gauge(
            "falconet_sequences_running", "Sequences in the engine's running batch."
        )
        self.waiting = gauge(
            "falconet_sequences_waiting", "Sequences waiting in the engine's queue."
        )
        self.max_batch = gauge("falconet_max_batch", "Running sequences the engine allows.")
        self.max_queue = gauge("falconet_max_queue", "Waiting sequences the engine allows.")
        self.prefix_hit_rate = gauge(
            "falconet_prefix_cache_hit_rate",
            "Share of looked-up prompt tokens found in the prefix cache (0 before any).",
        )
        self.prefix_hit_tokens = gauge(
            "falconet_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache."
        )
        self.prefix_query_tokens = gauge(
            "falconet_prefix_cache_query_tokens",
            "Prompt tokens of sequences that looked for a cached prefix.",
        )
        self.prefix_blocks = gauge(
            "falconet_prefix_cache_blocks", "KV blocks holding a cached prompt prefix."
        )
        self.ttft = Histogram("falconet_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)  # fmt: skip
        self.itl = Histogram("falconet_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of one sequence.",
                             buckets=ITL_BUCKETS, registry=self.registry)  # fmt: skip

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def add_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def add_generated(self, n: int, seconds_since_last: float | None) -> None:
        """n new tokens of one sequence; the gap since its previous tokens (None for the
        first) is spread evenly over them for the inter-token latency."""
        self.generation_tokens.inc(n)
        if seconds_since_last is not None and n:
            for _ in range(n):
                self.itl.observe(seconds_since_last / n)

    def client_gone(self) -> None:
        self.client_disconnects.inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def exposition(self, stats: EngineStats) -> bytes:
        """The registry in Prometheus' text format, with the engine's gauges as of now."""
        self.running.set(stats.running)
        self.waiting.set(stats.queued)
        self.max_batch.set(stats.max_batch)
        self.max_queue.set(stats.max_queue)
        self.prefix_hit_rate.set(stats.prefix_hit_rate)
        self.prefix_hit_tokens.set(stats.prefix_hit_tokens)
        self.prefix_query_tokens.set(stats.prefix_query_tokens)
        self.prefix_blocks.set(stats.prefix_cached_blocks)
        return generate_latest(self.registry)
