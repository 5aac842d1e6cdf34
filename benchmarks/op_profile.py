"""Where the model call's time goes, by ONNX operator type (ONNX Runtime's own profiler).

    python benchmarks/op_profile.py                 # workload B, greedy
    python benchmarks/op_profile.py --workload A
    python benchmarks/op_profile.py --workload A --prefill   # A's prefill, warm, 3 times

Runs the workload once with ONNX Runtime's profiling switched on in the engine's own session
options, then sums the kernel time per operator type (MatMul vs SlotAttention
vs the rest), with the GFLOP/s the matmuls reach.
"""

from __future__ import annotations

import argparse
import bisect
import json
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort
from throughput import run_a, run_b
from workloads import THREADS, log, workload_a, workload_b

from nanovllm_onnx import LLM


@contextmanager
def profiling_sessions(prefix: str) -> Iterator[None]:
    """Sessions created inside write ONNX Runtime's profile (otherwise the engine's options)."""
    original = ort.SessionOptions

    def options() -> ort.SessionOptions:
        opts = original()
        opts.enable_profiling = True
        opts.profile_file_prefix = prefix
        return opts

    ort.SessionOptions = options
    try:
        yield
    finally:
        ort.SessionOptions = original


def matmul_flops(event: dict) -> float:
    """2*M*K*N of a MatMul or Gemm node from its first input [M, K] and output [M, N] (the
    profile lists no initializer shapes)."""
    args = event["args"]
    ins, outs = args.get("input_type_shape", []), args.get("output_type_shape", [])
    if not ins or not outs:
        return 0.0
    a, out = next(iter(ins[0].values())), next(iter(outs[0].values()))
    rows = 1
    for d in out[:-1]:
        rows *= d
    return 2.0 * rows * a[-1] * out[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["A", "B"], default="B")
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights", default=None, help="fp32 | int8 | int4 (when converting)")
    ap.add_argument("--prefill", action="store_true",
                    help="with --workload A: its prefill alone (4 times; the first, cold, "
                         "not counted)")
    args = ap.parse_args()
    extra = {"weights": args.weights} if args.weights else {}
    with tempfile.TemporaryDirectory() as tmp:
        with profiling_sessions(str(Path(tmp) / "ort")):
            llm = LLM(args.model, **extra, enable_prefix_caching=False,
                      intra_op_num_threads=THREADS)
        if args.workload == "A":
            wl = workload_a()
            for _ in range(4 if args.prefill else 1):
                run_a(llm, wl.prompts[0], 2 if args.prefill else wl.max_tokens[0])
        else:
            run_b(llm, workload_b())
        events = json.loads(Path(llm.llm_engine.runner.session.end_profiling()).read_text())
    spans = sorted((e["ts"], e["dur"]) for e in events
                   if e.get("cat") == "Session" and e["name"] == "model_run")
    nodes = []  # (run index, op, seconds, event)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"]["op_name"]
        if op == "SlotAttention":  # at most one token per cache row: a decode step
            shapes = [next(iter(s.values())) for s in e["args"]["input_type_shape"]]
            op += " (decode)" if shapes[0][0] <= shapes[3][0] else " (with prefill)"
        run = bisect.bisect_right(spans, (e["ts"], float("inf"))) - 1
        nodes.append((run, op, e["dur"] / 1e6, e))
    kept = set(range(len(spans)))
    if args.prefill:  # the runs with prompt tokens but the first
        kept = {run for run, op, _, _ in nodes if op == "SlotAttention (with prefill)"}
        kept.discard(min(kept))
    seconds: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    for run, op, s, e in nodes:
        if run in kept:
            seconds[op] += s
            if op in ("MatMul", "Gemm"):
                flops[op] += matmul_flops(e)
    runs = sum(spans[i][1] for i in kept) / 1e6
    kernels = sum(seconds.values())
    log(f"workload {args.workload}{' (prefill steps)' if args.prefill else ''}: {runs:.2f} s in "
        f"{len(kept)} model runs, {kernels:.2f} s in kernels "
        f"({100 * kernels / runs:.1f}%)")
    for op, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        rate = f", {flops[op] / s / 1e9:.0f} GFLOP/s" if flops.get(op) else ""
        log(f"  {op:<32} {s:7.2f} s  {100 * s / runs:5.1f}%{rate}")


if __name__ == "__main__":
    main()
