"""Load test for `nano-vllm-onnx serve`: N concurrent streaming clients on loopback.

For each concurrency level, clients send streaming completions (greedy unless --temperature,
ignore_eos, so every request generates exactly --max-tokens) until --requests are done or
--duration passes, then it reports requests/s, output tokens/s, and TTFT and TPOT percentiles.

    python benchmarks/serve_load.py --concurrency 1 8 32          # starts the default model
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 8

With --offline, the same requests also run through the offline engine (`LLM.generate` of all
of them, as throughput.py's B does), round after round with the served ones, and each round
prints the served share of the offline rate. `client CPU` is the share of the machine's
THREADS cores this client process used during the level: cores the server could not (offline
has no client). vLLM's `bench serve` load (random 256-token
prompts, 128 tokens out, 64 requests, 32 at a time; it sends no temperature, so the server
samples at 1.0 over the whole vocabulary):

    python benchmarks/serve_load.py --server-args '--weights int8' --random-prompt-len 256 \
        --max-tokens 128 --requests 64 --concurrency 32 --temperature 1 --offline --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
from workloads import THREADS, random_prompts

START_TIMEOUT_S = 600  # the first run may convert the default model


@dataclass
class Results:
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0

    @property
    def completed(self) -> int:
        return len(self.ttft)


async def one_request(http: httpx.AsyncClient, body: dict, results: Results) -> None:
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk["choices"] and first is None:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, RuntimeError) as e:
        results.errors += 1
        print(f"  request failed: {e}", file=sys.stderr)
        return
    end = time.perf_counter()
    if first is None:
        results.errors += 1
        return
    results.ttft.append(first - start)
    if tokens > 1:
        results.tpot.append((end - first) / (tokens - 1))
    results.output_tokens += tokens


async def run_level(url: str, headers: dict[str, str], concurrency: int, num_requests: int,
                    duration: float, max_tokens: int, prompt: str | list[list[int]],
                    temperature: float = 0.0) -> tuple[Results, float]:
    """Requests with the text `prompt` (a distinct number before it in each), or request i
    with the token ids prompt[i]."""
    results = Results()
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=limits) as http:
        start = time.perf_counter()
        deadline = start + duration

        async def client() -> None:
            nonlocal issued
            while issued < num_requests and time.perf_counter() < deadline:
                # A distinct start per request, so the prefix cache does not skip the prompt.
                text = isinstance(prompt, str)
                body = {"prompt": f"{issued}. {prompt}" if text else prompt[issued],
                        "max_tokens": max_tokens,
                        "temperature": temperature, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                issued += 1
                await one_request(http, body, results)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return results, time.perf_counter() - start


# Runs in its own process, as the server does (arguments: model, weights, prompts JSON file,
# max_tokens, more LLM arguments as JSON, temperature); prints the output tokens/s of
# LLM.generate over all the prompts.
OFFLINE = """
import json, sys, time
from nanovllm_onnx import LLM, SamplingParams
model, weights, prompts, max_tokens = sys.argv[1] or None, sys.argv[2] or None, \
    json.load(open(sys.argv[3])), int(sys.argv[4])
