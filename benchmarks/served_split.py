"""Where the served run's time goes (issue 14): serve_compare.py's requests (64 prompts of 256
random ids, 128 tokens each at temperature 1, at most 32 at a time) through the offline engine,
step by step.

    python benchmarks/served_split.py --model ~/.cache/nano-vllm-onnx/peers/hf/llama-1b
    python benchmarks/served_split.py --model ... --profile    # and the kernels' split
    python benchmarks/served_split.py --model ... --kv-cache-dtype int8
    python benchmarks/served_split.py --model ... --max-num-batched-tokens 512   # step budget

Each engine step is timed and sorted by what it ran: a prompt step (any prompt tokens, with
whatever decodes share it) or an N-row decode step; full decode steps (as many rows as the
server's concurrency) are split into the model call and the sampler. With --profile ONNX
Runtime's profiler times every node too (a few percent slower): the kernel time of the full
decode steps and of the prompt steps by op, BlockLinear by matrix (decode_split.py's kinds).
"""

from __future__ import annotations

import argparse
import bisect
import json
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from decode_split import matrix_kinds
from op_profile import profiling_sessions
from serve_compare import CONCURRENCY, CONTEXT, OUTPUT_LEN, PROMPT_LEN, REQUESTS
from workloads import THREADS, log, random_prompts

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.config import EngineConfig
from nanovllm_onnx.convert.converter import resolve_model


def timed(parts: dict[str, float], name: str, f: Callable) -> Callable:
    """f, adding each call's wall seconds to parts[name]."""
    def call(*args: object) -> object:
        start = time.perf_counter()
        try:
            return f(*args)
        finally:
            parts[name] += time.perf_counter() - start
    return call


def kernel_split(events: list[dict], kinds: dict[str, tuple[str, int]],
                 step_kinds: list[str]) -> dict[str, dict[str, float]]:
    """Kernel seconds by step kind and op (BlockLinear by matrix), from the profile's events:
    one model run per step, in order."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"),
                  key=lambda e: e["ts"])
    assert len(runs) == len(step_kinds), (len(runs), len(step_kinds))
    starts = [r["ts"] for r in runs]
    split: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = f"BlockLinear {kinds[node][0]}" if node in kinds else e["args"]["op_name"]
        run = bisect.bisect_right(starts, e["ts"]) - 1
        split[step_kinds[run]][op] += e["dur"] / 1e6
    return split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--profile", action="store_true", help="the kernels' split too")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int,
                    default=EngineConfig.max_num_batched_tokens, help="the engine's step budget")
    args = ap.parse_args()
    folder = resolve_model(args.model, args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        with profiling_sessions(str(Path(tmp) / "ort")) if args.profile else nullcontext():
            llm = LLM(str(folder), max_model_len=CONTEXT, max_num_seqs=CONCURRENCY,
                      intra_op_num_threads=THREADS, kv_cache_dtype=args.kv_cache_dtype,
                      max_num_batched_tokens=args.max_num_batched_tokens)
        engine = llm.llm_engine
        params = SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True)  # as the server samples
        # Each step's model call: -(its prompt tokens) where it has any, else its decode rows.
        rows: list[int] = []
        schedule = engine.scheduler.schedule

        def scheduled() -> object:
            step, copies = schedule()
            prompt = sum(n for n in step.num_tokens if n > 1)
            rows.append(-prompt if prompt else len(step.num_tokens))
            return step, copies

        engine.scheduler.schedule = scheduled
        llm.generate(random_prompts(4, PROMPT_LEN, seed=9), params, use_tqdm=False)  # warm-up
        skipped = len(rows)  # the warm-up's steps (in the profile too)
        parts: dict[str, float] = defaultdict(float)
        engine.runner.run = timed(parts, "model call", engine.runner.run)
        engine.sampler = timed(parts, "sampler", engine.sampler)
        for i, prompt in enumerate(random_prompts(REQUESTS, PROMPT_LEN, seed=1)):
            engine.add_request(str(i), prompt, params)
        steps: list[tuple[str, float]] = []
        full: dict[str, float] = defaultdict(float)  # the full decode steps' parts
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            parts.clear()
            t = time.perf_counter()
            engine.step()
            wall = time.perf_counter() - t
            n = rows[-1]
            kind = "prompt" if n < 0 else f"decode {n}"
            steps.append((kind, wall))
            if n == CONCURRENCY:
                for name, s in parts.items():
                    full[name] += s
        total = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        events = (json.loads(Path(engine.runner.session.end_profiling()).read_text())
                  if args.profile else [])
    log(f"{REQUESTS * OUTPUT_LEN / total:.1f} output tok/s ({total:.1f} s, {len(steps)} steps; "
        f"{sum(-n for n in rows[skipped:] if n < 0)} prompt tokens; {faults} page faults)")
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, wall in steps:
        by_kind["decode < " + str(CONCURRENCY) if kind.startswith("decode") and
                kind != f"decode {CONCURRENCY}" else kind].append(wall)
    print(f"{'steps':<16} {'count':>5} {'s':>7} {'share':>6} {'ms a step':>10}")
    for kind, walls in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"{kind:<16} {len(walls):5d} {sum(walls):7.2f} {100 * sum(walls) / total:5.1f}% "
              f"{1e3 * np.median(walls):10.1f}")
    count = len(by_kind[f"decode {CONCURRENCY}"])
    if count:
        print(f"a {CONCURRENCY}-row decode step: " + ", ".join(
            f"{name} {1e3 * s / count:.1f} ms" for name, s in full.items()))
    if not args.profile:
        return
    kinds = ["warm-up"] * skipped + [
        "prompt" if n < 0 else "full decode" if n == CONCURRENCY else "other"
        for n in rows[skipped:]]
    matrices = matrix_kinds(folder)
    nbytes: dict[str, int] = defaultdict(int)  # a step's weight bytes by matrix
    for kind, size in matrices.values():
        nbytes[f"BlockLinear {kind}"] += size
    split = kernel_split(events, matrices, kinds)
    for kind in ("full decode", "prompt"):
        ops, n = split[kind], kinds.count(kind)
        kernel = sum(ops.values())
        print(f"{kind} steps, kernel time a step: {1e3 * kernel / n:.1f} ms "
              "(BlockLinear: its weights' MB, read at GB/s)")
        for op, s in sorted(ops.items(), key=lambda kv: -kv[1]):
            reads = (f" {nbytes[op] / 1e6:6.0f} {nbytes[op] * n / s / 1e9:5.1f}"
                     if op in nbytes else "")
            print(f"  {op:<32} {1e3 * s / n:8.2f} ms {100 * s / kernel:5.1f}%{reads}")


if __name__ == "__main__":
    main()
