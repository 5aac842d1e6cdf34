"""Soak test for `nano-vllm-onnx serve`: a real server under minutes of mixed load.

Clients loop over a mix of requests: streaming and not, completions and chat, n > 1, stop
strings, logprobs, seeds, shared prompt prefixes, clients that hang up mid-stream, and bad
requests. After a warm-up it measures for --duration seconds and reports p50/p99 TTFT and
latency, output tokens/s, outcomes by status, and the server's RSS over time (from /metrics:
process_resident_memory_bytes).

The KV cache's pages are committed as they are first written, so the warm-up also fills
the cache once (distinct prompts, one token each, until the prefix cache and the running
sequences hold 95% of the KV blocks): after that, memory that still grows is a leak, not the
cache reaching its budget.

The bar (exit status 1 if missed): RSS grows less than 5% over the measured time (the median
of the last minute's samples against the first minute's), no 5xx, and no request lost: every
one ends with a result, the 4xx it asked for, or a 503 to retry.

    python benchmarks/soak.py                        # starts the default model, 10 minutes
    python benchmarks/soak.py --duration 60 --warmup 20 --concurrency 8
    python benchmarks/soak.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from serve_load import add_server_arguments, auth_headers, target_server

TEXT = (Path(__file__).parent / "data" / "apache-2.0.txt").read_text()
RSS_GROWTH_BAR = 0.05
RSS_EVERY_S = 5.0
RSS_WINDOW = 12  # samples: a minute
# Bodies the server must refuse with a 400, whatever else is going on.
BAD = [
    ("/v1/completions", b'{"prompt": "hi", "temperature": -1}'),
    ("/v1/completions", b'{"prompt": "ab\\udfffc"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "alien", "content": "hi"}]}'),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1000000000}'),
    ("/v1/completions", b'{"prompt": "hi",'),
    ("/v1/chat/completions", b'{"messages": []}'),
]


@dataclass
class Stats:
    measuring: bool = False
    outcomes: Counter = field(default_factory=Counter)  # "200 ok", "400 expected", ...
    lost: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    output_tokens: int = 0

    def record(self, outcome: str, detail: str = "") -> None:
        if self.measuring:
            self.outcomes[outcome] += 1
            if outcome.endswith("lost"):  # every 5xx but the 503 to retry is "lost"
                self.lost.append(f"{outcome}: {detail[:300]}")


def prompt_text(rng: random.Random) -> str:
    """A slice of the license: a few shared starts (prefix cache hits) and random ones."""
    start = rng.choice([0, 0, 1000, rng.randrange(len(TEXT) - 3000)])
    return TEXT[start:start + rng.randrange(20, 1200)]


def request(rng: random.Random) -> tuple[str, str, dict, bool]:
    """(kind, path, body, hang up after a few chunks) of a random valid request."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.6
    body: dict = {"max_tokens": rng.randrange(8, 96), "temperature": rng.choice([0, 0.7, 1.0]),
                  "stream": stream}
    if rng.random() < 0.3:
        body["n"] = rng.randrange(2, 4)
    if rng.random() < 0.3:
        body["stop"] = rng.choice([".", ["\n", "the"], " and "])
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(1000)
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt_text(rng)}]
        if rng.random() < 0.3:
            body["logprobs"], body["top_logprobs"] = True, 2
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt_text(rng)
        if rng.random() < 0.3:
            body["logprobs"] = 2
        path = "/v1/completions"
    hang_up = stream and rng.random() < 0.1
    kind = f"{'chat' if chat else 'completion'}{' stream' if stream else ''}"
    return kind, path, body, hang_up


