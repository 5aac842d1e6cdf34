"""Peer runner: onnxruntime-genai's Engine API on a model from its model builder.

A: one request; TTFT and TPOT from the engine's token events.
B: all 32 requests at once, `--batching static` (default: static batches of 32) or `dynamic`.
EOS is ignored through a per-request minimum = maximum of generated tokens.
Run with the onnxruntime-genai peer venv's python (see setup_peers.sh).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from workloads import (
    B_SHAPES,
    PAD_ID,
    PEERS,
    THREADS,
    Workload,
    measure_a,
    measure_b,
    workload_b,
)

BATCHING = {
    "static": {"static_batching": {"max_batch_size": 32}},
    "dynamic": {"dynamic_batching": {"max_batch_size": 32, "max_scheduled_tokens": 2048,
                                     "block_size": 16, "num_blocks": 4096}},
}


def load(model: Path, batching: str) -> og.Engine:
    config = og.Config(str(model))
    # The pad id must not occur in the prompts (the builder sets it to EOS, id 2).
    # Its static batches allocate the KV cache for max_length per sequence: a 1B Llama's 131,072
    # took 4 GB per sequence (the OOM killer stopped Bs); the workloads need under 1,024.
    config.overlay(json.dumps({"model": {"pad_token_id": PAD_ID, "decoder": {
        "session_options": {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}}},
        "search": {"max_length": 4096}, "engine": BATCHING[batching]}))
    return og.Engine(og.Model(config))


def run(engine: og.Engine, wl: Workload) -> tuple[float, list[float]]:
    """Wall seconds for the workload, and the token event times of its first request."""
    buffer = engine.create_event_buffer(256)
    requests = []
    start = time.perf_counter()
    for prompt, n in zip(wl.prompts, wl.max_tokens):
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(n)
        options.set_min_generated_tokens(n)
        options.set_do_sample(False)
        request.begin_turn(np.asarray(prompt, dtype=np.int32), options)
        requests.append(request)
    first, stamps, generated = requests[0], [], 0
    while engine.has_pending_requests():
        for event in engine.run(buffer):
            if event.flags & og.EngineEventFlags.FAILED:
                raise RuntimeError(f"engine failed: {event.error_code}")
            if event.flags & og.EngineEventFlags.TOKEN:
                generated += 1
                if event.request == first:
                    stamps.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    for request in requests:
        request.close()
    assert generated == wl.output_tokens, (generated, wl.output_tokens)
    return wall, stamps


def run_a(engine: og.Engine, prompt: list[int], n: int) -> tuple[float, float]:
    """Time to first token and per output token after it, from the token event times."""
    stamps = run(engine, Workload("A", [prompt], [n]))[1]
    return stamps[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["int4", "fp32"], default="int4")
    ap.add_argument("--workload", choices=["A", *B_SHAPES], required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batching", choices=list(BATCHING), default="static")
    ap.add_argument("--model", type=Path, default=None,
                    help="builder output folder (default: the default model's, of --precision)")
    args = ap.parse_args()
    model = args.model or PEERS / "ortgenai" / args.precision
    name = f"onnxruntime-genai {og.__version__}"
    weights = {"int4": "int4 (builder default)", "fp32": "fp32"}[args.precision]
    if args.workload == "A":
        measure_a(name, weights, partial(run_a, load(model, "static")), args.repeats)
    else:
        engine = load(model, args.batching)
        measure_b(f"{name} ({args.batching} batching)", weights, workload_b(args.workload),
                  lambda wl: run(engine, wl)[0], args.repeats)


if __name__ == "__main__":
    main()
