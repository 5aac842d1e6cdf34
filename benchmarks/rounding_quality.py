"""What rounding costs in quality, measured on real weights before any kernel is written:
perplexity of SmolLM2-135M-Instruct (the default model's own Q4_1 weights, dequantized, in
transformers at fp32) with its tensors rounded as a format would round them.

    python benchmarks/rounding_quality.py kv        # the KV cache: fp16, bf16, int8, fp8
    python benchmarks/rounding_quality.py blocks    # int8 weights and activations by block size

`kv` rounds the keys (after rotary) and values that attention reads: int8 per position and
KV head over head_dim (kv_cache_dtype="int8"), or in blocks of 32, fp8 e4m3 and e5m2 (vLLM's
fp8 cache formats). `blocks` rounds every linear layer's weight (int8 per output row, in
blocks of 32 or 128 inputs, or whole rows; asymmetric from min to max or symmetric) and its
input (symmetric int8 per token, in blocks of 32, 64 or 128 inputs, or whole rows): what a
weight format with scales per 128 inputs, which the AMX int8 tiles could multiply 64 inputs
at a time, would cost against the q8_0 blocks of 32 (benchmarks/README.md, eighteenth
session). The text: the Apache License 2.0 (benchmarks/data, as perplexity.py scores it).
Needs torch and transformers (the test extras).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from nanovllm_onnx.default_model import default_model_path

TEXT = Path(__file__).parent / "data" / "apache-2.0.txt"


def int8(x: torch.Tensor, block: int, symmetric: bool = True) -> torch.Tensor:
    """x rounded to int8 in blocks of its last dimension (0: whole rows), as float32."""
    b = block or x.shape[-1]
    pad = (-x.shape[-1]) % b
    blocks = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, b)
    if symmetric:
        low, step = 0.0, blocks.abs().amax(-1, keepdim=True) / 127
    else:
        low = blocks.amin(-1, keepdim=True)
        step = (blocks.amax(-1, keepdim=True) - low) / 255
    codes = torch.where(step > 0, torch.round((blocks - low) / step), 0)
    return (codes * step + low).reshape(*x.shape[:-1], -1)[..., :x.shape[-1]]


KV_ROUNDINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none (fp32)": lambda x: x,
    "fp16": lambda x: x.half().float(),
    "bf16": lambda x: x.bfloat16().float(),
    "int8 per position": lambda x: int8(x, 0),
    "int8 blocks of 32": lambda x: int8(x, 32),
    "fp8 e4m3": lambda x: x.clamp(-448, 448).to(torch.float8_e4m3fn).float(),
    "fp8 e5m2": lambda x: x.to(torch.float8_e5m2).float(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", choices=["kv", "blocks"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    gguf = default_model_path()
    rounding = {"kv": KV_ROUNDINGS["none (fp32)"], "inputs": None}

    def attention(module, q, k, v, *rest, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        return sdpa_attention_forward(module, q, rounding["kv"](k), rounding["kv"](v), *rest, **kw)

    AttentionInterface.register("rounded_kv", attention)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32,
                                                 attn_implementation="rounded_kv").eval()
    ids = [tokenizer(TEXT.read_text(), return_tensors="pt").input_ids]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = {n: m.weight.data.clone() for n, m in linears.items()}
    for m in linears.values():
        m.register_forward_pre_hook(lambda _, a: a if rounding["inputs"] is None
                                    else (int8(a[0], rounding["inputs"]),))

    def perplexity() -> float:
        with torch.no_grad():
            losses = [(model(x, labels=x).loss.item(), x.shape[1] - 1) for x in ids]
        return math.exp(sum(loss * n for loss, n in losses) / sum(n for _, n in losses))

    base = perplexity()
    print(f"SmolLM2-135M-Instruct, fp32: perplexity {base:.4f} over "
          f"{sum(x.shape[1] - 1 for x in ids)} tokens\n")
    if args.study == "kv":
        print("| keys and values | perplexity | vs fp32 |\n| --- | --- | --- |")
        for name, rounded in KV_ROUNDINGS.items():
            rounding["kv"] = rounded
            ppl = perplexity()
            print(f"| {name} | {ppl:.4f} | {ppl / base:.4f}x |", flush=True)
        return
    print("| weights | inputs | perplexity | vs fp32 |\n| --- | --- | --- | --- |")
    for block, symmetric in [(None, None), (32, True), (32, False), (128, False), (128, True),
                             (0, True)]:
        for name, m in linears.items():
            m.weight.data = weights[name] if block is None else int8(weights[name], block,
                                                                     symmetric)
        for inputs in [None, 32, 64, 128, 0]:
            rounding["inputs"] = inputs
            ppl = perplexity()
            w = ("fp32" if block is None else
                 f"int8 {'per row' if block == 0 else f'blocks of {block}'}, "
                 f"{'symmetric' if symmetric else 'min to max'}")
            x = ("fp32" if inputs is None else
                 f"int8 {'per token' if inputs == 0 else f'blocks of {inputs}'}")
            print(f"| {w} | {x} | {ppl:.4f} | {ppl / base:.4f}x |", flush=True)


if __name__ == "__main__":
    main()