async def run_stream(http: httpx.AsyncClient, path: str, body: dict, hang_up: bool,
                     stats: Stats, start: float) -> None:
    first, finished, usage, chunks = None, set(), None, 0
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return stats.record(_status(response), response.text)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                if len(finished) != body.get("n", 1) or usage is None:
                    return stats.record("200 lost", f"[DONE] before the end: {finished}")
                if stats.measuring:
                    stats.ttft.append(first - start if first else time.perf_counter() - start)
                    stats.latency.append(time.perf_counter() - start)
                    stats.output_tokens += usage["completion_tokens"]
                return stats.record("200 ok")
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return stats.record(f"{chunk['error']['type']} in stream lost", line)
            chunks += 1
            if hang_up and chunks == 3:
                return stats.record("hung up")  # leaving the block closes the connection
            for choice in chunk["choices"]:
                if first is None and (choice.get("text") or choice.get("delta", {}).get(
                        "content")):
                    first = time.perf_counter()
                if choice["finish_reason"]:
                    finished.add(choice["index"])
            usage = chunk.get("usage") or usage
    stats.record("200 lost", "the stream ended without [DONE]")


async def run_full(http: httpx.AsyncClient, path: str, body: dict, stats: Stats,
                   start: float) -> None:
    response = await http.post(path, json=body)
    if response.status_code != 200:
        return stats.record(_status(response), response.text)
    result = response.json()
    if len(result["choices"]) != body.get("n", 1) or not all(
            c["finish_reason"] in ("stop", "length") for c in result["choices"]):
        return stats.record("200 lost", response.text)
    if stats.measuring:
        elapsed = time.perf_counter() - start
        stats.ttft.append(elapsed)  # the whole answer is its first token
        stats.latency.append(elapsed)
        stats.output_tokens += result["usage"]["completion_tokens"]
    stats.record("200 ok")


def _status(response: httpx.Response) -> str:
    if response.status_code == 503 and "Retry-After" in response.headers:
        return "503 retry"  # the overload refusal asks to come back: nothing is lost
    return f"{response.status_code} lost"


