"""Peer runner: HF transformers + torch CPU, fp32, 2 threads (run with a python that has them).

A: greedy `generate`; TTFT = a 1-token generate, TPOT = (128-token generate - TTFT) / 127.
B: `--b-mode sequential` (default) one `generate` per request, one after another; `--b-mode cb`
transformers' continuous batching (per-request max_new_tokens; very slow on CPU here).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

from workloads import (
    B_SHAPES,
    PAD_ID,
    PEERS,
    THREADS,
    Workload,
    emit,
    limit_threads,
    measure_b,
    median,
    workload_a,
    workload_b,
)

limit_threads()

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

DEFAULT_HF = PEERS / "hf/SmolLM2-135M-Instruct"


def generate(model: AutoModelForCausalLM, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=PAD_ID)
    assert out.shape[1] == len(prompt) + n
    return time.perf_counter() - start


def run_b_cb(model: AutoModelForCausalLM, wl: Workload) -> float:
    gc = GenerationConfig(do_sample=False, max_new_tokens=max(wl.max_tokens), eos_token_id=-1,
                          pad_token_id=PAD_ID)
    start = time.perf_counter()
    # KV pages for every request at once (<= 768 tokens each), not a share of the RAM.
    cbc = ContinuousBatchingConfig(num_blocks=4 * len(wl.prompts), max_batch_tokens=2048,
                                   max_requests_per_batch=len(wl.prompts),
                                   allow_block_sharing=False)
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cbc)
    manager.start()
    ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1)
           for p, n in zip(wl.prompts, wl.max_tokens)]
    done, tokens = set(), 0
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            done.add(result.request_id)
            tokens += len(result.generated_tokens)
        elif result is None and not manager.is_running():
            raise RuntimeError("transformers' continuous batching thread stopped")
    manager.stop(block=True)
    wall = time.perf_counter() - start
    assert tokens == wl.output_tokens, tokens
    return wall


def run_b_sequential(model: AutoModelForCausalLM, wl: Workload) -> float:
    start = time.perf_counter()
    for p, n in zip(wl.prompts, wl.max_tokens):
        generate(model, p, n)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_HF)
    ap.add_argument("--workload", choices=["A", *B_SHAPES], required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--b-mode", choices=["cb", "sequential"], default="sequential")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(Path(args.model).expanduser(),
                                                 dtype=torch.float32).eval()
    name = f"transformers {transformers.__version__} + torch {torch.__version__.split('+')[0]}"
    if args.workload == "A":
        prompt, n = workload_a().prompts[0], 128
        generate(model, prompt, 8)  # warm-up
        ttft = [generate(model, prompt, 1) for _ in range(args.repeats)]
        full = [generate(model, prompt, n) for _ in range(args.repeats)]
        tpot = (median(full) - median(ttft)) / (n - 1)
        emit({"engine": name, "weights": "fp32", "workload": "A",
              "prefill_tok_s": 128 / median(ttft), "decode_tok_s": 1 / tpot})
    else:
        run = run_b_cb if args.b_mode == "cb" else run_b_sequential
        measure_b(f"{name} ({args.b_mode})", "fp32", workload_b(args.workload),
                  partial(run, model), args.repeats)


if __name__ == "__main__":
    main()
