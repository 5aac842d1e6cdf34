"""Where speculative decoding stops paying as the batch grows (issue 17's disable_by_batch_size).

    python benchmarks/spec_batch_size.py --weights int4 --sizes 1 2 4 8 16

For each batch size N: the first N prompts of workload B, 64 greedy tokens each, all at once,
without and with speculation (never disabled), interleaved round by round; prints output tok/s
and the ratio. Workload B's random prompts are the case where proposals are mostly wrong;
--workload C uses N copies of workload C's quoting prompts instead (mostly right).
"""

from __future__ import annotations

import argparse
import json
import time

from throughput import c_prompts
from workloads import THREADS, emit, log, median, workload_b

from nanovllm_onnx import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--workload", choices=["B", "C"], default="B")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--speculative-config", type=json.loads,
                    default={"method": "ngram", "num_speculative_tokens": 4})
    args = ap.parse_args()
    extra = {"weights": args.weights} if args.weights else {}
    spec = {**args.speculative_config, "disable_by_batch_size": max(args.sizes)}
    engines = {name: LLM(args.model, **extra, enable_prefix_caching=False,
                         intra_op_num_threads=THREADS, speculative_config=config)
               for name, config in [("without", None), ("with", spec)]}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for size in args.sizes:
        if args.workload == "B":
            prompts = workload_b().prompts[:size]
        else:
            quotes = c_prompts(engines["without"])
            prompts = [quotes[i % len(quotes)] for i in range(size)]
        speeds: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, llm in engines.items():
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                speeds[name].append(size * args.max_tokens / (time.perf_counter() - start))
        ratio = median(speeds["with"]) / median(speeds["without"])
        stats = engines["with"].llm_engine.spec_decode_stats
        log(f"batch {size}: output tok/s without {median(speeds['without']):.1f}, with "
            f"{median(speeds['with']):.1f} -> {ratio:.2f}x (acceptance so far "
            f"{stats.acceptance_rate:.2f})")
        emit({"workload": args.workload, "batch_size": size, "ratio": ratio, **speeds})


if __name__ == "__main__":
    main()