async def client(http: httpx.AsyncClient, rng: random.Random, stats: Stats,
                 stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            if rng.random() < 0.08:
                path, raw = rng.choice(BAD)
                response = await http.post(path, content=raw,
                                           headers={"Content-Type": "application/json"})
                stats.record("400 expected" if response.status_code == 400
                             else f"{response.status_code} to a bad request lost",
                             response.text)
                continue
            kind, path, body, hang_up = request(rng)
            if body["stream"]:
                await run_stream(http, path, body, hang_up, stats, start)
            else:
                await run_full(http, path, body, stats, start)
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
            stats.record("exception lost", repr(e))


async def metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """Each sample's value by name (this server has one model: labels are left out), and the
    KV cache's number of blocks."""
    values = {}
    for family in text_string_to_metric_families((await http.get("/metrics")).text):
        for sample in family.samples:
            values[sample.name] = sample.value
            if sample.name == "vllm:cache_config_info":
                values["num_blocks"] = float(sample.labels["num_gpu_blocks"])
    return values


def cache_filled(m: dict[str, float]) -> float:
    """The fraction of KV blocks that hold something (prefix cache or running sequences)."""
    return m["nanovllm_prefix_cache_blocks"] / m["num_blocks"] + m["vllm:kv_cache_usage_perc"]


async def fill_cache(http: httpx.AsyncClient, rng: random.Random, deadline: float) -> None:
    """Distinct prompts (a random number first: every block is new), one token each, until
    95% of the KV blocks have been written once."""
    while time.perf_counter() < deadline and cache_filled(await metrics(http)) < 0.95:
        start = rng.randrange(len(TEXT) - 2000)
        await http.post("/v1/completions", json={
            "prompt": f"{rng.random()} {TEXT[start:start + 2000]}", "max_tokens": 1})


async def soak(url: str, headers: dict[str, str], concurrency: int, warmup: float,
               max_warmup: float, duration: float, seed: int
               ) -> tuple[Stats, list[tuple[float, float]], dict, float]:
    stats = Stats()
    samples: list[tuple[float, float]] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=limits) as http:
        begin = time.perf_counter()
        fill_deadline = begin + max_warmup
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client(http, random.Random(seed + i), stats, stop))
                 for i in range(concurrency)]
        await asyncio.gather(*(fill_cache(http, random.Random(seed - i - 1), fill_deadline)
                               for i in range(2)))
        await asyncio.sleep(max(0.0, begin + warmup - time.perf_counter()))
        warmed_up = time.perf_counter() - begin
        print(f"  warm-up {warmed_up:.0f} s: KV cache {cache_filled(await metrics(http)):.0%} "
              "filled", file=sys.stderr, flush=True)
        stats.measuring = True
        measured_from = time.perf_counter()
        end = measured_from + duration
        while time.perf_counter() < end:
            m = await metrics(http)
            samples.append((time.perf_counter() - measured_from,
                            m["process_resident_memory_bytes"]))
            print(f"  {samples[-1][0]:6.0f} s  RSS {samples[-1][1] / 2**20:7.1f} MiB  "
                  f"{sum(stats.outcomes.values())} requests  KV {cache_filled(m):.0%}",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(min(RSS_EVERY_S, max(0.0, end - time.perf_counter())))
        stop.set()
        await asyncio.gather(*tasks)  # requests under way finish, and count
        stats.measuring = False
        idle = await wait_idle(http)
        samples.append((time.perf_counter() - measured_from,
                        (await metrics(http))["process_resident_memory_bytes"]))
    return stats, samples, idle, warmed_up


async def wait_idle(http: httpx.AsyncClient, timeout: float = 60.0) -> dict[str, float]:
    """The engine's gauges once nothing runs or waits (or after timeout)."""
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting",
             "vllm:kv_cache_usage_perc")
    deadline = time.perf_counter() + timeout
    while True:
        m = await metrics(http)
        gauges = {name: m[name] for name in names}
        if not any(gauges.values()) or time.perf_counter() > deadline:
            return gauges
        await asyncio.sleep(0.5)


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p99 = np.percentile(np.array(values) * 1000, [50, 99])
    return f"p50 {p50:8.1f} ms  p99 {p99:8.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds before measuring, at least (the KV cache fills first)")
    parser.add_argument("--max-warmup", type=float, default=600.0,
                        help="seconds to fill the KV cache at most")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds measured")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    headers = auth_headers(args)

    with target_server(args, headers) as url:
        stats, samples, idle, warmed_up = asyncio.run(soak(
            url, headers, args.concurrency, args.warmup, args.max_warmup, args.duration,
            args.seed))
    elapsed = samples[-1][0]
    rss = [value for _, value in samples[:-1]]  # the last: after the load
    growth = np.median(rss[-RSS_WINDOW:]) / np.median(rss[:RSS_WINDOW]) - 1
    total = sum(stats.outcomes.values())
    print(f"soak: {args.concurrency} clients, {warmed_up:.0f} s warm-up, {elapsed:.0f} s "
          f"measured, {total} requests")
    print(f"  TTFT     {_ms(stats.ttft)}")
    print(f"  latency  {_ms(stats.latency)}")
    print(f"  output   {stats.output_tokens / elapsed:.1f} tok/s "
          f"({stats.output_tokens} tokens, completed requests only)")
    for outcome, count in sorted(stats.outcomes.items()):
        print(f"  {outcome:<28} {count}")
    print("  RSS MiB every minute: " + " ".join(f"{value / 2**20:.0f}"
                                                for value in rss[::RSS_WINDOW]))
    print(f"  RSS growth {growth:+.2%} (median of the last minute against the first); "
          f"min {min(rss) / 2**20:.0f} MiB, max {max(rss) / 2**20:.0f} MiB, after the load "
          f"{samples[-1][1] / 2**20:.0f} MiB")
    print(f"  after: {idle}")
    bars = {
        f"RSS grows less than {RSS_GROWTH_BAR:.0%}": growth < RSS_GROWTH_BAR,
        "no 5xx and no request lost": not stats.lost,
        "nothing left running": not any(idle.values()),
    }
    for bar, ok in bars.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {bar}")
    for line in stats.lost[:20]:
        print(f"    {line}")
    sys.exit(0 if all(bars.values()) else 1)


if __name__ == "__main__":
    main()
