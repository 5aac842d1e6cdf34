"""Where one decode step's time goes (issue 14): a single sequence's workload-A decode, split
into BlockLinear by matrix, attention, the other ops, ONNX Runtime's time between its nodes,
and the engine's Python around the model call; with --rows N, a step that decodes N sequences
at once (N random 128-id prompts, as in Bs's steps of up to 16 rows).

    python benchmarks/decode_split.py --model ~/.cache/nano-vllm-onnx/peers/hf/llama-1b \
        --weights int4
    python benchmarks/decode_split.py --model ~/.cache/nano-vllm-onnx/peers/hf/llama-1b --rows 16

Runs the decode with ONNX Runtime's profiler on and times each engine step and each model call;
only the steps that decode every row count (not the prompt steps). On a shared machine a step's
wall time mostly measures who else runs, so every figure is a minimum over the decode steps (a
node's least time, a step's least time): what a step takes when nothing preempts it.
BlockLinear rows give each matrix's bytes and the GB/s its least time reads them at.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from op_profile import profiling_sessions
from workloads import THREADS, log, median, random_prompts, workload_a

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.convert.converter import resolve_model
from nanovllm_onnx.runner.model_runner import StepInput


def matrix_kinds(folder: Path) -> dict[str, tuple[str, int]]:
    """Node name -> (kind, weight bytes) of each BlockLinear: the weight's name without its
    layer number (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head)."""
    from nanovllm_onnx.config import ModelConfig

    graph_file = ModelConfig.load(folder).graph_file(folder)
    graph = onnx.load(str(graph_file), load_external_data=False).graph
    sizes = {}
    for init in graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        sizes[init.name] = int(ext["length"]) if "length" in ext else len(init.raw_data)
    kinds = {}
    for node in graph.node:
        if node.op_type == "BlockLinear":
            name = node.input[1]
            kind = name.split(".")[-2] if ".layers." in name else "lm_head"
            kinds[node.name] = (kind, sizes[name])
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--rows", type=int, default=1, help="sequences decoded together")
    args = ap.parse_args()
    folder = resolve_model(args.model, args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        with profiling_sessions(str(Path(tmp) / "ort")):
            llm = LLM(str(folder), enable_prefix_caching=False,
                      intra_op_num_threads=args.threads)
        engine = llm.llm_engine
        runner = engine.runner
        calls: list[float] = []
        decodes: list[bool] = []  # whether each call decodes one token of every row
        run = runner.run

        def timed_run(step: StepInput) -> np.ndarray:  # the call: inputs, binding, run
            decodes.append(step.num_tokens == [1] * args.rows)
            start = time.perf_counter()
            out = run(step)
            calls.append(time.perf_counter() - start)
            return out

        runner.run = timed_run
        steps: list[float] = []
        prompts = workload_a().prompts if args.rows == 1 else random_prompts(args.rows, 128)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, SamplingParams(
                max_tokens=args.tokens, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    kinds = matrix_kinds(folder)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    assert len(runs) == len(steps) == len(calls)
    node_times: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    in_run = [0.0] * len(runs)  # each run's node time
    r = 0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        while r + 1 < len(runs) and e["ts"] >= runs[r + 1]["ts"]:
            r += 1
        in_run[r] += e["dur"] / 1e6
        if not decodes[r]:  # a prompt step
            continue
        node = e["name"][: -len("_kernel_time")]
        node_times[node].append(e["dur"] / 1e6)
        op_of[node] = e["args"]["op_name"]
    least = {node: min(t) for node, t in node_times.items()}
    groups: dict[str, float] = defaultdict(float)
    nbytes: dict[str, int] = defaultdict(int)
    for node, t in least.items():
        if node in kinds:
            kind, size = kinds[node]
            groups["BlockLinear " + kind] += t
            nbytes["BlockLinear " + kind] += size
        else:
            groups[op_of[node]] += t
    nodes = sum(least.values())
    decode = [i for i in range(len(runs)) if decodes[i]]
    run_s = [runs[i]["dur"] / 1e6 for i in range(len(runs))]
    step, model_run = min(steps[i] for i in decode), min(run_s[i] for i in decode)
    rows = sorted(groups.items(), key=lambda kv: -kv[1])
    # Each a least difference within one step: the step's own overheads, not who else ran.
    rows += [("ONNX Runtime between nodes", min(run_s[i] - in_run[i] for i in decode)),
             ("runner around session.run", min(calls[i] - run_s[i] for i in decode)),
             ("engine around runner.run", min(steps[i] - calls[i] for i in decode))]
    total = sum(t for _, t in rows)
    log(f"{len(decode)} decode steps of {args.rows} rows: least step {1e3 * step:.2f} ms, "
        f"median {1e3 * median([steps[i] for i in decode]):.2f} ms; least model run "
        f"{1e3 * model_run:.2f} ms; the parts' least times add up to {1e3 * total:.2f} ms "
        f"(nodes {1e3 * nodes:.2f})")
    print(f"{'part':<32} {'ms':>7} {'share':>6} {'MB':>6} {'GB/s':>5}")
    for name, t in rows:
        size = f"{nbytes[name] / 1e6:6.0f} {nbytes[name] / t / 1e9:5.1f}" if name in nbytes else ""
        print(f"{name:<32} {1e3 * t:7.3f} {100 * t / total:5.1f}% {size}")
    total_bytes = sum(nbytes.values())
    linear = sum(groups[name] for name in nbytes)
    print(f"BlockLinear: {1e3 * linear:.2f} ms for {total_bytes / 1e6:.0f} MB = "
          f"{total_bytes / linear / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
