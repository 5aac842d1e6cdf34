"""Peer runner: OpenVINO GenAI on a model exported by `optimum-cli export openvino`.

A: LLMPipeline (prefix caching off), TTFT and TPOT from its perf metrics.
B: ContinuousBatchingPipeline, all requests in one `generate`, per-request max_new_tokens.
Run with the OpenVINO peer venv's python (see setup_peers.sh).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
from workloads import (
    B_SHAPES,
    PEERS,
    THREADS,
    Workload,
    measure_a,
    measure_b,
    workload_b,
)


def scheduler_config() -> ov_genai.SchedulerConfig:
    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 2  # GB
    sc.max_num_batched_tokens = 2048
    sc.max_num_seqs = 32
    sc.dynamic_split_fuse = True
    sc.enable_prefix_caching = False
    return sc


def gen_config(n: int) -> ov_genai.GenerationConfig:
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = gc.min_new_tokens = n
    gc.ignore_eos = True
    gc.do_sample = False
    return gc


def tokens(ids: list[int]) -> ov.Tensor:
    return ov.Tensor(np.array([ids], dtype=np.int64))


def run_a(pipe: ov_genai.LLMPipeline, prompt: list[int], n: int) -> tuple[float, float]:
    ids = tokens(prompt)
    mask = ov.Tensor(np.ones((1, len(prompt)), dtype=np.int64))
    res = pipe.generate(ov_genai.TokenizedInputs(ids, mask), gen_config(n))
    pm = res.perf_metrics
    assert pm.get_num_generated_tokens() == n, pm.get_num_generated_tokens()
    return pm.get_ttft().mean / 1000, pm.get_tpot().mean / 1000


def run_b(pipe: ov_genai.ContinuousBatchingPipeline, wl: Workload) -> float:
    inputs = [tokens(p) for p in wl.prompts]
    configs = [gen_config(n) for n in wl.max_tokens]
    start = time.perf_counter()
    results = pipe.generate(inputs, configs)
    wall = time.perf_counter() - start
    got = sum(len(r.m_generation_ids[0]) for r in results)
    assert got == wl.output_tokens, got
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", choices=["int8", "fp32", "int4"], default="int8")
    ap.add_argument("--workload", choices=["A", *B_SHAPES], required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None,
                    help="exported folder (default: the default model's, of --weights)")
    args = ap.parse_args()
    model = args.model or PEERS / "openvino" / args.weights
    props = {"INFERENCE_NUM_THREADS": THREADS}
    precision = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    name = f"OpenVINO GenAI {ov_genai.__version__.split('-')[0]}"
    weights = f"{args.weights}, {precision.get_type_name()} compute"
    if args.workload == "A":
        pipe = ov_genai.LLMPipeline(str(model), "CPU", scheduler_config=scheduler_config(),
                                    **props)
        measure_a(name, weights, partial(run_a, pipe), args.repeats)
    else:
        pipe = ov_genai.ContinuousBatchingPipeline(str(model), scheduler_config(), "CPU", props)
        measure_b(name + " (continuous batching)", weights, workload_b(args.workload),
                  partial(run_b, pipe), args.repeats)


if __name__ == "__main__":
    main()
