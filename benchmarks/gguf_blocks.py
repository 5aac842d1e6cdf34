"""How a GGUF's blocks map onto BlockLinear's: error against `gguf.quants.dequantize` and bytes
per weight, per quantization type of a file, for the mapping the converter uses and the
alternatives.

    python benchmarks/gguf_blocks.py FILE.gguf

BlockLinear's records hold 16 rows x 32 inputs of 4- or 8-bit codes and an fp16 scale and
minimum per row: 5 (4-bit) or 9 (8-bit) bits per weight. Alternatives measured:
- K-quants with products (Q4_K/Q5_K: d x 6-bit scale): fp32 scale and minimum instead of fp16
  (exact; 6 or 10 bits per weight, and a record layout the kernel does not have);
- Q6_K/Q2_K (a scale per 16 inputs): 8 bits per 32 from min to max (used) or symmetric
  (Q8_0's rounding); exact would need 16-wide blocks: 10 bits per weight.
Error: the largest |ours - file| over the tensor, relative to the largest |file|, and the RMS
of the difference relative to the RMS of the file's weights.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize

from nanovllm_onnx.convert.gguf_blocks import FLOAT_TYPES, SUPPORTED, file_blocks
from nanovllm_onnx.convert.graph import quantize_blocks


def record_bits(bits: int, scale_bytes: int = 2) -> float:
    return bits + 2 * scale_bytes * 8 / 32


def errors(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = ours - ref
    return (float(np.abs(diff).max() / np.abs(ref).max()),
            float(np.sqrt((diff**2).mean() / (ref**2).mean())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--max-tensors", type=int, default=8, help="per type (time)")
    args = ap.parse_args()
    reader = GGUFReader(args.gguf)
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype in FLOAT_TYPES or len(tensor.shape) != 2 or seen[qtype.name] >= args.max_tensors:
            continue
        if qtype not in SUPPORTED:
            print(f"{tensor.name}: {qtype.name} is not supported")
            continue
        seen[qtype.name] += 1
        n_cols, n_rows = (int(d) for d in tensor.shape)
        ref = dequantize(tensor.data, qtype).reshape(n_rows, n_cols)
        blocks = file_blocks(tensor.data, qtype, n_rows, n_cols)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        file_bits = type_size * 8 / block_size
        rows[f"{qtype.name} | file {file_bits:.3g} | ours, fp16 scales "
             f"({blocks.bits}-bit records) | {record_bits(blocks.bits):.3g}"].append(
            errors(blocks.dequantize(), ref))
        if qtype.name in ("Q4_K", "Q5_K"):  # fp32 products: the arithmetic gguf does
            rows[f"{qtype.name} | file {file_bits:.3g} | fp32 scales (exact) | "
                 f"{record_bits(blocks.bits, 4):.3g}"].append((0.0, 0.0))
        if qtype.name in ("Q6_K", "Q2_K"):
            symmetric = quantize_blocks(ref, 8, symmetric=True).dequantize()
            rows[f"{qtype.name} | file {file_bits:.3g} | symmetric 8-bit per 32 | "
                 f"{record_bits(8):.3g}"].append(errors(symmetric, ref))
            rows[f"{qtype.name} | file {file_bits:.3g} | 8-bit per 16 (exact, no kernel) | "
                 f"{8 + 2 * 16 / 16:.3g}"].append((0.0, 0.0))
    print("\n| type | file bits/weight | ours | bits/weight | max error / max |w| | "
          "RMS error / RMS w |\n| --- | --- | --- | --- | --- | --- |")
    for key, errs in rows.items():
        worst = max(e[0] for e in errs)
        rms = float(np.sqrt(np.mean([e[1] ** 2 for e in errs])))
        print(f"| {key} | {worst:.2e} | {rms:.2e} |")


if __name__ == "__main__":
    main()
