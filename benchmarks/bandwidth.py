"""Decode against the memory-bandwidth limit (issue 14).

    python benchmarks/bandwidth.py                                    # bandwidth alone
    python benchmarks/bandwidth.py --model ~/.cache/nano-vllm-onnx/peers/hf/llama-1b --weights int4

Bandwidth: a STREAM-like read of a 1 GiB array (beyond any cache) split across 2 threads, by
numpy's uint64 OR-reduction and by ONNX Runtime's ReduceMax with 2 intra-op threads; the
faster of the two, best of 5 passes. With a model: the bytes one decode step reads (every
weight but tables only gathered a row at a time, plus the KV cache at A's mean context), our
workload-A decode rate, and the ratio (bytes per token x tokens/s) / bandwidth. Bandwidth and
decode are measured in turn, `--rounds` times; the figures are the medians.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from throughput import run_a
from workloads import THREADS, log, median, workload_a

GIB = 1 << 30
# Ops whose initializers a token reads one row of, not the whole table: the embedding, and
# SlotAttention's rotary cos/sin (33.5 MB at 1B: 131,072 positions).
ROW_LOOKUPS = {"Gather", "BlockGather", "SlotAttention"}


def numpy_read(a: np.ndarray) -> float:
    """Bytes/s of THREADS threads each OR-reducing its share (numpy releases the GIL)."""
    parts = np.array_split(a.view(np.uint64), THREADS)
    threads = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return a.nbytes / (time.perf_counter() - start)


def ort_reader() -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["y"], keepdims=0)], "read",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def bandwidth(a: np.ndarray, session: ort.InferenceSession, passes: int = 5) -> dict:
    """Best bytes/s of each reader over `passes`."""
    def ort_read() -> float:
        start = time.perf_counter()
        session.run(None, {"x": a})
        return a.nbytes / (time.perf_counter() - start)

    return {"numpy": max(numpy_read(a) for _ in range(passes)),
            "onnxruntime": max(ort_read() for _ in range(passes))}


def decode_bytes(folder) -> tuple[int, int]:
    """Bytes of weights one decode step reads from the converted graph in `folder`, and the
    KV cache bytes per context token (fp16)."""
    from nanovllm_onnx.config import ModelConfig

    cfg = ModelConfig.load(folder)
    graph = onnx.load(str(cfg.graph_file(folder)), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in graph.initializer:
        if consumers.get(init.name, set()) <= ROW_LOOKUPS and init.name in consumers:
            continue
        ext = {e.key: e.value for e in init.external_data}
        total += int(ext["length"]) if "length" in ext else len(init.raw_data) or (
            numpy_helper.to_array(init).nbytes)
    return total, cfg.kv_bytes_per_token(np.float16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model for the decode ratio (as throughput.py)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gib", type=float, default=1.0, help="size of the array read")
    args = ap.parse_args()

    a = np.ones(int(args.gib * GIB) // 4, dtype=np.float32)  # touched: resident
    session = ort_reader()
    llm = prompt = None
    if args.model:
        from nanovllm_onnx import LLM
        from nanovllm_onnx.convert.converter import resolve_model

        folder = resolve_model(args.model, args.weights)
        weight_bytes, kv_per_token = decode_bytes(folder)
        wl = workload_a()
        prompt, n = wl.prompts[0], wl.max_tokens[0]
        per_token = weight_bytes + kv_per_token * (len(prompt) + n // 2)
        llm = LLM(str(folder), intra_op_num_threads=THREADS)
        run_a(llm, prompt, 8)  # warm-up
        log(f"{folder.name}: {weight_bytes / GIB:.3f} GiB of weights read per decode step, "
            f"{per_token / GIB:.3f} GiB with A's mean KV context")
    bw, tok_s = [], []
    for r in range(args.rounds):
        b = bandwidth(a, session)
        bw.append(max(b.values()))
        line = (f"round {r + 1}: read bandwidth numpy {b['numpy'] / 1e9:.1f} GB/s, "
                f"onnxruntime {b['onnxruntime'] / 1e9:.1f} GB/s")
        if llm is not None:
            tok_s.append(1 / run_a(llm, prompt, n)[1])
            line += f"; A decode {tok_s[-1]:.1f} tok/s ({per_token * tok_s[-1] / 1e9:.1f} GB/s)"
        log(line)
    print(f"read bandwidth, {THREADS} threads: {median(bw) / 1e9:.1f} GB/s (median of rounds; "
          f"{', '.join(f'{x / 1e9:.1f}' for x in bw)})")
    if llm is not None:
        reached = per_token * median(tok_s)
        print(f"A decode {median(tok_s):.1f} tok/s x {per_token / 1e9:.3f} GB per token = "
              f"{reached / 1e9:.1f} GB/s: {100 * reached / median(bw):.0f}% of the bandwidth "
              f"limit ({median(bw) / per_token:.1f} tok/s)")


if __name__ == "__main__":
    main()
