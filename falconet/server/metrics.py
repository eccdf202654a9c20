"""Prometheus metrics of the server, written in the text exposition format by hand (a
few counters and two histograms do not justify a dependency).

    falconet_http_requests_total{endpoint,status}  requests answered, by route and status
    falconet_prompt_tokens_total                   prompt tokens of accepted requests
    falconet_generation_tokens_total               tokens generated (streamed or not)
    falconet_client_disconnects_total              requests cancelled because the client left
    falconet_sequences_running / _waiting          engine.stats(), read at scrape time
    falconet_time_to_first_token_seconds           request arrival -> first generated token
    falconet_inter_token_latency_seconds           gap between tokens of one sequence

Latencies are measured in the server as deltas arrive, so they include the queue wait
and the event loop, which is what a client sees.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets for the same two histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for le, n in zip((*map(_num, self.buckets), "+Inf"), self.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return [*out, f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]


def _num(x: float) -> str:
    return repr(float(x))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The server's counters. Updated from the event loop and read by scrapes; a lock
    keeps a scrape from seeing a histogram half updated."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.client_disconnects = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def add_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def add_generated(self, n: int, seconds_since_last: float | None) -> None:
        """n new tokens of one sequence; the gap since its previous tokens (None for the
        first) is spread evenly over them for the inter-token latency."""
        with self._lock:
            self.generation_tokens += n
            if seconds_since_last is not None and n:
                for _ in range(n):
                    self.itl.observe(seconds_since_last / n)

    def client_gone(self) -> None:
        with self._lock:
            self.client_disconnects += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def render(self, running: int, waiting: int, max_batch: int, max_queue: int) -> str:
        with self._lock:
            lines = [
                "# HELP falconet_http_requests_total HTTP requests answered, by endpoint and status.",
                "# TYPE falconet_http_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'falconet_http_requests_total{{endpoint="{_label(endpoint)}",'
                             f'status="{status}"}} {n}')  # fmt: skip
            for name, value, kind, text in (
                ("falconet_prompt_tokens_total", self.prompt_tokens, "counter",
                 "Prompt tokens of accepted generation requests."),
                ("falconet_generation_tokens_total", self.generation_tokens, "counter",
                 "Tokens generated."),
                ("falconet_client_disconnects_total", self.client_disconnects, "counter",
                 "Requests whose sequences were cancelled because the client went away."),
                ("falconet_sequences_running", running, "gauge",
                 "Sequences in the engine's running batch."),
                ("falconet_sequences_waiting", waiting, "gauge",
                 "Sequences waiting in the engine's queue."),
                ("falconet_max_batch", max_batch, "gauge", "Running sequences the engine allows."),
                ("falconet_max_queue", max_queue, "gauge", "Waiting sequences the engine allows."),
            ):  # fmt: skip
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for name, hist, text in (
                ("falconet_time_to_first_token_seconds", self.ttft,
                 "Seconds from a request's arrival to its first generated token."),
                ("falconet_inter_token_latency_seconds", self.itl,
                 "Seconds between consecutive tokens of one sequence."),
            ):  # fmt: skip
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
