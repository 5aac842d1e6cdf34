"""vLLM's CPU GEMMs on kernel_bench.py's shapes: kernel_bench's `vllm` target runs this in the
vLLM peer venv (setup_peers.sh vllm), in peer_vllm.py's environment.

Each projection's weight (random bf16: the speed does not depend on the values) goes through
what vLLM's `dispatch_cpu_unquantized_gemm` makes of an unquantized linear layer: oneDNN's
prepacked matmul (`create_onednn_mm` / `onednn_mm`), or for the small shapes it sends there
sgl-kernel's packed linear. Prints one line, RESULT {"TOKENS": [CPU s, wall s] per call}.
"""

from __future__ import annotations

import argparse
import json

import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
from workloads import RESULT_PREFIX, THREADS, time_calls


def linear(n: int, k: int):  # noqa: ANN201
    """A projection as vLLM runs it: x [tokens, k] bf16 -> [tokens, n]."""
    w = (torch.randn(n, k) * 0.02).bfloat16()
    if check_cpu_sgl_kernel(n, k, w.dtype):
        packed = torch.ops._C.convert_weight_packed(w)
        return lambda x: ops.weight_packed_linear_cpu(x, packed, n, None)
    handler = ops.create_onednn_mm(w.t(), 32)
    return lambda x: ops.onednn_mm(handler, x, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=json.loads, required=True, help="[[K, N], ...]")
    ap.add_argument("--tokens", type=int, nargs="+", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    layers = [(linear(n, k), k) for k, n in args.shapes]
    times = {}
    with torch.inference_mode():
        for tokens in args.tokens:
            xs = [torch.randn(tokens, k).bfloat16() for _, k in layers]
            times[tokens] = time_calls(
                lambda xs=xs: [f(x) for (f, _), x in zip(layers, xs)], args.seconds)
    print(RESULT_PREFIX + json.dumps(times))


if __name__ == "__main__":
    main()