llm = LLM(model, weights=weights, **json.loads(sys.argv[5]))
params = SamplingParams(temperature=float(sys.argv[6]), max_tokens=max_tokens, ignore_eos=True)
# 8 tokens fill no cache block: the measured prompts get no prefix hits from the warm-up.
llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
start = time.perf_counter()
outputs = llm.generate(prompts, params, use_tqdm=False)
tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
print(tokens / (time.perf_counter() - start))
"""


def offline_rate(model: str | None, weights: str | None, prompts: list[list[int]],
                 max_tokens: int, engine_args: str, temperature: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(prompts, f)
        f.flush()
        done = subprocess.run([sys.executable, "-c", OFFLINE, model or "", weights or "", f.name,
                               str(max_tokens), engine_args, str(temperature)],
                              capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the offline run failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p95, p99 = np.percentile(np.array(values) * 1000, [50, 95, 99])
    return f"{p50:7.1f} {p95:7.1f} {p99:7.1f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_server(model: str | None, extra: list[str], headers: dict[str, str]
                   ) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nanovllm_onnx.cli", "serve", *([model] if model else []),
           "--port", str(port), "--log-level", "warning", *extra]
    print("starting:", shlex.join(cmd), file=sys.stderr)
    process = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with code {process.returncode}")
            try:
                if httpx.get(f"{url}/health", headers=headers, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in time")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default: 4 per client, at least 8)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds per level at most; requests running then still finish")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="of every request, served and --offline (default 0: greedy; "
                             "vLLM's bench client leaves the server's 1.0)")
    parser.add_argument("--prompt", default="Write a short story about a robot who learns "
                                            "to paint, in the style of a fairy tale.")
    parser.add_argument("--random-prompt-len", type=int, default=None,
                        help="prompts of this many random token ids instead of --prompt")
    parser.add_argument("--offline", action="store_true",
                        help="also run the requests offline (needs --random-prompt-len and a "
                             "started server: --model, --weights)")
    parser.add_argument("--weights", default=None, help="for the started server and --offline")
    parser.add_argument("--offline-args", default="{}",
                        help="more LLM(...) arguments for --offline, as JSON, e.g. "
                             "'{\"intra_op_spinning\": false}' (as `serve` runs)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every level this often")
    parser.add_argument("--seed", type=int, default=0,
                        help="of the random prompts: a --url server that ran a seed's prompts "
                             "before serves them again from its prefix cache")
    args = parser.parse_args()
    headers = auth_headers(args)
    if args.offline and (args.random_prompt_len is None or args.url is not None):
        parser.error("--offline needs --random-prompt-len and a started server (no --url)")
    if args.weights:
        args.server_args += f" --weights {args.weights}"

    with target_server(args, headers) as url:
        # Warm up (first-call allocations, caches) outside the measurement.
        asyncio.run(run_level(url, headers, 1, 1, args.duration, 8, args.prompt))
        print(f"{'clients':>7} {'done':>5} {'errors':>6} {'req/s':>7} {'out tok/s':>9}   "
              f"{'TTFT ms p50     p95     p99':>27}   {'TPOT ms p50     p95     p99':>27}"
              f"  client CPU{'   offline tok/s  served/offline' if args.offline else ''}")
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                num_requests = args.requests or max(8, 4 * concurrency)
                prompt: str | list[list[int]] = args.prompt
                if args.random_prompt_len is not None:  # fresh ids each round: no prefix hits
                    prompt = random_prompts(num_requests, args.random_prompt_len,
                                            seed=args.seed + round_ * 1000 + concurrency)
                offline = ""
                if args.offline:
                    rate = offline_rate(args.model, args.weights, prompt, args.max_tokens,
                                        args.offline_args, args.temperature)
                cpu = time.process_time()
                results, elapsed = asyncio.run(run_level(url, headers, concurrency,
                                                         num_requests, args.duration,
                                                         args.max_tokens, prompt,
                                                         args.temperature))
                client_cpu = (time.process_time() - cpu) / (THREADS * elapsed)
                served = results.output_tokens / elapsed
                if args.offline:
                    offline = f"   {rate:13.1f}  {served / rate:15.2f}"
                print(f"{concurrency:7d} {results.completed:5d} {results.errors:6d} "
                      f"{results.completed / elapsed:7.2f} {served:9.1f}   "
                      f"{_ms(results.ttft):>27}   {_ms(results.tpot):>27}  {client_cpu:10.0%}"
                      f"{offline}", flush=True)


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url.rstrip("/")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick the server a load script drives (shared with soak.py)."""
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default=None, help="model for the started server")
    parser.add_argument("--server-args", default="",
                        help="more arguments for the started server, e.g. '--max-num-seqs 64'")
    parser.add_argument("--api-key", default=None)


def auth_headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def target_server(args: argparse.Namespace, headers: dict[str, str]
                  ) -> AbstractContextManager[str]:
    """--url as given, or a server started for the run (stopped after it)."""
    if args.url is not None:
        return _given(args.url)
    return started_server(args.model, shlex.split(args.server_args), headers)


if __name__ == "__main__":
    main()
