"""Prometheus metrics in the text exposition format, written by hand (no client library)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass

from nanovllm_onnx.engine.speculative import SpecDecodeStats

PREFIX = "nanovllm_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _number(value: float) -> str:
    return repr(float(value))  # Python's float repr (3.0, 0.25, 1e-05) is valid Prometheus text


class Counter:
    def __init__(self, name: str, help: str, label: str | None = None) -> None:
        self.name, self.help, self.label = PREFIX + name, help, label
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()  # updated from the engine thread and the event loop

    def inc(self, amount: float = 1.0, label_value: str = "") -> None:
        with self._lock:
            self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name}_total {self.help}", f"# TYPE {self.name}_total counter"]
        with self._lock:
            values = dict(self._values)
        if not values and not self.label:
            values = {"": 0.0}  # a labelled counter has no sample until a label value is seen
        for label_value, value in sorted(values.items()):
            labels = f'{{{self.label}="{label_value}"}}' if self.label else ""
            lines.append(f"{self.name}_total{labels} {_number(value)}")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = PREFIX + name, help, buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect_left(self.buckets, value)] += 1
            self._sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {cumulative}"]
        return lines


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after its latest iteration, published by the engine thread."""

    running: int = 0  # sequences: each of a request's n samples counts once, as in vLLM
    waiting: int = 0
    kv_cache_usage: float = 0.0  # blocks held by sequences; the prefix cache is reclaimable
    prefix_cache_blocks: int = 0
    prefix_cache_hits: int = 0  # blocks
    prefix_cache_queries: int = 0
    preemptions: int = 0
    steps: int = 0
    spec_decode: SpecDecodeStats | None = None  # None: speculative decoding is off


def _gauge(name: str, help: str, value: float) -> list[str]:
    name = PREFIX + name
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_number(value)}"]


def _cumulative(name: str, help: str, value: float) -> list[str]:
    """A counter kept by the engine itself, read at scrape time."""
    name = PREFIX + name
    return [f"# HELP {name}_total {help}", f"# TYPE {name}_total counter",
            f"{name}_total {_number(value)}"]


class ServerMetrics:
    def __init__(self) -> None:
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.")
        self.requests_finished = Counter(
            "requests_finished", "Requests ended, by reason (stop, length, abort, error).",
            label="reason")
        self.batch_size = Histogram(
            "batch_size", "Sequences that sampled a token in one engine step.", BATCH_BUCKETS)
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token.",
                              LATENCY_BUCKETS)
        self.tpot = Histogram("time_per_output_token_seconds",
                              "Time per output token after the first.", LATENCY_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Request latency.",
                             LATENCY_BUCKETS)

    def render(self, stats: EngineStats) -> str:
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries \
            if stats.prefix_cache_queries else 0.0
        lines = [
            *_gauge("num_requests_running", "Sequences in the running batch.", stats.running),
            *_gauge("num_requests_waiting", "Sequences waiting to run.", stats.waiting),
            *_gauge("kv_cache_usage_perc",
                    "Fraction of KV cache blocks held by sequences (0 to 1).",
                    stats.kv_cache_usage),
            *_gauge("prefix_cache_blocks", "KV blocks held by the prefix cache.",
                    stats.prefix_cache_blocks),
            *_gauge("prefix_cache_hit_rate", "Prompt blocks found in the prefix cache, "
                    "as a fraction of those looked up.", hit_rate),
            *_cumulative("prefix_cache_queries", "Prompt blocks looked up in the prefix cache.",
                         stats.prefix_cache_queries),
            *_cumulative("prefix_cache_hits", "Prompt blocks found in the prefix cache.",
                         stats.prefix_cache_hits),
            *_cumulative("num_preemptions", "Sequences preempted for KV memory.",
                         stats.preemptions),
            *_cumulative("engine_steps", "Engine steps (batched model calls).", stats.steps),
        ]
        spec = stats.spec_decode
        if spec is not None:  # vLLM's spec_decode counters, and what they give
            lines += [
                *_cumulative("spec_decode_num_drafts", "Verified proposals (one sequence, one "
                             "step).", spec.num_drafts),
                *_cumulative("spec_decode_num_draft_tokens", "Proposed tokens verified.",
                             spec.num_draft_tokens),
                *_cumulative("spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                             spec.num_accepted_tokens),
                *_gauge("spec_decode_acceptance_rate", "Accepted / proposed tokens so far.",
                        spec.acceptance_rate),
                *_gauge("spec_decode_mean_accepted_length", "Tokens per verification so far "
                        "(accepted drafts + 1).", spec.mean_accepted_length),
            ]
        for metric in (self.prompt_tokens, self.generation_tokens, self.requests_finished,
                       self.batch_size, self.ttft, self.tpot, self.e2e):
            lines += metric.render()
        return "\n".join(lines) + "\n"
