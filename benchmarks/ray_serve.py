"""Ray Serve on this machine: workload B through 2 replicas x 1 thread, 1 replica x 2 threads
and the plain server (output tok/s, TTFT, and the latency Ray adds to a 1-token request); then a
prefix-heavy workload through 2 replicas with prefix-affinity routing vs Ray Serve's default
router (prefix-cache hit rate, TTFT).

    python benchmarks/ray_serve.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import started_server  # noqa: E402
from workloads import ID_MAX, workload_b  # noqa: E402

ENGINE = {"kv_cache_memory_gib": 1.0, "max_model_len": 1024}


async def one(http: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(TTFT, output tokens) of one streaming completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                if first is None and '"text"' in line:
                    first = time.perf_counter()
                if m := re.search(r'"completion_tokens":\s*(\d+)', line):
                    tokens = int(m.group(1))
    return (first or time.perf_counter()) - start, tokens


async def load(url: str, prompts: list[list[int]], max_tokens: list[int], concurrency: int
               ) -> dict[str, float]:
    ttfts, tokens = [], 0
    queue = list(zip(prompts, max_tokens))
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        start = time.perf_counter()

        async def client() -> None:
            nonlocal tokens
            while queue:
                ttft, n = await one(http, *queue.pop(0))
                ttfts.append(ttft)
                tokens += n

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"tok/s": tokens / elapsed, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p95_ms": 1000 * sorted(ttfts)[int(0.95 * (len(ttfts) - 1))]}


def tiny_latency(url: str, n: int = 20) -> float:
    """Median ms of a 1-token completion of a 4-token prompt, one at a time."""
    times = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n):
            start = time.perf_counter()
            r = http.post("/v1/completions", json={"prompt": [10 + i, 11, 12, 13],
                                                    "max_tokens": 1, "temperature": 0})
            assert r.status_code == 200, r.text
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def prefix_counters(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    hits, queries = (float(re.search(rf"^vllm:prefix_cache_{name}_total{{[^}}]*}} (\S+)", text,
                                     re.M).group(1)) for name in ("hits", "queries"))
    return hits, queries


def prefix_workload() -> tuple[list[list[int]], list[int]]:
    """48 requests: one of 4 system prompts of 480 ids, then a 16-id question; 16 tokens out."""
    rng = random.Random(7)
    systems = [[rng.randint(0, ID_MAX) for _ in range(480)] for _ in range(4)]
    prompts = [systems[i % 4] + [rng.randint(0, ID_MAX) for _ in range(16)] for i in range(48)]
    return prompts, [16] * 48


def measure(url: str, label: str, num_prompts: int) -> None:
    b = workload_b()
    asyncio.run(load(url, b.prompts[:2], [4, 4], 2))  # warm-up
    result = asyncio.run(load(url, b.prompts[:num_prompts], b.max_tokens[:num_prompts],
                              num_prompts))
    result["tiny_ms"] = tiny_latency(url)
    print(f"{label:28s} B: {result['tok/s']:6.1f} tok/s  TTFT p50 {result['ttft_p50_ms']:6.0f}"
          f" ms  |  1-token request {result['tiny_ms']:6.1f} ms", flush=True)


def measure_prefix(url: str, label: str) -> None:
    prompts, max_tokens = prefix_workload()
    hits0, queries0 = prefix_counters(url)
    result = asyncio.run(load(url, prompts, max_tokens, 4))
    hits, queries = prefix_counters(url)
    rate = (hits - hits0) / max(queries - queries0, 1)
    print(f"{label:28s} prefix-heavy: hit rate {rate:5.1%}  TTFT p50 "
          f"{result['ttft_p50_ms']:6.0f} ms  p95 {result['ttft_p95_ms']:6.0f} ms  "
          f"{result['tok/s']:6.1f} tok/s", flush=True)


@contextmanager
def ray_app(port: int, replicas: int, threads: int, affinity: bool = True) -> Iterator[str]:
    from ray import serve

    from nanovllm_onnx.ray import build_app

    serve.run(build_app(None, {**ENGINE, "intra_op_num_threads": threads},
                        num_replicas=replicas, prefix_affinity=affinity),
              name="bench", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=32,
                        help="B's first N prompts (all 32: workload B)")
    args = parser.parse_args()
    import ray
    from ray import serve

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    plain_args = ["--intra-op-num-threads", "2", "--kv-cache-memory-gib", "1",
                  "--max-model-len", "1024"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for _ in range(args.rounds):
        with started_server(None, plain_args, {}) as url:
            measure(url, "plain server, 2 threads", args.prompts)
            measure_prefix(url, "plain server, 2 threads")
        with ray_app(port, 1, 2) as url:
            measure(url, "Ray Serve 1 replica x 2 thr", args.prompts)
        with ray_app(port, 2, 1) as url:
            measure(url, "Ray Serve 2 replicas x 1 thr", args.prompts)
            measure_prefix(url, "2x1, prefix affinity")
        with ray_app(port, 2, 1, affinity=False) as url:
            measure_prefix(url, "2x1, Ray's default router")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
