"""Perplexity of the default model (or --model) on a fixed text, per weight format.

    python benchmarks/perplexity.py                  # fp32, int8 and int4 of the default model
    python benchmarks/perplexity.py --model DIR --weights fp32 int4
    python benchmarks/perplexity.py --kv-cache-dtype fp32 fp16    # the cache's own cost

The text is the Apache License 2.0 (benchmarks/data/apache-2.0.txt, ~2,300 tokens), scored
teacher-forced in one sequence through the engine's prompt logprobs.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from nanovllm_onnx import LLM, SamplingParams

TEXT = Path(__file__).parent / "data" / "apache-2.0.txt"


def perplexity(model: str | None, weights: str, kv_cache_dtype: str) -> tuple[float, int]:
    llm = LLM(model, weights=weights, max_num_batched_tokens=512, intra_op_num_threads=2,
              kv_cache_dtype=kv_cache_dtype)
    ids = llm.llm_engine.tokenizer.encode(TEXT.read_text())[: llm.llm_engine.max_model_len - 1]
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logprobs = [lps[t].logprob for t, lps in zip(ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(logprobs) / len(logprobs)), len(logprobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--weights", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto"],
                        help="auto (fp16) | fp16 | fp32: each weight format with each")
    args = parser.parse_args()
    results = {}
    for weights in args.weights:
        for kv in args.kv_cache_dtype:
            start = time.perf_counter()
            results[weights, kv], n = perplexity(args.model, weights, kv)
            print(f"{weights}, KV cache {kv}: perplexity {results[weights, kv]:.3f} over {n} "
                  f"tokens ({time.perf_counter() - start:.0f} s)", flush=True)
    base = results.get(("fp32", "fp32"), results.get(("fp32", args.kv_cache_dtype[0])))
    print("\n| weights | KV cache | perplexity | vs fp32 |\n| --- | --- | --- | --- |")
    for (weights, kv), ppl in results.items():
        ratio = f"{ppl / base:.3f}x" if base else ""
        print(f"| {weights} | {kv} | {ppl:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
