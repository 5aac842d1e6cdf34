"""Prometheus metrics (prometheus_client), named and meant as vLLM's where vLLM has them, so
dashboards and alerts written for vLLM work unchanged; the engine's own carry `nanovllm_`.

Adding one is a line in ServerMetrics.__init__: `self.x = self.counter("vllm:x", "What it
counts.")` (or gauge / histogram), then `metrics.x.inc()` where it happens. Every metric carries
vLLM's labels, model_name and engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

# vLLM's buckets for each histogram of the same name.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                         2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LABELS = ("model_name", "engine")


class ServerMetrics:
    """The server's metrics, in a registry of their own (one per server: tests make several)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, ...: as vLLM's /metrics.
        ProcessCollector(registry=self.registry)
        self._labels = {"model_name": model_name, "engine": "0"}
        # The engine's state after its latest iteration (set by the engine thread).
        self.running = self.gauge("vllm:num_requests_running",
                                  "Sequences in the running batch (each of n samples counts).")
        self.waiting = self.gauge("vllm:num_requests_waiting", "Sequences waiting to run.")
        self.kv_cache_usage = self.gauge(
            "vllm:kv_cache_usage_perc",
            "KV cache usage: 1 means 100 percent (blocks held by sequences; the prefix cache "
            "is reclaimable).")
        self.prefix_cache_queries = self.counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = self.counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = self.counter("vllm:num_preemptions",
                                        "Sequences preempted for KV memory.")
        self.prompt_tokens = self.counter("vllm:prompt_tokens", "Prompt tokens admitted.")
        self.generation_tokens = self.counter("vllm:generation_tokens", "Tokens generated.")
        self.requests_finished = self.counter(
            "vllm:request_success", "Requests ended, by reason (stop, length, abort, error).",
            ["finished_reason"])
        self.ttft = self.histogram("vllm:time_to_first_token_seconds",
                                   "Time to first token.", TTFT_BUCKETS)
        self.inter_token = self.histogram(
            "vllm:inter_token_latency_seconds", "Time between a request's successive tokens.",
            TOKEN_LATENCY_BUCKETS)
        self.time_per_output_token = self.histogram(
            "vllm:request_time_per_output_token_seconds",
            "A request's mean time per output token after the first.", TOKEN_LATENCY_BUCKETS)
        self.e2e = self.histogram("vllm:e2e_request_latency_seconds",
                                  "Request latency, from arrival to the end.",
                                  REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = self.histogram(
            "vllm:request_prompt_tokens", "Prompt tokens of each request.", TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = self.histogram(
            "vllm:request_generation_tokens", "Tokens generated for each request.",
            TOKEN_COUNT_BUCKETS)
        # The engine's own.
        self.batch_size = self.histogram(
            "nanovllm_batch_size", "Sequences that sampled a token in one engine step.",
            BATCH_BUCKETS)
        self.steps = self.counter("nanovllm_engine_steps", "Engine steps (batched model calls).")
        self.prefix_cache_blocks = self.gauge("nanovllm_prefix_cache_blocks",
                                              "KV blocks held by the prefix cache.")
        # Speculative decoding (zero without it); vLLM's counters, and what they give.
        self.spec_decode_num_drafts = self.counter(
            "vllm:spec_decode_num_drafts", "Verified proposals (one sequence, one step).")
        self.spec_decode_num_draft_tokens = self.counter(
            "vllm:spec_decode_num_draft_tokens", "Proposed tokens verified.")
        self.spec_decode_num_accepted_tokens = self.counter(
            "vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted.")
        self.spec_decode_acceptance_rate = self.gauge(
            "nanovllm_spec_decode_acceptance_rate", "Accepted / proposed tokens so far.")
        self.spec_decode_mean_accepted_length = self.gauge(
            "nanovllm_spec_decode_mean_accepted_length",
            "Tokens per verification so far (accepted proposals + 1).")
        self.cache_config = Info("vllm:cache_config", "The KV cache's configuration.",
                                 registry=self.registry)  # set once, by the engine

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """A counter; `labels` beyond vLLM's two are given at .labels(...) by the caller."""
        metric = Counter(name, documentation, [*LABELS, *labels], registry=self.registry)
        return metric if labels else metric.labels(**self._labels)

    def gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, LABELS, registry=self.registry).labels(**self._labels)

    def histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, documentation, LABELS, buckets=buckets,
                         registry=self.registry).labels(**self._labels)

    def finished(self, reason: str) -> None:
        self.requests_finished.labels(finished_reason=reason, **self._labels).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
